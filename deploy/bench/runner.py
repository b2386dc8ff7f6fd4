"""`kextless bench [--quick] [--out DIR]`: every figure of issue 9's Targets table, measured in
namespaces this command creates and always removes, against a baseline from the same run.

Three namespace pairs with the same shape: `base` (no kextless: the baseline), `client`
(`kextless up --netns A --no-policy`, a bench client answering PermanentAccept at once over the
endpoint) and `policy` (`kextless up --netns A`, the embedded policy accepting). Rounds
alternate baseline / kextless. Writes bench.json (every round's raw values and the summary),
bench.md (the table, also printed) and connect-latency.png to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import msgspec

from kextless.deploy.bench import measures as m
from kextless.deploy.bench.netns import BenchPair
from kextless.deploy.bench.summary import Row, render_markdown, summarise
from kextless.deploy.bench.system import Kextless

#: Run order: idle and memory first, on fresh instances, before traffic grows their caches.
MEASURES: tuple[Callable[[m.Ctx], list[Row]], ...] = (
    m.idle_cpu,
    m.memory,
    m.update_block,
    m.connect_latency,
    m.udp_new_flow,
    m.tcp_bulk,
    m.udp,
    m.connect_rate,
)


def _log(msg: str) -> None:
    print(f"kextless bench: {msg}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    iperf = shutil.which("iperf3")
    iperf_v = ""
    if iperf:
        res = subprocess.run([iperf, "--version"], capture_output=True, text=True, timeout=5)
        iperf_v = res.stdout.splitlines()[0] if res.stdout else ""
    commit = subprocess.run(
        ["git", "-C", str(Path(__file__).resolve().parents[2]), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    ).stdout.strip()
    return {
        "load_average": load_average(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "iperf3": iperf_v,
        "commit": commit,
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def load_average() -> str:
    """/proc/loadavg's 1, 5, 15 minute figures: other work on a shared machine moves every
    figure, so the output says how busy it was."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine_line(info: dict[str, Any]) -> str:
    return f"{info['cpus']} CPUs, {info['cpu_model'] or 'unknown CPU'}, Linux {info['kernel']}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kextless bench",
        description="Measure the hot path against a baseline in throw-away namespaces (root).",
    )
    p.add_argument("--quick", action="store_true", help="fewer rounds, shorter runs (< 1 min)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results"),
        help="output directory (default %(default)s)",
    )
    p.add_argument(
        "--no-policy-instance",
        dest="policy",
        action="store_false",
        help="measure only with a client over the endpoint, not also the embedded policy",
    )
    return p


def _together(calls: list[Callable[[], object]]) -> None:
    """Run the calls in parallel threads (two `up`s take the time of one); the first
    exception, if any, is raised once all finished."""
    errors: list[BaseException] = []

    def run(call: Callable[[], object]) -> None:
        try:
            call()
        except BaseException as e:  # re-raised below, in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if os.geteuid() != 0:
        print("kextless bench: needs root (network namespaces, eBPF)", file=sys.stderr)
        return 2
    params = m.QUICK if args.quick else m.Params()
    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    info = machine()
    pairs: list[BenchPair] = []
    instances: list[Kextless] = []
    rows: list[Row] = []
    problems: list[str] = []
    raw: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kextless-bench-") as tmp:
        try:
            base = BenchPair("base", 0).create()
            pairs.append(base)
            targets = []
            for i, (name, policy) in enumerate((("client", False), ("policy", True))):
                if policy and not args.policy:
                    continue
                pair = BenchPair(name, i + 1).create()
                pairs.append(pair)
                k = Kextless(pair.a, Path(tmp), policy=policy)
                instances.append(k)
                targets.append(m.Target_(name, pair, k))
            for k in instances:
                _log(f"kextless up --netns {k.netns} ({k.label})")
            _together([k.up for k in instances])
            time.sleep(1.0)  # let every actor finish starting before the idle window
            ctx = m.Ctx(params, base, targets, _log, raw)
            for measure in MEASURES:
                t0 = time.monotonic()
                _log(f"{measure.__name__} ...")
                rows += measure(ctx)
                took = time.monotonic() - t0
                raw.setdefault("phase_s", {})[measure.__name__] = round(took, 2)
                _log(f"{measure.__name__} done in {took:.1f} s")
        except KeyboardInterrupt:
            problems.append("interrupted")
            _log("interrupted: cleaning up")
        except Exception as e:
            problems.append(f"set-up failed: {type(e).__name__}: {e}")
            _log(problems[-1])
        finally:
            for k in instances:
                if k.answerer is not None and k.answerer.errors:
                    problems.append(f"client of {k.netns}: {k.answerer.errors[:3]}")
            downs: dict[str, str] = {}

            def down(k: Kextless) -> None:
                downs[k.netns] = k.down()

            _together([functools.partial(down, k) for k in instances])
            problems += [f"kextless down --netns {ns}: {err}" for ns, err in downs.items() if err]
            for pair in pairs:
                pair.close()
    elapsed = time.monotonic() - started
    info["load_average_end"] = load_average()
    for r in rows:
        summarise(r)
    note = (
        f"Machine: {machine_line(info)}; load average {info['load_average']} at the start, "
        f"{info['load_average_end']} at the end; commit {info['commit'] or '?'}; {info['when']}. "
        f"{'Quick' if args.quick else 'Full'} run in {elapsed:.0f} s: values are the median "
        "(min to max) over rounds that alternate baseline / kextless; a ratio or difference is "
        "paired per round. Baseline: the same traffic in an identical namespace pair without "
        'kextless. "worst" targets hold for every round.'
    )
    md = render_markdown(rows, note)
    if problems:
        md += "\nProblems: " + "; ".join(problems) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.md").write_text(md)
    doc = {
        "machine": info,
        "quick": args.quick,
        "params": dataclasses.asdict(params),
        "elapsed_s": elapsed,
        "problems": problems,
        "rows": rows,
        "raw": raw,
    }
    (args.out / "bench.json").write_bytes(msgspec.json.format(msgspec.json.encode(doc)))
    try:
        from kextless.deploy.bench.plot import connect_latency_png

        connect_latency_png(
            raw.get("connect_latency_ms", {}), args.out / "connect-latency.png", machine_line(info)
        )
    except ImportError as e:
        problems.append(f"no plot: {e} (install the bench extra: pip install 'kextless[bench]')")
        (args.out / "bench.md").write_text(md + f"\nNo plot: {e}; pip install 'kextless[bench]'\n")
    except Exception as e:
        problems.append(f"plot failed: {type(e).__name__}: {e}")
        (args.out / "bench.md").write_text(md + f"\nPlot failed: {e}\n")
    print(md)
    _log(f"wrote {args.out}/bench.json, bench.md, connect-latency.png in {elapsed:.0f} s")
    return 1 if problems else 0
