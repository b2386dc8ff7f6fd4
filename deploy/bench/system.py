"""The kextless instances under test, and the client that answers them at once.

An instance is `kextless up --netns A` run as a subprocess (what a user types, bounded by a
timeout), always followed by `kextless down`. Its processes are found by argv
(`deploy.processes`), so their CPU and memory can be read from /proc.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from kextless.base.rundir import RuntimeDir
from kextless.broker.client import KextClient, KextEOF, KextError, KextTimeout
from kextless.deploy.instance import read_instance
from kextless.deploy.processes import instance_processes
from kextless.deploy.status import divert_counters
from kextless.protocol.enums import Verdict
from kextless.protocol.infos import ConnectionIpv4, ConnectionIpv6

CLI = [sys.executable, "-m", "kextless.deploy.cli"]
UP_TIMEOUT_S = 90.0
_TICK = os.sysconf("SC_CLK_TCK")


class Answerer:
    """Plays Portmaster: answers every connection info PermanentAccept as soon as it is read."""

    def __init__(self, endpoint: str) -> None:
        self.client = KextClient(endpoint)
        self.answered = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 20.0) -> Answerer:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client.open()
                break
            except KextError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self._thread = threading.Thread(target=self._run, name="bench-answerer", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    info = self.client.recv_info(timeout=0.2)
                except KextTimeout:
                    continue
                if isinstance(info, ConnectionIpv4 | ConnectionIpv6):
                    self.client.send_verdict(info.id, Verdict.PERMANENT_ACCEPT)
                    self.answered += 1
        except (KextError, KextEOF) as exc:
            if not self._stop.is_set():
                self.errors.append(repr(exc))

    def stop(self) -> None:
        """Stop the reader before closing: zmq sockets are not thread-safe."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.client.close()


class Kextless:
    """`kextless up --netns NS` (with the embedded policy, or a bench client answering)."""

    def __init__(self, netns: str, run_root: Path, *, policy: bool) -> None:
        self.netns = netns
        self.run_root = run_root
        self.policy = policy
        self.run_dir = RuntimeDir.for_instance(netns, run_root)
        self.answerer: Answerer | None = None
        self.started = False

    @property
    def label(self) -> str:
        return "embedded policy" if self.policy else "client over the endpoint"

    def up(self) -> None:
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        argv = [*CLI, "up", "--netns", self.netns, "--run-root", str(self.run_root)]
        if not self.policy:
            argv.append("--no-policy")
        self.started = True  # from here on `down` must run, whatever happens
        res = subprocess.run(
            argv, capture_output=True, text=True, timeout=UP_TIMEOUT_S, env=env, check=False
        )
        if res.returncode != 0:
            raise RuntimeError(f"kextless up failed: {(res.stderr or res.stdout).strip()[-300:]}")
        if not self.policy:
            self.answerer = Answerer(self.run_dir.kext_endpoint).start()

    def down(self) -> str:
        """Stop the client and the instance; '' or what `down` complained about."""
        if self.answerer is not None:
            self.answerer.stop()
            self.answerer = None
        if not self.started:
            return ""
        self.started = False
        argv = [*CLI, "down", "--netns", self.netns, "--run-root", str(self.run_root)]
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        except subprocess.TimeoutExpired:
            return "kextless down timed out"
        return "" if res.returncode == 0 else (res.stderr or res.stdout).strip()[-300:]

    def pids(self) -> list[int]:
        return instance_processes(self.run_dir)

    def process_name(self, pid: int) -> str:
        """`broker-PID`, `capture-PID`, ... as `up` recorded them, `supervisord-PID` else."""
        inst = read_instance(self.run_dir)
        for name, rec in (inst.programs if inst is not None else {}).items():
            if rec.pid == pid:
                return f"{name}-{pid}"
        sup = inst is not None and inst.supervisord_pid == pid
        return f"{'supervisord' if sup else 'other'}-{pid}"

    def capture_counters(self) -> tuple[dict[str, float], float]:
        """(the capture's counters as last reported, seconds since that report)."""
        client = KextClient(self.run_dir.kext_endpoint, request_timeout=2.0)
        try:
            stats = client.stats()
        finally:
            client.close_sockets()
        capture = stats.get("actors", {}).get("capture")
        if not isinstance(capture, dict):
            raise RuntimeError("the capture has not reported to the broker yet")
        counters = capture.get("counters") or {}
        return {k: float(v) for k, v in counters.items()}, float(capture["last_seen_s_ago"])

    def loss_counts(self) -> dict[str, int] | None:
        """`kextless status`'s divert loss counters (count per key), None before a report."""
        client = KextClient(self.run_dir.kext_endpoint, request_timeout=2.0)
        try:
            loss = divert_counters(client.stats())
        finally:
            client.close_sockets()
        return None if loss is None else {k: int(v["count"]) for k, v in loss.items()}

    def fresh_counters(self, after_mono: float, timeout: float = 8.0) -> dict[str, float]:
        """The capture's counters from a report made after `after_mono` (it reports every
        5 s), so a burst that just ended is counted in full."""
        deadline = time.monotonic() + timeout
        while True:
            counters, age = self.capture_counters()
            if time.monotonic() - age > after_mono:
                return counters
            if time.monotonic() > deadline:
                raise RuntimeError(f"no capture report within {timeout:g} s")
            time.sleep(0.25)


def cpu_seconds(pids: list[int]) -> float:
    """CPU time of the live processes, all their threads (gone ones count 0). schedstat counts
    nanoseconds; /proc/PID/stat's clock ticks (10 ms) are too coarse for an idle process."""
    total = 0.0
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                total += int((task / "schedstat").read_text().split()[0]) / 1e9
            except (OSError, ValueError, IndexError):
                total += _ticks(task)
    return total


def _ticks(task: Path) -> float:
    """utime + stime from stat, where schedstat is missing (kernel without schedstats)."""
    try:
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK  # fields 14 and 15 of stat


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of the processes together (VmRSS)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total
