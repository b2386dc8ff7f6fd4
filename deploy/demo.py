"""`kextless demo`: the whole system in a sandbox, with sample traffic, in about a minute.

Two network namespaces joined by a veth pair: `kxd-host`, guarded by a real `kextless up
--netns kxd-host` (the same command a user types, run with this interpreter's kextless), and
`kxd-net`, its "internet", with a web server on several addresses, a bulk sender, a UDP echo
and an upstream resolver. Each sample connection is made by its own named process
(`demo_traffic.py`), so the decisions carry real pids and process names. The demo prints every
decision the policy makes as it happens (RUN/logs/decisions.jsonl, or the policy's log lines
while the policy writes no such file), the bytes kextless counted (RUN/connections.json, when
the policy writes it), then a table comparing what each step should and did get.

Everything it creates (namespaces, the kextless instance, its processes, the rules file) is
removed at the end, also on failure, Ctrl-C or SIGTERM, unless `--keep`. The host's own
interfaces are never touched: the veth is created inside kxd-host and its peer moved to
kxd-net. It refuses to start when its namespaces exist (`--cleanup` removes a kept sandbox).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import msgspec

from kextless.base.rundir import RuntimeDir, default_root

DEFAULT_PREFIX = "kxd-"
#: Addresses inside the sandbox only (namespaces isolate them from the host's).
HOST_V4, NET_V4 = "10.77.0.1", "10.77.0.2"
HOST_V6, NET_V6 = "fd00:77::1", "fd00:77::2"
WEB_V4, WEB_V6 = "10.77.0.80", "fd00:77::80"
BLOCKED_V4, DROPPED_V4 = "10.77.0.66", "10.77.0.99"
UPSTREAM_DNS = "10.77.0.53"
#: The local resolver's answer and the upstream one's: which one the client gets shows
#: whether the query was redirected.
LOCAL_ANSWER, UPSTREAM_ANSWER = WEB_V4, "198.51.100.53"
INBOUND_PORT = 8022
CHAT_PORT = 7007
#: Appended by the reload step: cuts the live chat connection without restarting anything.
RELOAD_RULE = f"""
[[rule]]   # added by the demo's reload step: cuts the live chat to {NET_V4}:{CHAT_PORT}
remote = "{NET_V4}"
remote_port = {CHAT_PORT}
verdict = "PermanentBlock"
"""
BULK_BYTES = 16 * 1024 * 1024
#: veth MACs: fixed, starting 02: (locally administered; the divert library misreads ARP to
#: MACs whose first nibble is 4 or 6, see actors/capture/filters.py).
HOST_MAC, NET_MAC = "02:6b:78:64:00:01", "02:6b:78:64:00:02"

DEMO_RULES = f"""\
# The kextless demo's rules: first match wins, else `default`.
# Change one and save: the policy reloads it (or `kextless reload --netns kxd-host`); new
# rules apply to new connections and, when a verdict changes, to live ones too.
default = "PermanentAccept"

[[rule]]   # an application this machine never lets out, whatever it contacts
process = "demo-tracker"
verdict = "PermanentBlock"

[[rule]]   # DNS, wherever it was sent, goes to the resolver inside kxd-host (127.0.0.1:53)
protocol = "udp"
remote_port = 53
verdict = "RedirectNameServer"

[[rule]]   # a host this machine refuses: the application is told at once (TCP reset)
remote = "{BLOCKED_V4}"
verdict = "PermanentBlock"

[[rule]]   # a host this machine ignores: its packets vanish, the application times out
remote = "{DROPPED_V4}"
verdict = "PermanentDrop"
"""


class DemoError(Exception):
    """The demo cannot run (or could not clean up); the message says what to do."""


#: Ctrl-C, a kill, a closed terminal (SSH gone): each unwinds to the cleanup.
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP: unwind to the cleanup."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ---- what the policy decided ---------------------------------------------------------------


class Seen(msgspec.Struct, frozen=True):
    """One decision, from decisions.jsonl or from a policy log line (then without rule/name)."""

    id: int
    pid: int
    process: str
    direction: str  # outbound | inbound
    protocol: str  # tcp | udp | icmp | icmpv6 | number
    local_ip: str  # plain (no brackets)
    local_port: int
    remote_ip: str
    remote_port: int
    verdict: str
    rule: str = ""
    update: bool = False


_PROTO_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}
#: The policy's decision line (actors/policy/main.py `_describe`), before decisions.jsonl.
_LOG_LINE = re.compile(
    r"id=(?P<id>\d+) pid=(?P<pid>\d+) proto=(?P<proto>\d+) (?P<local>\S+) (?P<arrow>->|<-) "
    r"(?P<remote>\S+) verdict=(?P<verdict>\w+)"
)


def _split_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def parse_log_line(line: str) -> Seen | None:
    """A decision from one policy log line, or None if the line is no decision."""
    m = _LOG_LINE.search(line)
    if m is None:
        return None
    (lip, lport), (rip, rport) = _split_hostport(m["local"]), _split_hostport(m["remote"])
    return Seen(
        id=int(m["id"]),
        pid=int(m["pid"]),
        process="",
        direction="outbound" if m["arrow"] == "->" else "inbound",
        protocol=_PROTO_NAMES.get(int(m["proto"]), m["proto"]),
        local_ip=lip,
        local_port=lport,
        remote_ip=rip,
        remote_port=rport,
        verdict=m["verdict"],
    )


def parse_decision_line(line: str) -> Seen | None:
    """A decision from one decisions.jsonl line (actors/policy/view.Decision), or None."""
    try:
        raw = json.loads(line)
        return Seen(
            id=int(raw["id"]),
            pid=int(raw["pid"]),
            process=str(raw.get("process", "")),
            direction=str(raw["direction"]),
            protocol=str(raw["protocol"]),
            local_ip=str(raw["local_ip"]).strip("[]"),
            local_port=int(raw["local_port"]),
            remote_ip=str(raw["remote_ip"]).strip("[]"),
            remote_port=int(raw["remote_port"]),
            verdict=str(raw["verdict"]),
            rule=str(raw.get("rule", "")),
            update=bool(raw.get("update", False)),
        )
    except (ValueError, KeyError, TypeError):
        return None


class _Tail:
    """New complete lines of a file that may not exist yet (it is appended to, never cut)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def lines(self) -> list[str]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        self.offset += len(data)
        data = self.partial + data
        *whole, self.partial = data.split(b"\n")
        return [w.decode(errors="replace") for w in whole]


class DecisionFeed:
    """Every decision of the instance, once each: decisions.jsonl when the policy writes it
    (with the rule that matched and the process name), else its log lines."""

    def __init__(self, run: RuntimeDir) -> None:
        self.jsonl = _Tail(run.log_dir / "decisions.jsonl")
        self.log = _Tail(run.log_dir / "policy.log")
        self.seen: set[tuple[int, bool, str]] = set()
        self.from_jsonl = False

    def poll(self) -> list[Seen]:
        found: list[Seen] = []
        if self.jsonl.path.exists():
            self.from_jsonl = True
            found = [d for d in map(parse_decision_line, self.jsonl.lines()) if d]
        elif not self.from_jsonl:
            found = [d for d in map(parse_log_line, self.log.lines()) if d]
        fresh = []
        for d in found:
            key = (d.id, d.update, d.verdict)
            if key not in self.seen:
                self.seen.add(key)
                fresh.append(d)
        return fresh


def read_bytes(run: RuntimeDir) -> tuple[float, dict[int, tuple[int, int]]] | None:
    """(taken, {id: (sent, received)}) from the policy's connections.json, None without one."""
    try:
        raw = json.loads((run.path / "connections.json").read_bytes())
        rows = {int(c["id"]): (int(c["sent"]), int(c["received"])) for c in raw["connections"]}
        return float(raw["taken"]), rows
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---- the sandbox ---------------------------------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15)
    if check and res.returncode != 0:
        raise DemoError(f"ip {' '.join(args)}: {res.stderr.strip() or res.returncode}")
    return res


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def kextless_argv() -> list[str]:
    """This interpreter's `kextless`: the installed script beside it, else the module."""
    script = Path(sys.executable).with_name("kextless")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "kextless.deploy.cli"]


@dataclass
class Proc:
    name: str
    ns: str
    popen: subprocess.Popen[str]


@dataclass
class Sandbox:
    """What the demo created, so cleanup removes exactly that."""

    prefix: str
    run_root: Path | None
    work: Path
    namespaces: list[str] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)
    up_started: bool = False

    @property
    def host(self) -> str:
        return f"{self.prefix}host"

    @property
    def net(self) -> str:
        return f"{self.prefix}net"

    @property
    def run(self) -> RuntimeDir:
        return RuntimeDir.for_instance(self.host, self.run_root)

    @property
    def rules(self) -> Path:
        return self.work / "demo-rules.toml"

    @property
    def config(self) -> Path:
        return self.work / "demo.toml"

    def config_text(self) -> str:
        """The demo's configuration file (base/settings.py): what `up --config` reads."""
        root = f'run_root = "{self.run_root.resolve()}"\n' if self.run_root else ""
        return (
            "# kextless demo's settings: kextless up|status|monitor|reload|down --config FILE\n"
            f'[instance]\nnetns = "{self.host}"\n{root}'
            "[verdicts]\ntimeout = 5.0\n"
            "[redirect]  # RedirectNameServer: the resolver inside the guarded namespace\n"
            'nameserver_v4 = "127.0.0.1"\nnameserver_port = 53\n'
            f'[policy]\nrules = "{self.rules}"\n'
        )

    def kextless(self, *args: str) -> list[str]:
        root = ["--run-root", str(self.run_root)] if self.run_root else []
        return [*kextless_argv(), *args, "--netns", self.host, *root]

    def build(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.work / "logs").mkdir(exist_ok=True)
        self.rules.write_text(DEMO_RULES, encoding="utf-8")
        self.config.write_text(self.config_text(), encoding="utf-8")
        for ns in (self.host, self.net):
            _ip("netns", "add", ns)
            self.namespaces.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        # Created inside kxd-host, its peer moved to kxd-net: the host never sees either end.
        _ip("-n", self.host, "link", "add", "kxd0", "address", HOST_MAC, "type", "veth",
            "peer", "name", "kxd1", "address", NET_MAC)  # fmt: skip
        _ip("-n", self.host, "link", "set", "kxd1", "netns", self.net)
        _ip("-n", self.host, "addr", "add", f"{HOST_V4}/24", "dev", "kxd0")
        _ip("-n", self.host, "-6", "addr", "add", f"{HOST_V6}/64", "dev", "kxd0", "nodad")
        _ip("-n", self.net, "addr", "add", f"{NET_V4}/24", "dev", "kxd1")
        _ip("-n", self.net, "-6", "addr", "add", f"{NET_V6}/64", "dev", "kxd1", "nodad")
        for extra in (WEB_V4, BLOCKED_V4, DROPPED_V4, UPSTREAM_DNS):
            _ip("-n", self.net, "addr", "add", f"{extra}/32", "dev", "kxd1")
        _ip("-n", self.net, "-6", "addr", "add", f"{WEB_V6}/128", "dev", "kxd1", "nodad")
        for ns, dev in ((self.host, "kxd0"), (self.net, "kxd1")):
            _ip("-n", ns, "link", "set", dev, "up")

    def start(self, ns: str, name: str, role: str, *args: object) -> Proc:
        """A demo_traffic process NAME in namespace NS, in its own session (Ctrl-C reaches only
        the demo, which then stops it in order); its stderr goes to WORK/logs/NAME.log."""
        argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "kextless.deploy.demo_traffic",
                name, role, *map(str, args)]  # fmt: skip
        with (self.work / "logs" / f"{name}.log").open("a") as err:
            popen = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True
            )
        proc = Proc(name, ns, popen)
        self.procs.append(proc)
        return proc

    def serve(self, ns: str, name: str, role: str, *args: object) -> Proc:
        proc = self.start(ns, name, role, *args)
        line = _readline(proc.popen, 10.0)
        if line.strip() != "ready":
            raise DemoError(f"{name} did not start: {self._log_of(name)}")
        return proc

    def client(self, ns: str, name: str, role: str, *args: object, timeout: float) -> Outcome:
        proc = self.start(ns, name, role, *args)
        try:
            out, _ = proc.popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait(timeout=5)
            return Outcome(proc.popen.pid, {"ok": False, "detail": f"no result in {timeout:g} s"})
        try:
            result = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            result = {"ok": False, "detail": f"crashed: {self._log_of(name)}"}
        return Outcome(proc.popen.pid, result)

    def _log_of(self, name: str) -> str:
        try:
            text = (self.work / "logs" / f"{name}.log").read_text(errors="replace").strip()
        except OSError:
            return "(no log)"
        return text.splitlines()[-1] if text else "(no output)"

    def cleanup(self, say: Callable[[str], None]) -> list[str]:
        """Remove everything this run created; the problems it met (empty: all gone)."""
        problems: list[str] = []
        for proc in self.procs:
            _stop(proc.popen)
        self.procs.clear()
        if self.up_started:
            res = subprocess.run(
                self.kextless("down"), capture_output=True, text=True, timeout=90, env=_env()
            )
            if res.returncode != 0:
                problems.append(f"kextless down: {(res.stderr or res.stdout).strip()}")
            else:  # the instance was the demo's: its run directory and logs go too
                shutil.rmtree(self.run.path, ignore_errors=True)
            self.up_started = False
        for ns in reversed(self.namespaces):
            problems += _kill_namespace_pids(ns)
            if _ip("netns", "del", ns, check=False).returncode != 0 and netns_exists(ns):
                problems.append(f"could not delete namespace {ns}")
        gone = ", ".join(reversed(self.namespaces))
        self.namespaces.clear()
        shutil.rmtree(self.work, ignore_errors=True)
        say(f"cleanup: kextless down, namespaces {gone or '-'} deleted, {self.work} removed")
        return problems


@dataclass(frozen=True)
class Outcome:
    pid: int
    result: dict[str, Any]

    @property
    def local_port(self) -> int:
        local = self.result.get("local") or ["", 0]
        return int(local[1]) if len(local) > 1 else 0


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}


def _readline(popen: subprocess.Popen[str], timeout: float) -> str:
    """One stdout line, or "" after `timeout` (a reader thread: pipes have no timeout)."""
    box: list[str] = []
    reader = threading.Thread(
        target=lambda: box.append(popen.stdout.readline() if popen.stdout else ""), daemon=True
    )
    reader.start()
    reader.join(timeout)
    return box[0] if box else ""


def _stop(popen: subprocess.Popen[str]) -> None:
    if popen.poll() is None:
        popen.terminate()
        try:
            popen.wait(timeout=3)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(timeout=5)
    if popen.stdout:
        popen.stdout.close()


def _kill_namespace_pids(ns: str) -> list[str]:
    """Processes still inside one of the demo's namespaces (a kept sandbox's servers, or a
    leftover) are the demo's own: end them by pid before the namespace goes."""
    res = _ip("netns", "pids", ns, check=False)
    pids = [int(p) for p in res.stdout.split() if p.isdigit()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 3
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)]
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return []


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


# ---- the steps -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    key: str
    what: str  # one line for the user
    ns: str  # "host" or "net": where the client runs
    name: str  # the client's process name
    role: str
    args: tuple[object, ...]
    verdict: str  # expected
    #: Did the application see what `verdict` should do to it?
    behaved: Callable[[dict[str, Any]], bool]
    #: Which decision is this step's, given the client's outcome?
    matches: Callable[[Seen, Outcome], bool]
    timeout: float = 10.0


def _flow(proto: str, remote: str, port: int) -> Callable[[Seen, Outcome], bool]:
    def match(d: Seen, o: Outcome) -> bool:
        return (
            d.direction == "outbound"
            and d.protocol == proto
            and _same_ip(d.remote_ip, remote)
            and d.remote_port == port
            and d.local_port == o.local_port
        )

    return match


def _same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


def steps() -> list[Step]:
    ok: Callable[[dict[str, Any]], bool] = lambda r: bool(r.get("ok"))  # noqa: E731
    return [
        Step("web", f"an HTTP GET to {WEB_V4}:80", "host", "demo-web", "http",
             (WEB_V4, 80, 5), "PermanentAccept", ok, _flow("tcp", WEB_V4, 80)),
        Step("web-v6", f"an HTTP GET to [{WEB_V6}]:80", "host", "demo-web6", "http",
             (WEB_V6, 80, 5), "PermanentAccept", ok, _flow("tcp", WEB_V6, 80)),
        Step("blocked", f"a connection to {BLOCKED_V4}:80, refused by a rule", "host",
             "demo-blocked", "http", (BLOCKED_V4, 80, 5), "PermanentBlock",
             lambda r: bool(r.get("refused")), _flow("tcp", BLOCKED_V4, 80)),
        Step("app-rule", f"demo-tracker's GET to {WEB_V4}:80 (the web step's host), refused "
             "by a per-process rule", "host", "demo-tracker", "http", (WEB_V4, 80, 5),
             "PermanentBlock", lambda r: bool(r.get("refused")), _flow("tcp", WEB_V4, 80)),
        Step("dropped", f"a connection to {DROPPED_V4}:80, dropped by a rule", "host",
             "demo-dropped", "http", (DROPPED_V4, 80, 2), "PermanentDrop",
             lambda r: bool(r.get("timeout")), _flow("tcp", DROPPED_V4, 80)),
        Step("dns", f"a DNS query to {UPSTREAM_DNS}:53, redirected to the local resolver",
             "host", "demo-dns", "dns", (UPSTREAM_DNS, "www.kextless.demo", 3),
             "RedirectNameServer",
             lambda r: r.get("answer") == LOCAL_ANSWER and r.get("peer") == [UPSTREAM_DNS, 53],
             _flow("udp", UPSTREAM_DNS, 53)),
        Step("udp", f"three UDP datagrams to {NET_V4}:5005 and their echoes", "host",
             "demo-udp", "udp", (NET_V4, 5005, 3, 3), "PermanentAccept", ok,
             _flow("udp", NET_V4, 5005)),
        Step("ping", f"an ICMP echo to {NET_V4}", "host", "demo-ping", "ping", (NET_V4, 1, 3),
             "PermanentAccept", ok,
             lambda d, o: d.protocol == "icmp" and d.direction == "outbound"
             and _same_ip(d.remote_ip, NET_V4)),
        Step("inbound", f"kxd-net connects to a service on {HOST_V4}:{INBOUND_PORT}", "net",
             "demo-visitor", "banner", (HOST_V4, INBOUND_PORT, 5), "PermanentAccept", ok,
             lambda d, o: d.direction == "inbound" and d.protocol == "tcp"
             and d.local_port == INBOUND_PORT and d.remote_port == o.local_port),
        Step("bulk", f"a {BULK_BYTES >> 20} MB download from {NET_V4}:9000", "host",
             "demo-bulk", "bulk", (NET_V4, 9000, BULK_BYTES, 20), "PermanentAccept", ok,
             _flow("tcp", NET_V4, 9000), timeout=30),
    ]  # fmt: skip


@dataclass
class Row:
    step: Step
    outcome: Outcome | None = None
    decision: Seen | None = None
    sent_received: tuple[int, int] | None = None

    @property
    def passed(self) -> bool:
        return (
            self.outcome is not None
            and self.decision is not None
            and self.decision.verdict == self.step.verdict
            and self.step.behaved(self.outcome.result)
        )


# ---- output --------------------------------------------------------------------------------


class Screen:
    """Every line the demo prints, from the main thread or the decision tail, one at a time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.names: dict[int, str] = {}  # pid -> process name, for log-line decisions

    def say(self, line: str) -> None:
        """Print one line; a closed terminal (SIGHUP, a dead SSH session) must not stop the
        cleanup that follows, so write errors are dropped."""
        with self.lock, contextlib.suppress(OSError, ValueError):
            print(line, flush=True)

    def process(self, d: Seen) -> str:
        name = d.process or self.names.get(d.pid) or _comm(d.pid)
        return f"{name}[{d.pid}]" if d.pid else "(pid unknown)"

    def decision(self, d: Seen) -> str:
        stamp = time.strftime("%H:%M:%S")
        rule = f"  ({d.rule})" if d.rule else ""
        upd = " UPDATE" if d.update else ""
        return f"    {stamp} {self.process(d):<20} {_conn(d):<48} {d.verdict}{upd}{rule}"


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _addr(ip: str, port: int, proto: str) -> str:
    shown = f"[{ip}]" if ":" in ip else ip
    return shown if proto in ("icmp", "icmpv6") else f"{shown}:{port}"


def _conn(d: Seen) -> str:
    arrow = "->" if d.direction == "outbound" else "<-"
    local, remote = (
        _addr(d.local_ip, d.local_port, d.protocol),
        _addr(d.remote_ip, d.remote_port, d.protocol),
    )
    return f"{d.protocol} {local} {arrow} {remote}"


def human_bytes(n: int) -> str:
    for unit, size in (("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


class Watcher:
    """A thread printing each new decision, and each connection whose byte count grew, as the
    policy reports them; the main thread asks it for a step's decision."""

    def __init__(self, run: RuntimeDir, screen: Screen) -> None:
        self.run = run
        self.screen = screen
        self.feed = DecisionFeed(run)
        self.decisions: list[Seen] = []
        self.bytes_seen: dict[int, tuple[int, int]] = {}
        self.snapshot: tuple[float, dict[int, tuple[int, int]]] | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> Watcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=3)

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            fresh = self.feed.poll()
            snap = read_bytes(self.run)
            with self._cond:
                self.decisions += fresh
                if snap is not None:
                    self.snapshot = snap
                self._cond.notify_all()
            for d in fresh:
                self.screen.say(self.screen.decision(d))
            if snap is not None:
                self._report_bytes(snap[1])

    def _report_bytes(self, rows: dict[int, tuple[int, int]]) -> None:
        known = {d.id: d for d in self.decisions}
        for cid, (sent, recv) in rows.items():
            before = self.bytes_seen.get(cid, (0, 0))
            if (sent, recv) != before and sent + recv - sum(before) >= 1 << 10:
                self.bytes_seen[cid] = (sent, recv)
                d = known.get(cid)
                who = self.screen.process(d) if d else f"id {cid}"
                self.screen.say(
                    f"    {time.strftime('%H:%M:%S')} {who:<20} bytes so far: "
                    f"{human_bytes(sent)} sent, {human_bytes(recv)} received"
                )

    def find(
        self, match: Callable[[Seen], bool], timeout: float, update: bool = False
    ) -> Seen | None:
        """The first decision (or, with `update`, re-decision after a reload) that matches."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for d in self.decisions:
                    if d.update == update and match(d):
                        return d
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def bytes_after(self, cid: int, since: float, timeout: float) -> tuple[int, int] | None:
        """The connection's totals from a snapshot taken after `since` (wall clock)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                snap = self.snapshot
                if snap is not None and snap[0] > since and cid in snap[1]:
                    return snap[1][cid]
                left = deadline - time.monotonic()
                if left <= 0:
                    return snap[1].get(cid) if snap else None
                self._cond.wait(left)


def summary(rows: list[Row], screen: Screen, have_bytes: bool) -> str:
    head = ("step", "process", "connection", "expected", "seen", "bytes sent/recv", "result")
    table = [head]
    for r in rows:
        d = r.decision
        bytes_text = (
            f"{human_bytes(r.sent_received[0])} / {human_bytes(r.sent_received[1])}"
            if r.sent_received
            else ("-" if have_bytes else "n/a")
        )
        detail = str(r.outcome.result.get("detail", "")) if r.outcome else "not run"
        table.append(
            (
                r.step.key,
                screen.process(d) if d else "-",
                _conn(d) if d else "(no decision seen)",
                r.step.verdict,
                d.verdict if d else "-",
                bytes_text,
                f"{'OK' if r.passed else 'FAIL'}  {detail}",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
    lines = []
    for n, row in enumerate(table):
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)]
        lines.append("  " + "  ".join([*cells, row[-1]]))
        if n == 0:
            lines.append("  " + "  ".join("-" * w for w in [*widths, 6]))
    return "\n".join(lines)


# ---- the run -------------------------------------------------------------------------------


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP raise Interrupted in the main thread until the block ends."""

    main = os.getpid()

    def handler(signum: int, _frame: FrameType | None) -> None:
        if os.getpid() != main:  # a forked child (a library's helper): never run our cleanup
            os._exit(128 + signum)
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _signals_deferred(screen: Screen) -> Iterator[None]:
    """During cleanup a second Ctrl-C must not leave half a sandbox: say so, carry on."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        screen.say(f"kextless demo: {signal.Signals(signum).name} ignored while cleaning up")

    old = {s: signal.signal(s, handler) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _up(box: Sandbox, screen: Screen) -> float:
    argv = box.kextless("up", "--config", str(box.config))
    screen.say(f"  $ {' '.join(argv)}")
    t0 = time.monotonic()
    box.up_started = True
    up = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = up.communicate(timeout=120)
    except BaseException:
        _stop(up)
        raise
    if up.returncode != 0:
        raise DemoError(f"kextless up failed (exit {up.returncode}): {(err or out).strip()}")
    for line in out.strip().splitlines():
        screen.say(f"    {line}")
    return time.monotonic() - t0


def _wait_guarded(box: Sandbox, timeout: float = 20.0) -> float:
    """Seconds until `kextless status` shows divert programs on both hooks of every interface
    of kxd-host and the policy's session open: `up` returns once every program is RUNNING,
    which can be a second before the capture has attached (traffic then would pass unasked).
    A subprocess, as a user would run it (status's netlink helper forks; a fork of the demo
    must never run the demo's signal handlers)."""
    t0 = time.monotonic()
    last = "no status yet"
    while time.monotonic() - t0 < timeout:
        res = subprocess.run(
            box.kextless("status", "--json"), capture_output=True, text=True, timeout=30, env=_env()
        )
        try:
            report = json.loads(res.stdout)
            links = report.get("interfaces") or []
            session = ((report.get("broker") or {}).get("session") or {}).get("state")
            bare = [i["name"] for i in links if not (i.get("ingress") and i.get("egress"))]
            if links and not bare and session == "open":
                return time.monotonic() - t0
            last = f"not yet diverted: {', '.join(bare) or '-'}; policy session {session}"
        except (ValueError, AttributeError, KeyError, TypeError):
            last = f"status said: {(res.stderr or res.stdout).strip()[:200]}"
        time.sleep(0.1)
    raise DemoError(f"{box.host} not guarded {timeout:g} s after up ({last})")


def _run_steps(box: Sandbox, screen: Screen, watcher: Watcher) -> list[Row]:
    rows = [Row(s) for s in steps()]
    for row in rows:
        step = row.step
        screen.say(f"  -- {step.key}: {step.what} (expect {step.verdict})")
        ns = box.host if step.ns == "host" else box.net
        outcome = box.client(ns, step.name, step.role, *step.args, timeout=step.timeout)
        screen.names[outcome.pid] = step.name
        row.outcome = outcome
        row.decision = watcher.find(_mine(step, outcome), timeout=3.0)
        mark = "OK" if row.passed else "FAIL"
        screen.say(f"     {mark}: {outcome.result.get('detail', '')}")
    return rows


def reload_step() -> Step:
    return Step(
        "reload",
        f"a live chat to {NET_V4}:{CHAT_PORT}, then a rule blocking it is saved, no restart",
        "host", "demo-chat", "chat", (NET_V4, CHAT_PORT, 15), "PermanentBlock",
        lambda r: bool(r.get("cut")) and int(r.get("echoed", 0)) > 0,
        _flow("tcp", NET_V4, CHAT_PORT), timeout=25,
    )  # fmt: skip


def _run_reload(box: Sandbox, screen: Screen, watcher: Watcher) -> Row:
    """The issue's "done when": a rule written while a connection is live takes effect on
    it without restarting anything (the policy re-decides it and sends UpdateV4)."""
    step = reload_step()
    row = Row(step)
    screen.say(f"  -- {step.key}: {step.what} (expect {step.verdict} on the live connection)")
    proc = box.start(box.host, step.name, step.role, *step.args)
    first = _readline(proc.popen, 10.0)
    try:
        connected = json.loads(first)
    except ValueError:
        connected = {}
    if not connected.get("connected"):
        _stop(proc.popen)
        row.outcome = Outcome(proc.popen.pid, {"ok": False, "detail": "chat never connected"})
        screen.say(f"     FAIL: chat never connected ({box._log_of(step.name)})")
        return row
    screen.names[proc.popen.pid] = step.name
    pre = Outcome(proc.popen.pid, connected)
    accepted = watcher.find(_mine(step, pre), timeout=3.0)
    screen.say(f"     chat is echoing (first decision {accepted.verdict if accepted else '?'}); "
               f"appending to {box.rules.name}:")  # fmt: skip
    for line in RELOAD_RULE.strip().splitlines():
        screen.say(f"        {line}")
    with box.rules.open("a", encoding="utf-8") as f:
        f.write(RELOAD_RULE)
    res = subprocess.run(
        box.kextless("reload"), capture_output=True, text=True, timeout=30, env=_env()
    )
    said = (res.stdout + res.stderr).strip().replace("\n", " / ")
    screen.say(
        f"     $ kextless reload --netns {box.host}: {said or 'exit ' + str(res.returncode)}"
    )
    try:
        out, _ = proc.popen.communicate(timeout=step.timeout)
        result = json.loads(out.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        _stop(proc.popen)
        result = {"ok": False, "detail": f"chat still running {step.timeout:g} s after reload"}
    except (ValueError, IndexError):
        result = {"ok": False, "detail": f"chat crashed: {box._log_of(step.name)}"}
    row.outcome = Outcome(proc.popen.pid, {**result, "local": connected.get("local")})
    row.decision = watcher.find(_mine(step, row.outcome), timeout=3.0, update=True)
    screen.say(f"     {'OK' if row.passed else 'FAIL'}: {result.get('detail', '')}")
    return row


def _mine(step: Step, outcome: Outcome) -> Callable[[Seen], bool]:
    return lambda d: step.matches(d, outcome)


def _collect_bytes(rows: list[Row], watcher: Watcher, since: float) -> bool:
    """Each decided connection's bytes from a snapshot newer than the traffic; False when the
    policy writes no snapshot at all."""
    watcher.bytes_after(-1, since, 2.0)  # wait (briefly) for a snapshot newer than the traffic
    if watcher.snapshot is None:
        return False
    for row in rows:
        if row.decision is not None:
            row.sent_received = watcher.bytes_after(row.decision.id, since, 2.5)
    return True


def run_demo(box: Sandbox, keep: bool) -> int:
    screen = Screen()
    code = 1
    watcher: Watcher | None = None
    t_start = time.monotonic()
    try:
        with _signals_raise():
            screen.say(
                f"kextless demo: {box.host} (guarded by kextless) and {box.net} (its internet), "
                "two network namespaces joined by a veth pair"
            )
            box.build()
            screen.say(
                f"  [1/4] sandbox: {box.host} {HOST_V4} {HOST_V6} <-> {box.net} {NET_V4} "
                f"{NET_V6} (web {WEB_V4} {WEB_V6}, refused {BLOCKED_V4}, ignored "
                f"{DROPPED_V4}, upstream DNS {UPSTREAM_DNS}); rules: {box.rules}"
            )
            for line in DEMO_RULES.splitlines():
                if line and not line.startswith("#"):
                    screen.say(f"        {line}")
            box.serve(box.net, "demo-internet", "internet", UPSTREAM_DNS, UPSTREAM_ANSWER)
            screen.say("  [2/4] kextless up")
            took = _up(box, screen)
            guarded = _wait_guarded(box)
            screen.say(
                f"    up in {took:.1f} s; every interface of {box.host} diverted and the "
                f"policy connected {guarded:.1f} s later (kextless status)"
            )
            box.serve(box.host, "demo-resolver", "resolver", "127.0.0.1", 53, LOCAL_ANSWER)
            box.serve(box.host, "demo-service", "inbound-server", INBOUND_PORT)
            for proc in box.procs:
                screen.names[proc.popen.pid] = proc.name
            screen.say("  [3/4] traffic; every decision as the policy makes it:")
            watcher = Watcher(box.run, screen).start()
            since = time.time()
            rows = _run_steps(box, screen, watcher)
            rows.append(_run_reload(box, screen, watcher))
            have_bytes = _collect_bytes(rows, watcher, since)
            watcher.stop()
            screen.say("  [4/4] summary")
            screen.say(summary(rows, screen, have_bytes))
            if not have_bytes:
                screen.say(
                    "  (bytes n/a: the policy wrote no connections.json, so kextless's "
                    "per-connection byte counts were not available)"
                )
            passed = sum(r.passed for r in rows)
            screen.say(
                f"  {passed}/{len(rows)} steps behaved as expected "
                f"({time.monotonic() - t_start:.0f} s)"
            )
            code = 0 if passed == len(rows) else 1
    except Interrupted as exc:
        screen.say(f"kextless demo: {exc} - cleaning up")
        code = 128 + exc.signum
        keep = False
    except DemoError as exc:
        screen.say(f"kextless demo: {exc}")
        code = 1
        keep = False
    finally:
        if watcher is not None:
            watcher.stop()
        with _signals_deferred(screen):
            if keep:
                _print_keep(box, screen)
            else:
                problems = box.cleanup(screen.say)
                for p in problems:
                    screen.say(f"kextless demo: cleanup: {p}")
                if problems:
                    code = code or 1
    return code


def _print_keep(box: Sandbox, screen: Screen) -> None:
    flags = f" --run-root {box.run_root}" if box.run_root else ""
    again = flags if box.prefix == DEFAULT_PREFIX else f"{flags} --prefix {box.prefix}"
    ns = f"--netns {box.host}{flags}"
    traffic = f"ip netns exec {box.host} {sys.executable} -m kextless.deploy.demo_traffic"
    screen.say(
        f"""
The sandbox keeps running (--keep). {box.net} serves HTTP on {WEB_V4} and [{WEB_V6}], bulk on
{NET_V4}:9000, UDP echo on :5005, line echo on :{CHAT_PORT} and DNS on {UPSTREAM_DNS}.
  kextless monitor {ns}     # every connection: process, verdict, rule, bytes
  kextless status {ns}
Anything run with `ip netns exec {box.host} ...` is decided by kextless now, e.g.
  {traffic} my-web http {WEB_V4} 80 5
A rule on a live connection: start a chat (a line every 0.2 s for 10 minutes)
  {traffic} my-chat chat {WEB_V4} {CHAT_PORT} 600
then append to {box.rules} and save:
  [[rule]]
  process = "my-chat"
  verdict = "PermanentBlock"
The policy reloads the file (or: kextless reload {ns}) and the chat is cut.
Decisions: {box.run.log_dir}/decisions.jsonl; settings: {box.config}
(every kextless command above also takes --config {box.config}).
Remove it all:  kextless demo --cleanup{again}
  (by hand: kextless down {ns}; ip netns del {box.host}; ip netns del {box.net})"""
    )


def cleanup_only(box: Sandbox) -> int:
    """`--cleanup`: remove a kept (or half-removed) sandbox with this prefix."""
    screen = Screen()
    box.namespaces = [ns for ns in (box.host, box.net) if netns_exists(ns)]
    box.up_started = box.run.path.exists()
    with _signals_deferred(screen):
        problems = box.cleanup(screen.say)
    for p in problems:
        screen.say(f"kextless demo --cleanup: {p}")
    return 1 if problems else 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kextless demo",
        description="Run kextless in a sandbox of two network namespaces, drive sample "
        "traffic through it and show every decision (root; about a minute). Removes "
        "everything afterwards, also on Ctrl-C.",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="leave the sandbox running and print commands to try on it",
    )
    p.add_argument(
        "--cleanup",
        action="store_true",
        help="remove a sandbox left by --keep (or by a killed demo) and exit",
    )
    p.add_argument(
        "--prefix",
        default=DEFAULT_PREFIX,
        metavar="P",
        help=f"namespace name prefix (default {DEFAULT_PREFIX!r}: "
        f"{DEFAULT_PREFIX}host, {DEFAULT_PREFIX}net)",
    )
    p.add_argument("--run-root", type=Path, metavar="DIR",
                   help=f"kextless's run root (default {default_root()})")  # fmt: skip
    return p


def demo_main(argv: list[str]) -> int:
    """`kextless demo ARGS`: 0 when every step behaved as expected, 1 when one did not or
    something failed, 2 for bad usage, 128+signal when interrupted (after cleaning up)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,20}", args.prefix):
        print("kextless demo: --prefix: lower-case letters, digits and '-' only", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("kextless demo: needs root (it creates network namespaces)", file=sys.stderr)
        return 2
    if shutil.which("ip") is None:
        print("kextless demo: needs iproute2's `ip`", file=sys.stderr)
        return 2
    root: Path | None = args.run_root
    work = (root or default_root()) / f"{args.prefix}demo"
    box = Sandbox(args.prefix, root, work)
    if args.cleanup:
        return cleanup_only(box)
    there = [ns for ns in (box.host, box.net) if netns_exists(ns)]
    if there:
        print(
            f"kextless demo: {', '.join(there)} already exists (a kept or running demo?); "
            f"remove it with `kextless demo --cleanup"
            f"{' --prefix ' + args.prefix if args.prefix != DEFAULT_PREFIX else ''}"
            f"{' --run-root ' + str(root) if root else ''}`",
            file=sys.stderr,
        )
        return 2
    return run_demo(box, args.keep)


if __name__ == "__main__":
    sys.exit(demo_main(sys.argv[1:]))
