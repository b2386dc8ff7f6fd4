"""`kextless run policy`: the built-in decision maker, a Portmaster-style client of the broker.

It does what Portmaster's kext handler does (portmaster-client.md §2-§5), with a rules file
instead of a firewall: open the device, check the version, one reader thread answers every
connection info with one verdict, other threads write GetLogs and GetBandwidthStats every
second and CleanEndedConnections every 30 s, and Shutdown goes out on exit. The rules reload
on a change of the file and on SIGHUP (`kextless reload`); live connections whose verdict
changes get UpdateV4/V6. It keeps a bounded connection table (process, verdict, rule, bytes)
and tells the monitor through RUN/connections.json and RUN/logs/decisions.jsonl.
`kextless up --no-policy` leaves it out so an external client can answer instead.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from kextless.actors.policy.procfacts import FactsCache
from kextless.actors.policy.rules import (
    DEFAULT_RULES_FILE,
    Flow,
    Policy,
    RulesError,
    flow_of,
    load,
)
from kextless.actors.policy.table import (
    Change,
    ConnectionTable,
    Row,
    direction_name,
    protocol_name,
)
from kextless.actors.policy.view import (
    DECISIONS_FILE,
    SNAPSHOT_FILE,
    Decision,
    DecisionFile,
    Snapshot,
    bracketed,
    write_snapshot,
)
from kextless.base import logs
from kextless.base.heartbeat import EVERY_NS, Heartbeat
from kextless.base.rundir import RuntimeDir
from kextless.base.security import UnsafePath
from kextless.base.settings import Settings, SettingsError, load_settings
from kextless.broker.client import KextClient, KextEOF, KextError, KextTimeout, load_curve_certs
from kextless.protocol.commands import UpdateV4Command, UpdateV6Command, encode_command
from kextless.protocol.enums import Severity, Verdict
from kextless.protocol.infos import (
    BandwidthStatsV4,
    BandwidthStatsV6,
    ConnectionEndEventV4,
    ConnectionEndEventV6,
    ConnectionIpv4,
    ConnectionIpv6,
    LogLine,
)

log = logging.getLogger("policy")

#: Decisions logged one line each per second; past that a storm's decisions are counted and
#: summed up in one line a second (formatting a line cost more than the decision itself).
DECISION_LINES_PER_S = 20
CLEAN_ENDED_EVERY_S = 30.0

_LOG_LEVELS: dict[int, int] = {
    Severity.DEBUG: logging.DEBUG,
    Severity.INFO: logging.INFO,
    Severity.WARNING: logging.WARNING,
    Severity.ERROR: logging.ERROR,
    Severity.CRITICAL: logging.CRITICAL,
}


def _describe(info: ConnectionIpv4 | ConnectionIpv6) -> str:
    f = flow_of(info)
    arrow = "->" if info.direction == 0 else "<-"
    return (
        f"id={info.id} pid={info.process_id} proto={info.protocol} "
        f"{f.local_ip}:{info.local_port} {arrow} {f.remote_ip}:{info.remote_port}"
    )


class DecisionLog:
    """One INFO line per decision up to `per_s` a second, then counts: `tick()` (each second,
    from the ticker) logs what was not logged line by line. Nothing formatted past the limit."""

    def __init__(self, per_s: int = DECISION_LINES_PER_S) -> None:
        self.per_s = per_s
        self.lines = 0
        self.unlogged: dict[str, int] = {}
        self._lock = threading.Lock()  # decided() and tick() run in different threads

    def decided(
        self, info: ConnectionIpv4 | ConnectionIpv6, verdict: Verdict, rule: str = ""
    ) -> None:
        with self._lock:
            line = self.lines < self.per_s
            if line:
                self.lines += 1
            else:
                name = verdict.kext_name
                self.unlogged[name] = self.unlogged.get(name, 0) + 1
        if line:
            by = f' rule="{rule}"' if rule else ""
            log.info("%s verdict=%s%s", _describe(info), verdict.kext_name, by)

    def tick(self) -> None:
        with self._lock:
            unlogged, self.unlogged = self.unlogged, {}
            self.lines = 0
        if unlogged:
            counts = " ".join(f"{k}={v}" for k, v in sorted(unlogged.items()))
            n = sum(unlogged.values())
            log.info("%d more decision(s) in the last second, not logged one by one: %s", n, counts)


#: Infos worked through under one progress mark (Progress.working): a chunk takes well under a
#: millisecond, so a healthy policy never looks stuck however large a read is.
PROGRESS_CHUNK = 256


class Progress:
    """What loop progress means for a process whose threads wait on the broker.

    The reader parks in a read without a timeout and every command waits for the broker's
    reply: waiting on the broker is not a hang of ours (a hung broker is the watchdog's
    business; killing the policy too would only add a restart). So a thread marks only its
    own work (`with progress.working():`), and the process has progressed up to the start
    of its oldest unfinished piece of work, or up to now when no thread is working. A
    beater thread writes that to the heartbeat: a SIGSTOP stops the beater too, and a thread
    stuck in its own work (a deadlock, a runaway loop) holds the stamp where the work began.
    """

    def __init__(self) -> None:
        self._since: dict[int, int] = {}  # thread ident -> monotonic ns its work started
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        key = threading.get_ident()
        with self._lock:
            self._since[key] = time.monotonic_ns()
        try:
            yield
        finally:
            with self._lock:
                self._since.pop(key, None)

    def progress_ns(self, now_ns: int) -> int:
        with self._lock:
            return min([now_ns, *self._since.values()])


def decision(row: Row, wall: float, update: bool = False, flow: Flow | None = None) -> Decision:
    """The log line for `row`'s decision; `flow` is the info's own (an ICMP echo and its reply
    share one row, keyed local side first, but go opposite ways)."""
    f, p = flow or row.flow, row.facts
    return Decision(
        time=wall,
        id=row.id,
        pid=p.pid,
        process=p.name,
        exe=p.exe,
        user=p.user,
        direction=direction_name(f.direction),
        protocol=protocol_name(f.protocol),
        local_ip=bracketed(str(f.local_ip)),
        local_port=f.local_port,
        remote_ip=bracketed(str(f.remote_ip)),
        remote_port=f.remote_port,
        rule=row.rule,
        verdict=row.verdict.kext_name,
        update=update,
    )


def update_command(change: Change) -> bytes:
    protocol, local_ip, local_port, remote_ip, remote_port = change.row.key
    cls = UpdateV6Command if change.row.v6 else UpdateV4Command
    return encode_command(
        cls(protocol, local_ip, local_port, remote_ip, remote_port, change.verdict)
    )


class PolicyRunner:
    """The session loop (the one reader) plus its writer threads; see the module docstring.

    `self._lock` covers the policy and the table, and is held from a decision until its
    verdict is written, and from a reload's re-decision until its Updates are written: an
    Update can never overtake the Verdict of the connection it changes."""

    def __init__(
        self,
        endpoint: str,
        policy: Policy,
        *,
        rules_file: Path | None = None,
        run_dir: Path | None = None,
        watch: bool = False,
        table: ConnectionTable | None = None,
        curve: tuple[bytes, tuple[bytes, bytes]] | None = None,
    ) -> None:
        """`curve`: (server public key, (our public, our secret)) for a tcp:// endpoint."""
        self.endpoint = endpoint
        self.curve = curve
        self.policy = policy
        self.rules_file = rules_file
        self.watch = watch and rules_file is not None
        self.table = table or ConnectionTable()
        self.stopping = threading.Event()
        self.progress = Progress()
        self.heartbeat = Heartbeat(run_dir, "policy") if run_dir is not None else None
        self.decisions = DecisionLog()
        self.facts = FactsCache()
        self.rules_loaded = time.time()
        self.rules_error = ""
        self.reloads = 0
        self._lock = threading.Lock()
        self._client: KextClient | None = None
        self._session_over: threading.Event | None = None
        self._reload_wanted = threading.Event()
        self._reload_why = ""
        self.snapshot_path: Path | None = None
        self.decision_file: DecisionFile | None = None
        if run_dir is not None:
            (run_dir / "logs").mkdir(parents=True, exist_ok=True, mode=0o700)
            self.snapshot_path = run_dir / SNAPSHOT_FILE
            self.decision_file = DecisionFile(run_dir / "logs" / DECISIONS_FILE)

    # ---- control from other threads ---------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM: the ticker sends Shutdown and closes the session; the parked read ends."""
        self.stopping.set()
        over = self._session_over
        if over is not None:
            over.set()

    def request_reload(self, why: str) -> None:
        """SIGHUP or a file change: the reloader thread does the work (never a signal handler)."""
        self._reload_why = why
        self._reload_wanted.set()

    def reload(self, why: str = "requested") -> bool:
        """Load the rules file again; on success re-decide the live connections and Update
        those whose verdict changed. A bad file is refused and the last good rules stay."""
        path = self.rules_file or DEFAULT_RULES_FILE
        try:
            with self.progress.working():
                policy = load(path)
        except RulesError as exc:
            self.rules_error = str(exc)
            log.error("rules reload (%s) refused, keeping the last good rules: %s", why, exc)
            return False
        wall = time.time()
        with self._lock:
            with self.progress.working():
                self.policy = policy
                changes = self.table.reload(policy)
            client = self._client
            errors: list[KextError | None] = []
            if changes and client is not None:
                try:
                    errors = client.write_many([update_command(c) for c in changes])
                except KextError as exc:
                    errors = [exc] * len(changes)
            self._write_decisions([decision(c.row, wall, update=True) for c in changes])
        self.rules_error = ""
        self.rules_loaded = wall
        self.reloads += 1
        failed = [e for e in errors if e is not None]
        log.info(
            "rules reloaded (%s) from %s: %d rule(s), default %s; %d live connection(s) "
            "changed verdict%s",
            why,
            path,
            len(policy.rules),
            policy.default.kext_name,
            len(changes),
            "" if client is not None or not changes else " (no session: no Update sent)",
        )
        for c in changes[:DECISION_LINES_PER_S]:
            r = c.row
            log.info(
                'update %s %s:%d -> %s:%d %s -> %s rule="%s"',
                protocol_name(r.key[0]),
                r.flow.local_ip,
                r.flow.local_port,
                r.flow.remote_ip,
                r.flow.remote_port,
                c.old.kext_name,
                c.verdict.kext_name,
                c.rule,
            )
        if failed:
            log.warning("%d Update(s) refused by the broker, first: %s", len(failed), failed[0])
        return True

    # ---- threads ----------------------------------------------------------------------------

    def _write_decisions(self, decisions: list[Decision]) -> None:
        if self.decision_file is not None and decisions:
            try:
                self.decision_file.write(decisions)
            except OSError as exc:
                log.warning("cannot write %s: %s", self.decision_file.path, exc.strerror)

    def snapshot(self) -> Snapshot:
        with self._lock:
            rows = self.table.view()
            dropped = self.table.dropped
        return Snapshot(
            taken=time.time(),
            rules_file=str(self.rules_file or DEFAULT_RULES_FILE),
            rules_loaded=self.rules_loaded,
            rules_error=self.rules_error,
            connections=rows,
            dropped_rows=dropped,
        )

    def _housekeeping(self) -> None:
        """Each second, session or not: expire ended rows, write the snapshot."""
        while not self.stopping.wait(1.0):
            with self._lock, self.progress.working():
                self.table.expire(time.monotonic_ns())
            if self.snapshot_path is not None:
                try:
                    write_snapshot(self.snapshot_path, self.snapshot())
                except OSError as exc:
                    log.warning("cannot write %s: %s", self.snapshot_path, exc.strerror)

    def _beater(self) -> None:
        """The heartbeat (see Progress), until the process exits: also while it shuts down."""
        assert self.heartbeat is not None
        while True:
            self.heartbeat.beat(self.progress.progress_ns(time.monotonic_ns()))
            time.sleep(EVERY_NS / 1e9)

    def _reloader(self) -> None:
        while not self.stopping.is_set():
            if self._reload_wanted.wait(0.5):
                self._reload_wanted.clear()
                self.reload(self._reload_why)

    def _watcher(self) -> None:
        """Watch the rules file's directory, not its inode: editors save by rename."""
        import watchfiles  # the only user; keeps `kextless run` start-up lean elsewhere

        logging.getLogger("watchfiles").setLevel(logging.WARNING)  # "1 change detected"

        assert self.rules_file is not None
        target = self.rules_file.resolve()
        name = target.name

        def wanted(_change: watchfiles.Change, path: str) -> bool:
            return Path(path).name == name

        while not self.stopping.is_set():
            try:
                for _ in watchfiles.watch(
                    target.parent,
                    watch_filter=wanted,
                    stop_event=self.stopping,
                    recursive=False,
                    debounce=400,
                    step=100,
                    raise_interrupt=False,
                ):
                    self.request_reload("file changed")
            except (OSError, RuntimeError) as exc:  # the directory went away, inotify limits
                log.warning("cannot watch %s (%s); retrying in 5 s", target.parent, exc)
                self.stopping.wait(5.0)

    def _tickers(self, client: KextClient, session_over: threading.Event) -> None:
        next_clean = time.monotonic() + CLEAN_ENDED_EVERY_S
        while not session_over.wait(1.0):
            self.decisions.tick()
            try:
                client.get_logs()
                client.get_bandwidth_stats()
                if time.monotonic() >= next_clean:
                    client.clean_ended_connections()
                    next_clean = time.monotonic() + CLEAN_ENDED_EVERY_S
            except KextError as exc:
                log.warning("ticker command failed: %s", exc)
        if self.stopping.is_set():
            # As Portmaster stops: Shutdown (the parked read gets EOF, pending packets become
            # PermanentBlock), then close. The read waits without a timeout, so one of the two
            # is what ends it.
            try:
                client.shutdown()
            except KextError as exc:
                log.warning("Shutdown failed: %s", exc)
            client.close()

    def _handle(self, client: KextClient, batch: list[object]) -> None:
        """One read's infos: every connection gets its verdict, pipelined in one round trip."""
        verdicts: list[tuple[int, Verdict]] = []
        decided: list[tuple[Row, Flow]] = []
        wall = time.time()
        with self._lock:
            # Our own work, the verdicts' round trip aside (waiting on the broker is no hang),
            # marked per chunk: one read can bring thousands of infos, which on a CPU the
            # traffic saturates may take longer than the watchdog's 1 s to work through
            # (measured: a flood's read got the policy killed) while every chunk progresses.
            for start in range(0, len(batch), PROGRESS_CHUNK):
                with self.progress.working():
                    self._decide(batch[start : start + PROGRESS_CHUNK], wall, verdicts, decided)
            errors = client.send_verdicts(verdicts) if verdicts else []
            for start in range(0, len(decided), PROGRESS_CHUNK):
                with self.progress.working():
                    chunk = decided[start : start + PROGRESS_CHUNK]
                    self._write_decisions([decision(r, wall, flow=f) for r, f in chunk])
        for err in errors:
            if err is not None:
                raise err  # as a single write's failure would

    def _decide(
        self,
        infos: list[object],
        wall: float,
        verdicts: list[tuple[int, Verdict]],
        decided: list[tuple[Row, Flow]],
    ) -> None:
        """Match `infos` against the rules (the caller holds the lock); verdicts and table rows
        are appended to `verdicts` and `decided`."""
        for one in infos:
            if isinstance(one, ConnectionIpv4 | ConnectionIpv6):
                facts = self.facts.get(one.process_id)
                flow = flow_of(one)
                verdict, rule = self.policy.match(flow, facts)
                verdicts.append((one.id, verdict))
                row = self.table.decided(one, flow, facts, verdict, rule, wall)
                decided.append((row, flow))
                self.decisions.decided(one, verdict, rule)
            elif isinstance(one, ConnectionEndEventV4 | ConnectionEndEventV6):
                self.table.ended(one, time.monotonic_ns(), wall)
            elif isinstance(one, BandwidthStatsV4 | BandwidthStatsV6):
                self.table.bandwidth(one)
            elif isinstance(one, LogLine):
                level = _LOG_LEVELS.get(one.severity)
                if level is not None:
                    log.log(level, "kext: %s", one.line)

    def _session(self) -> None:
        server_key, keypair = self.curve if self.curve is not None else (None, None)
        # A CURVE handshake the broker refuses is silence, not an error: each request then
        # times out (KextTimeout, a KextError) and run() retries with backoff.
        with KextClient(
            self.endpoint, curve_server_key=server_key, curve_keypair=keypair
        ) as client:
            version = client.version()
            log.info(
                "session open at %s, kext interface %s", self.endpoint, ".".join(map(str, version))
            )
            session_over = self._session_over = threading.Event()
            if self.stopping.is_set():
                return
            ticker = threading.Thread(
                target=self._tickers, args=(client, session_over), daemon=True, name="ticker"
            )
            ticker.start()
            self._client = client
            try:
                while not self.stopping.is_set():
                    try:
                        # No timeout: idle, nothing is sent; stop() ends it (KextEOF).
                        info = client.recv_info()
                    except KextTimeout:
                        continue
                    except KextEOF:
                        break
                    # The whole read at once: its verdicts leave pipelined (one round trip).
                    self._handle(client, [info, *client.take_read()])
            finally:
                with self._lock:
                    self._client = None
                session_over.set()
                ticker.join(timeout=7)  # before the sockets close under it

    def run(self) -> None:
        helpers = [self._housekeeping, self._reloader] + ([self._watcher] if self.watch else [])
        if self.heartbeat is not None:
            helpers.append(self._beater)
        for target in helpers:
            threading.Thread(target=target, daemon=True, name=target.__name__).start()
        backoff = 0.2
        try:
            while not self.stopping.is_set():
                try:
                    self._session()
                    backoff = 0.2
                    if not self.stopping.is_set():
                        log.info("session ended (shutdown); reopening")
                except KextError as exc:
                    log.warning("broker said: %s; retrying in %.1fs", exc, backoff)
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            if self.snapshot_path is not None:
                with contextlib.suppress(OSError):
                    write_snapshot(self.snapshot_path, self.snapshot())
            if self.decision_file is not None:
                self.decision_file.close()


def _connect_url(endpoint: str | None) -> str | None:
    """Where to reach a configured broker endpoint: a wildcard bind address means loopback."""
    if endpoint is None or not endpoint.startswith("tcp://"):
        return endpoint
    host, _, port = endpoint[len("tcp://") :].rpartition(":")
    if host in ("*", "0.0.0.0"):
        return f"tcp://127.0.0.1:{port}"
    if host in ("[::]", "::"):
        return f"tcp://[::1]:{port}"
    return endpoint


def _curve(
    endpoint: str, args: argparse.Namespace, settings: Settings
) -> tuple[bytes, tuple[bytes, bytes]] | None:
    """The CURVE keys a tcp:// endpoint needs (the broker refuses tcp without them), from the
    flags or the configuration file; ValueError naming what is missing or unsafe."""
    server: Path | None = args.curve_server_public
    client: Path | None = args.curve_client_secret
    if not endpoint.startswith("tcp://"):
        if server is not None or client is not None:
            raise ValueError("--curve-* options only apply to a tcp:// endpoint")
        return None
    if server is None and settings.instance.curve_server_secret is not None:
        server = Path(settings.instance.curve_server_secret)
    if client is None and settings.policy.curve_client_secret is not None:
        client = Path(settings.policy.curve_client_secret)
    if server is None or client is None:
        raise ValueError(
            f"{endpoint}: a tcp endpoint needs CURVE: --curve-server-public FILE and "
            "--curve-client-secret FILE (or instance.curve_server_secret and "
            "policy.curve_client_secret in --config)"
        )
    return load_curve_certs(server, client)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kextless run policy", description=__doc__)
    p.add_argument("--config", type=Path, help="the kextless configuration file (TOML)")
    p.add_argument("--run-dir", type=Path, help="runtime directory (default: the instance's)")
    p.add_argument("--endpoint", help="the broker's client endpoint (default: RUN/kext.sock)")
    p.add_argument(
        "--rules", type=Path, help=f"TOML rules file (default: the shipped {DEFAULT_RULES_FILE})"
    )
    p.add_argument("--no-watch", action="store_true", help="reload on SIGHUP only")
    p.add_argument(
        "--curve-server-public",
        type=Path,
        help="tcp:// endpoint: a zmq.auth certificate holding the broker's public key (its "
        "public or secret file; default: instance.curve_server_secret of --config)",
    )
    p.add_argument(
        "--curve-client-secret",
        type=Path,
        help="tcp:// endpoint: the policy's own zmq.auth secret certificate, whose public key "
        "the broker's --curve-clients holds (default: policy.curve_client_secret of --config)",
    )
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = p.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        logs.setup("policy", args.log_level or "INFO")
        log.error("%s", exc)
        return 2
    logs.setup("policy", args.log_level or settings.log.level)
    rules: Path | None = args.rules
    if rules is None and settings.policy.rules is not None:
        rules = Path(settings.policy.rules)
        if not rules.is_absolute() and args.config is not None:
            rules = args.config.parent / rules  # relative to the file that names it
    try:
        policy = load(rules or DEFAULT_RULES_FILE)
    except RulesError as exc:
        log.error("%s", exc)
        return 2
    if args.run_dir is not None:
        run = RuntimeDir(args.run_dir)
    else:
        root = Path(settings.instance.run_root) if settings.instance.run_root else None
        run = RuntimeDir.for_instance(settings.instance.netns, root)
    try:
        run.create()  # the rules' decisions and the monitor's files live there
    except (UnsafePath, OSError) as exc:
        log.error("%s", exc)
        return 2
    endpoint = args.endpoint or _connect_url(settings.instance.endpoint) or run.kext_endpoint
    try:
        curve = _curve(endpoint, args, settings)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    runner = PolicyRunner(
        endpoint,
        policy,
        rules_file=rules,
        run_dir=run.path,
        watch=settings.policy.watch and not args.no_watch,
        curve=curve,
    )
    signal.signal(signal.SIGTERM, lambda *_: runner.stop())
    signal.signal(signal.SIGINT, lambda *_: runner.stop())
    signal.signal(signal.SIGHUP, lambda *_: runner.request_reload("SIGHUP"))
    log.info(
        "%d rule(s) from %s, default %s%s",
        len(policy.rules),
        rules or DEFAULT_RULES_FILE,
        policy.default.kext_name,
        ", watching it" if runner.watch else "",
    )
    if curve is not None:
        log.info("CURVE client of %s", endpoint)
    runner.run()
    return 0
