"""`kextless run policy`: the built-in decision maker, a Portmaster-style client of the broker.

It does what Portmaster's kext handler does, with a rules file instead of a firewall: open the
device, check the version, answer every connection info with one verdict, fetch logs every
second and clean ended connections every 30 s. `kextless up --no-policy` leaves it out so an
external client can answer instead.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
import threading
import time
from pathlib import Path

from kextless.actors.policy.rules import Policy, RulesError, load
from kextless.base import logs
from kextless.base.rundir import RuntimeDir
from kextless.broker.client import KextClient, KextEOF, KextError, KextTimeout
from kextless.protocol.enums import Severity, Verdict
from kextless.protocol.infos import ConnectionIpv4, ConnectionIpv6, LogLine

log = logging.getLogger("policy")

#: Decisions logged one line each per second; past that a storm's decisions are counted and
#: summed up in one line a second (formatting a line cost more than the decision itself).
DECISION_LINES_PER_S = 20

_LOG_LEVELS: dict[int, int] = {
    Severity.DEBUG: logging.DEBUG,
    Severity.INFO: logging.INFO,
    Severity.WARNING: logging.WARNING,
    Severity.ERROR: logging.ERROR,
    Severity.CRITICAL: logging.CRITICAL,
}


def _describe(info: ConnectionIpv4 | ConnectionIpv6) -> str:
    arrow = "->" if info.direction == 0 else "<-"
    local = ipaddress.ip_address(info.local_ip)
    remote = ipaddress.ip_address(info.remote_ip)
    return (
        f"id={info.id} pid={info.process_id} proto={info.protocol} "
        f"{local}:{info.local_port} {arrow} {remote}:{info.remote_port}"
    )


class DecisionLog:
    """One INFO line per decision up to `per_s` a second, then counts: `tick()` (each second,
    from the ticker) logs what was not logged line by line. Nothing formatted past the limit."""

    def __init__(self, per_s: int = DECISION_LINES_PER_S) -> None:
        self.per_s = per_s
        self.lines = 0
        self.unlogged: dict[str, int] = {}
        self._lock = threading.Lock()  # decided() and tick() run in different threads

    def decided(self, info: ConnectionIpv4 | ConnectionIpv6, verdict: Verdict) -> None:
        with self._lock:
            line = self.lines < self.per_s
            if line:
                self.lines += 1
            else:
                name = verdict.kext_name
                self.unlogged[name] = self.unlogged.get(name, 0) + 1
        if line:
            log.info("%s verdict=%s", _describe(info), verdict.kext_name)

    def tick(self) -> None:
        with self._lock:
            unlogged, self.unlogged = self.unlogged, {}
            self.lines = 0
        if unlogged:
            counts = " ".join(f"{k}={v}" for k, v in sorted(unlogged.items()))
            n = sum(unlogged.values())
            log.info("%d more decision(s) in the last second, not logged one by one: %s", n, counts)


class PolicyRunner:
    def __init__(self, endpoint: str, policy: Policy) -> None:
        self.endpoint = endpoint
        self.policy = policy
        self.stopping = threading.Event()
        self.decisions = DecisionLog()
        self._session_over: threading.Event | None = None

    def stop(self) -> None:
        """SIGTERM: the ticker closes the session, which ends the parked read with EOF."""
        self.stopping.set()
        over = self._session_over
        if over is not None:
            over.set()

    def _tickers(self, client: KextClient, session_over: threading.Event) -> None:
        next_clean = time.monotonic() + 30
        while not session_over.wait(1.0):
            self.decisions.tick()
            try:
                client.get_logs()
                if time.monotonic() >= next_clean:
                    client.clean_ended_connections()
                    next_clean = time.monotonic() + 30
            except KextError as exc:
                log.warning("ticker command failed: %s", exc)
        if self.stopping.is_set():
            # The read waits without a timeout (no request every half second when idle): the
            # close is what ends it, as closing the device ends Portmaster's pending read.
            client.close()

    def _session(self) -> None:
        with KextClient(self.endpoint) as client:
            version = client.version()
            log.info(
                "session open at %s, kext interface %s", self.endpoint, ".".join(map(str, version))
            )
            session_over = self._session_over = threading.Event()
            if self.stopping.is_set():
                return
            ticker = threading.Thread(
                target=self._tickers, args=(client, session_over), daemon=True
            )
            ticker.start()
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
                    verdicts: list[tuple[int, Verdict]] = []
                    for one in [info, *client.take_read()]:
                        if isinstance(one, ConnectionIpv4 | ConnectionIpv6):
                            verdict = self.policy.decide(one)
                            verdicts.append((one.id, verdict))
                            self.decisions.decided(one, verdict)
                        elif isinstance(one, LogLine):
                            level = _LOG_LEVELS.get(one.severity)
                            if level is not None:
                                log.log(level, "kext: %s", one.line)
                    if verdicts:
                        for err in client.send_verdicts(verdicts):
                            if err is not None:
                                raise err  # as a single write's failure would
            finally:
                session_over.set()
                ticker.join(timeout=7)  # before the sockets close under it

    def run(self) -> None:
        backoff = 0.2
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


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kextless run policy", description=__doc__)
    p.add_argument("--run-dir", type=Path, help="runtime directory (default: the host instance)")
    p.add_argument("--endpoint", help="the broker's client endpoint (default: RUN/kext.sock)")
    p.add_argument("--rules", type=Path, help="TOML rules file (default: accept everything)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logs.setup("policy", args.log_level)
    try:
        policy = load(args.rules) if args.rules else Policy()
    except RulesError as exc:
        log.error("%s", exc)
        return 2
    run = RuntimeDir.from_arg(args.run_dir)
    runner = PolicyRunner(args.endpoint or run.kext_endpoint, policy)
    signal.signal(signal.SIGTERM, lambda *_: runner.stop())
    signal.signal(signal.SIGINT, lambda *_: runner.stop())
    log.info("%d rule(s), default %s", len(policy.rules), policy.default.kext_name)
    runner.run()
    return 0
