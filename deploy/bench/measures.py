"""One function per figure of issue 9's Targets table. Each fills rows with the raw value of
every round (rounds alternate baseline / kextless) and raises nothing: a failing measure
records "failed: reason" in its rows and the others still run.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from kextless.deploy.bench import workloads as w
from kextless.deploy.bench.netns import BenchPair
from kextless.deploy.bench.summary import Compare, Op, Over, Row, Spec, Target
from kextless.deploy.bench.system import Kextless, cpu_seconds, rss_bytes
from kextless.protocol.enums import Verdict

#: divert loss counters whose packets continue down the TC chain: not examined by kextless.
UNEXAMINED_KEYS = ("ringbuf_full", "too_big", "parsing_errors")
#: The fail-closed guard's counter of those it dropped instead (actors/capture/counters.py;
#: spelled out, not imported, so the bench also reads a capture that has no guard yet).
GUARD_DROPPED = "guard_dropped"


@dataclass(frozen=True)
class Params:
    """How much of everything a run does; `--quick` is the small set."""

    rounds: int = 5
    heavy_rounds: int = 3
    connects: int = 300
    udp_flows: int = 300
    rate_seconds: float = 2.0
    bulk_seconds: float = 3.0
    blast_seconds: float = 1.5
    udp_rates: tuple[int, ...] = (10_000, 30_000, 0)
    hold_connections: int = 3000
    #: How long opening them may take (they come at the measured connection rate).
    hold_seconds: float = 40.0
    memory_rounds: int = 3
    idle_seconds: float = 4.0
    #: Quiet time after `up` before the idle window (start-up work, e.g. the socket scan).
    idle_settle_seconds: float = 5.0
    update_rounds: int = 3
    #: Each UDP round waits for the capture's next counter report (every 5 s) per rate.
    udp_rounds: int = 3


QUICK = Params(
    rounds=2,
    heavy_rounds=2,
    connects=150,
    udp_flows=100,
    rate_seconds=0.7,
    bulk_seconds=1.0,
    blast_seconds=1.0,
    udp_rates=(0,),  # the hardest rate only; the full run adds 10k and 30k/s
    hold_connections=1000,
    hold_seconds=15.0,
    memory_rounds=1,
    idle_seconds=1.5,
    idle_settle_seconds=0.5,
    update_rounds=2,
    udp_rounds=1,
)


@dataclass
class Target_:
    """A kextless instance under test with the namespace pair it guards."""

    name: str  # short key: "client" or "policy"
    pair: BenchPair
    kextless: Kextless


@dataclass
class Ctx:
    params: Params
    base: BenchPair
    targets: list[Target_]
    log: Callable[[str], None]
    raw: dict[str, Any] = field(default_factory=dict)
    _ports: Iterator[int] = field(default_factory=lambda: itertools.count(7100))

    def port(self) -> int:
        """A port no earlier measure used, so every connection is a new 5-tuple to decide."""
        return next(self._ports)

    @property
    def client(self) -> Target_:
        return next(t for t in self.targets if t.name == "client")


# ---- helpers ------------------------------------------------------------------------------------


def run_json(pair: BenchPair, code: str, *args: object, timeout: float) -> dict[str, Any]:
    """Run a workload in namespace `a` and return its JSON line."""
    res = pair.run(pair.a, [sys.executable, "-c", code, *args], timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"workload failed: {res.stderr.strip()[-300:]}")
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


@contextmanager
def server(pair: BenchPair, code: str, *args: object) -> Iterator[Any]:
    """A server workload in namespace `b`, ready when it printed "ready"; killed afterwards."""
    proc = pair.py(pair.b, code, *args)
    try:
        assert proc.stdout is not None
        line = _readline(proc, 10.0)
        if b"ready" not in line:
            raise RuntimeError(f"server did not start: {_stderr(proc)}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)


def _readline(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    """One stdout line, or b"" after `timeout` (the process is then killed)."""
    import selectors

    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            proc.kill()
            return b""
        return proc.stdout.readline()
    finally:
        sel.close()


def _stderr(proc: subprocess.Popen[bytes]) -> str:
    if proc.poll() is None:
        proc.kill()
    try:
        _, err = proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        return "(no stderr)"
    return err.decode(errors="replace").strip()[-300:]


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; nan when empty."""
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))]


def each_target(ctx: Ctx, only_client: bool) -> list[Target_]:
    return [ctx.client] if only_client else ctx.targets


def failed(rows: list[Row], exc: BaseException) -> list[Row]:
    reason = f"{type(exc).__name__}: {exc}".strip()
    for r in rows:
        if r.error is None:
            r.error = reason
    return rows


# ---- the measures -------------------------------------------------------------------------------


def idle_cpu(ctx: Ctx) -> list[Row]:
    """CPU of all of an instance's processes (supervisord and every actor) while nothing
    happens, in % of one core; every instance over the same window."""
    rows = {
        t.name: Row(
            spec=Spec(
                f"idle_cpu_{t.name}",
                f"idle CPU, all processes ({t.kextless.label})",
                "% of a core",
                Compare.ABSOLUTE,
                Target(Op.LT, 0.2),
            )
        )
        for t in ctx.targets
    }
    try:
        time.sleep(ctx.params.idle_settle_seconds)
        pids = {t.name: t.kextless.pids() for t in ctx.targets}
        for _ in range(ctx.params.rounds if ctx.params.rounds < 3 else 3):
            before = {n: cpu_seconds(p) for n, p in pids.items()}
            t0 = time.monotonic()
            time.sleep(ctx.params.idle_seconds)
            dt = time.monotonic() - t0
            for n, p in pids.items():
                rows[n].kextless.append((cpu_seconds(p) - before[n]) / dt * 100)
        ctx.raw["idle_cpu_pids"] = pids
    except Exception as e:  # one failing measure must not stop the others
        failed(list(rows.values()), e)
    return list(rows.values())


def memory(ctx: Ctx) -> list[Row]:
    """RSS growth of all kextless processes per tracked (open, accepted) TCP connection."""
    t = ctx.client
    n = ctx.params.hold_connections
    row = Row(
        spec=Spec(
            "memory_per_connection",
            f"memory per tracked connection, all processes (N={n})",
            "B",
            Compare.ABSOLUTE,
            Target(Op.LE, 1024),
        )
    )
    try:
        # A first, uncounted batch: one-time allocations on the first connections (lazy
        # imports, buffers; the lifecycle actor grew ~30 MB once) are not a per-connection cost.
        warm = max(100, n // 8)
        ctx.raw["memory_warmup"] = _hold(ctx, t, warm, ctx.params.hold_seconds)
        for _ in range(ctx.params.memory_rounds):
            got = _hold(ctx, t, n, ctx.params.hold_seconds)
            if got["failed"] or got["open"] < n // 4:
                raise RuntimeError(
                    f"only {got['open']} of {n} connections opened within "
                    f"{ctx.params.hold_seconds:g} s ({got['failed']} failed)"
                )
            row.kextless.append((got["rss_after"] - got["rss_before"]) / got["open"])
            if got["open"] < n:  # slower than the deadline allows: fewer, said so
                row.note = f"{got['open']} of {n} opened within {ctx.params.hold_seconds:g} s"
            ctx.raw.setdefault("memory", []).append(got)
    except Exception as e:
        failed([row], e)
    return [row]


def _hold(ctx: Ctx, t: Target_, n: int, limit: float) -> dict[str, Any]:
    """Open n connections through kextless and hold them: RSS before and after, per process."""
    port = ctx.port()
    with server(t.pair, w.HOLD_SERVER, port, n):
        pids = t.kextless.pids()
        each = {pid: rss_bytes([pid]) for pid in pids}
        hold = t.pair.py(t.pair.a, w.HOLD_CLIENT, t.pair.ip4_b, port, n, limit)
        try:
            line = _readline(hold, limit + 10)
            if not line:
                raise RuntimeError(f"the holding client did not report: {_stderr(hold)}")
            got: dict[str, Any] = json.loads(line)
            time.sleep(0.5)  # let the last verdicts and cache entries land
            after = {pid: rss_bytes([pid]) for pid in t.kextless.pids()}
        finally:
            hold.kill()
            hold.wait(timeout=5)
    got["rss_before"] = sum(each.values())
    got["rss_after"] = sum(after.values())
    got["by_process"] = {
        t.kextless.process_name(pid): {"before": each.get(pid, 0), "after": rss}
        for pid, rss in after.items()
    }
    return got


def update_block(ctx: Ctx) -> list[Row]:
    """ms from the client's UpdateV4 (PermanentBlock) for a live, accepted bulk transfer until
    the receiver's last byte (negative: the last byte came before the update went out)."""
    t = ctx.client
    row = Row(
        spec=Spec(
            "update_no_more_bytes",
            "Update -> no more bytes, live bulk transfer",
            "ms",
            Compare.ABSOLUTE,
            Target(Op.LE, 10),
        )
    )
    try:
        ans = t.kextless.answerer
        if ans is None:
            raise RuntimeError("no client on the endpoint")
        for _ in range(ctx.params.update_rounds):
            port = ctx.port()
            with server(t.pair, w.BULK_SINK, port) as sink:
                sender = t.pair.py(t.pair.a, w.BULK_SENDER, t.pair.ip4_b, port, 8)
                try:
                    line = _readline(sender, 10.0)
                    if not line:
                        raise RuntimeError(f"the bulk sender did not connect: {_stderr(sender)}")
                    local_port = json.loads(line)["local_port"]
                    time.sleep(1.0)  # established and streaming
                    sent_at = time.monotonic()
                    ans.client.send_update_v4(
                        6,
                        ipaddress.ip_address(t.pair.ip4_a).packed,
                        local_port,
                        ipaddress.ip_address(t.pair.ip4_b).packed,
                        port,
                        Verdict.PERMANENT_BLOCK,
                    )
                    out = _readline(sink, 12.0)
                    if not out:
                        raise RuntimeError("the transfer did not stop within 10 s of the Update")
                    last = json.loads(out)["last"]
                finally:
                    sender.kill()
                    sender.wait(timeout=5)
            row.kextless.append((last - sent_at) * 1e3)
    except Exception as e:
        failed([row], e)
    return [row]


def connect_latency(ctx: Ctx) -> list[Row]:
    """Added connect() latency p50 / p99 for IPv4 and IPv6: n sequential new connections."""
    rows: dict[tuple[str, int, str], Row] = {}
    for t in ctx.targets:
        for fam in (4, 6):
            for q, limit in (("p50", 0.5), ("p99", 2.0)):
                rows[(t.name, fam, q)] = Row(
                    spec=Spec(
                        f"connect_{q}_v{fam}_{t.name}",
                        f"connect latency {q}, IPv{fam} ({t.kextless.label})",
                        "ms",
                        Compare.DIFFERENCE,
                        Target(Op.LE, limit),
                    )
                )
    dists: dict[str, list[float]] = {}
    ctx.raw["connect_latency_ms"] = dists
    for fam in (4, 6):
        try:
            for _ in range(ctx.params.rounds):
                base = _connects(ctx, ctx.base, fam)
                dists.setdefault(f"baseline_v{fam}", []).extend(base)
                for t in ctx.targets:
                    kext = _connects(ctx, t.pair, fam)
                    dists.setdefault(f"{t.name}_v{fam}", []).extend(kext)
                    for q, quant in (("p50", 0.5), ("p99", 0.99)):
                        r = rows[(t.name, fam, q)]
                        r.baseline.append(pct(base, quant))
                        r.kextless.append(pct(kext, quant))
        except Exception as e:
            failed([r for k, r in rows.items() if k[1] == fam], e)
    return list(rows.values())


def _connects(ctx: Ctx, pair: BenchPair, fam: int) -> list[float]:
    host = pair.ip4_b if fam == 4 else pair.ip6_b
    n = ctx.params.connects
    with server(pair, w.SERVER, port := ctx.port()):
        out = run_json(pair, w.CONNECT_LATENCY, host, port, n, timeout=60 + n * 0.05)
    if out["failed"]:
        raise RuntimeError(f"a connect failed after {len(out['ms'])} of {n} succeeded")
    ms: list[float] = out["ms"]
    return ms


def udp_new_flow(ctx: Ctx) -> list[Row]:
    """Added p50 of one request/response on a new UDP flow (each asked, then accepted)."""
    rows = {
        t.name: Row(
            spec=Spec(
                f"udp_new_flow_p50_{t.name}",
                f"new UDP flow request/response p50 ({t.kextless.label})",
                "ms",
                Compare.DIFFERENCE,
                Target(Op.LE, 0.5),
            )
        )
        for t in ctx.targets
    }
    n = ctx.params.udp_flows
    try:
        for _ in range(ctx.params.rounds):
            base = _udp_flows(ctx, ctx.base, n)
            for t in ctx.targets:
                kext = _udp_flows(ctx, t.pair, n)
                rows[t.name].baseline.append(statistics.median(base))
                rows[t.name].kextless.append(statistics.median(kext))
    except Exception as e:
        failed(list(rows.values()), e)
    return list(rows.values())


def _udp_flows(ctx: Ctx, pair: BenchPair, n: int) -> list[float]:
    with server(pair, w.SERVER, port := ctx.port()):
        out = run_json(pair, w.UDP_NEW_FLOW, pair.ip4_b, port, n, timeout=30 + n * 0.05)
    if out["failed"]:
        raise RuntimeError(f"no answer after {len(out['ms'])} of {n} UDP request/responses")
    ms: list[float] = out["ms"]
    return ms


def connect_rate(ctx: Ctx) -> list[Row]:
    """New TCP connections per second from 4 client processes at once, and how many failed."""
    rows: dict[str, tuple[Row, Row]] = {}
    for t in ctx.targets:
        rate = Row(
            spec=Spec(
                f"connect_rate_{t.name}",
                f"new TCP connections/s, 4 client processes ({t.kextless.label})",
                "conn/s",
                Compare.RATIO,
                Target(Op.GE, 0.5, higher_is_worse=False),
            )
        )
        lost = Row(
            spec=Spec(
                f"connect_lost_{t.name}",
                f"TCP connections lost at that rate ({t.kextless.label})",
                "",
                Compare.ABSOLUTE,
                Target(Op.EQ, 0, Over.WORST),
            )
        )
        rows[t.name] = (rate, lost)
    try:
        for _ in range(ctx.params.heavy_rounds):
            base_rate, base_lost = _rate(ctx, ctx.base)
            for t in ctx.targets:
                k_rate, k_lost = _rate(ctx, t.pair)
                rows[t.name][0].baseline.append(base_rate)
                rows[t.name][0].kextless.append(k_rate)
                rows[t.name][1].baseline.append(base_lost)
                rows[t.name][1].kextless.append(k_lost)
    except Exception as e:
        failed([r for pair in rows.values() for r in pair], e)
    return [r for pair in rows.values() for r in pair]


def _rate(ctx: Ctx, pair: BenchPair) -> tuple[float, float]:
    secs = ctx.params.rate_seconds
    with server(pair, w.SERVER, port := ctx.port()):
        start = time.monotonic() + 0.3  # all four begin together, after Python started
        procs = [pair.py(pair.a, w.CONNECT_RATE, pair.ip4_b, port, start, secs) for _ in range(4)]
        outs = []
        for p in procs:
            try:
                out, err = p.communicate(timeout=secs + 20)
            except subprocess.TimeoutExpired:
                p.kill()
                raise RuntimeError("a connect-rate client did not finish") from None
            if p.returncode != 0:
                raise RuntimeError(f"connect-rate client failed: {err.decode()[-300:]}")
            outs.append(json.loads(out.decode().strip().splitlines()[-1]))
    ctx.raw.setdefault("connect_rate", []).append({"pair": pair.role, "clients": outs})
    ok = sum(o["ok"] for o in outs)
    return ok / max(o["seconds"] for o in outs), float(sum(o["failed"] for o in outs))


def tcp_bulk(ctx: Ctx) -> list[Row]:
    """iperf3 throughput over one accepted TCP connection (a -> b), baseline vs kextless."""
    t = ctx.client
    row = Row(
        spec=Spec(
            "tcp_bulk",
            "TCP bulk throughput, accepted connection (iperf3)",
            "Gbit/s",
            Compare.RATIO,
            Target(Op.GE, 0.95, higher_is_worse=False),
        )
    )
    try:
        if shutil.which("iperf3") is None:
            raise RuntimeError("iperf3 is not installed (Debian: apt-get install iperf3)")
        for _ in range(ctx.params.heavy_rounds):
            row.baseline.append(_iperf(ctx, ctx.base))
            row.kextless.append(_iperf(ctx, t.pair))
    except Exception as e:
        failed([row], e)
    return [row]


def _iperf(ctx: Ctx, pair: BenchPair) -> float:
    data = _iperf_json(ctx, pair)
    bps = float(data["end"]["sum_received"]["bits_per_second"])
    ctx.raw.setdefault("iperf3", []).append(
        {
            "pair": pair.role,
            "bits_per_second": bps,
            "cpu": data["end"].get("cpu_utilization_percent"),
        }
    )
    return bps / 1e9


def _iperf_json(ctx: Ctx, pair: BenchPair, *extra: str) -> dict[str, Any]:
    """One iperf3 run a -> b (a one-off server in b on a fresh port); its JSON report."""
    port = ctx.port()
    srv = pair.popen(pair.b, ["iperf3", "-s", "-1", "-p", port])
    try:
        time.sleep(0.3)
        secs = ctx.params.bulk_seconds
        res = pair.run(
            pair.a,
            ["iperf3", "-c", pair.ip4_b, "-p", port, "-t", secs, "-J", *extra],
            timeout=secs + 20,
        )
        data: dict[str, Any] = json.loads(res.stdout)
        if "error" in data:
            raise RuntimeError(f"iperf3: {data['error']}")
        return data
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.wait(timeout=5)


def udp(ctx: Ctx) -> list[Row]:
    """64-byte UDP blasts on one accepted flow at several offered rates: what passed the divert
    program unexamined (its loss counters, as `kextless status` shows them), and the received
    rate at full speed against the baseline's."""
    t = ctx.client
    tput = Row(
        spec=Spec(
            "udp_throughput",
            "UDP 64-byte throughput, accepted flow (received)",
            "pkt/s",
            Compare.RATIO,
            Target(Op.GE, 0.9, higher_is_worse=False),
        )
    )
    unexamined = {
        rate: Row(
            spec=Spec(
                f"unexamined_{rate or 'max'}",
                "datagrams passed unexamined at "
                + (f"{rate:,} pkt/s offered" if rate else "full speed"),
                "pkts",
                Compare.ABSOLUTE,
                Target(Op.EQ, 0, Over.WORST),
            )
        )
        for rate in ctx.params.udp_rates
    }
    raw: list[dict[str, Any]] = []
    ctx.raw["udp"] = raw
    # A C sender (iperf3) is what can outrun kextless; the Python blast is only the fallback,
    # and then the sender is likely the limit (received = sent shows it in the raw values).
    use_iperf = shutil.which("iperf3") is not None
    try:
        if use_iperf:
            tput.spec = Spec(
                tput.spec.key,
                "UDP 64-byte throughput, accepted flow (iperf3 -u -b 0 -l 64, received)",
                tput.spec.unit,
                tput.spec.compare,
                tput.spec.target,
            )
            for _ in range(ctx.params.heavy_rounds):
                tput.baseline.append(_iperf_udp(ctx, ctx.base))
                tput.kextless.append(_iperf_udp(ctx, t.pair))
        else:
            tput.note = "Python sender, likely the bottleneck: iperf3 not installed"
    except Exception as e:
        failed([tput], e)
    try:
        k = t.kextless
        # The capture reports its counters every 5 s: each wait for a report that counts a
        # kextless blast in full overlaps the next baseline blast.
        since = time.monotonic()
        before: dict[str, float] | None = None
        pending: tuple[int, dict[str, Any], dict[str, Any]] | None = None
        steps = [rate for _ in range(ctx.params.udp_rounds) for rate in ctx.params.udp_rates]
        for rate in [*steps, None]:
            base = _blast(ctx, ctx.base, rate) if rate is not None else {}
            after = k.fresh_counters(since)
            if pending is not None and before is not None:
                p_rate, p_base, p_kext = pending
                delta = {
                    key: after.get(key, 0.0) - before.get(key, 0.0)
                    for key in after
                    if not key.endswith("unix") and after.get(key, 0.0) != before.get(key, 0.0)
                }
                not_examined = sum(delta.get(f"divert.{key}", 0.0) for key in UNEXAMINED_KEYS)
                # With the fail-closed guard, what the divert program let by is dropped there,
                # not passed; without it (no such counter) everything not examined passed.
                guarded = delta.get(f"divert.{GUARD_DROPPED}", 0.0)
                unexamined[p_rate].kextless.append(max(0.0, not_examined - guarded))
                raw.append({"rate": p_rate, "baseline": p_base, "kextless": p_kext,
                            "counters": delta,
                            "guard_counter": f"divert.{GUARD_DROPPED}" in after})  # fmt: skip
                if p_rate == 0 and not use_iperf:
                    tput.baseline.append(p_base["rx_rate"])
                    tput.kextless.append(p_kext["rx_rate"])
            before = after
            if rate is not None:
                pending = (rate, base, _blast(ctx, t.pair, rate))
                since = time.monotonic()
        if raw and not all(r["guard_counter"] for r in raw):
            for row in unexamined.values():
                row.note = "capture reports no guard counter: all not examined count as passed"
    except Exception as e:
        failed([*unexamined.values()] + ([] if use_iperf else [tput]), e)
    return [*unexamined.values(), tput]


def _iperf_udp(ctx: Ctx, pair: BenchPair) -> float:
    """Datagrams per second the iperf3 server received of a 64-byte, unpaced UDP stream."""
    data = _iperf_json(ctx, pair, "-u", "-b", "0", "-l", "64")
    end = data["end"]["sum"]
    received = float(end["packets"]) - float(end["lost_packets"])
    pps = received / float(end["seconds"])
    ctx.raw.setdefault("iperf3_udp", []).append({"pair": pair.role, "pps": pps, **end})
    return pps


def _blast(ctx: Ctx, pair: BenchPair, rate: int) -> dict[str, Any]:
    secs = ctx.params.blast_seconds
    with server(pair, w.UDP_SINK, port := ctx.port(), 10) as sink:
        sent = run_json(pair, w.UDP_BLAST, pair.ip4_b, port, rate, secs, timeout=secs + 20)
        line = _readline(sink, 15.0)
    if not line:
        raise RuntimeError("the UDP sink did not report")
    got = json.loads(line)
    span = (got["last"] or 0) - (got["first"] or 0)
    rx_rate = got["received"] / span if span > 0 else 0.0
    return {**sent, **got, "rx_rate": rx_rate}
