"""A whole kextless system in a throw-away namespace, answered by a test-controlled client.

`System` runs `kextless up --netns A --no-policy` for namespace `a` of a NetnsPair and connects
a real KextClient to its endpoint. The `Answerer` thread reads every info, records it, and
answers connection infos with whatever `decide(info)` returns (None leaves it pending), so a
test plays Portmaster exactly as Portmaster would.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from kextless.base.rundir import RuntimeDir
from kextless.broker.client import KextClient, KextEOF, KextError, KextTimeout
from kextless.protocol.enums import Verdict
from kextless.protocol.infos import ConnectionIpv4, ConnectionIpv6, Info
from tests.entry import KEXTLESS
from tests.netns import NetnsPair

Conn = ConnectionIpv4 | ConnectionIpv6
Decide = Callable[[Conn], Verdict | None]


def addr(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


class Answerer:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.decide: Decide = lambda info: Verdict.PERMANENT_ACCEPT
        self.infos: list[Info] = []
        self.answered: dict[int, Verdict] = {}
        self.errors: list[str] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self.client = KextClient(endpoint)
        self._thread: threading.Thread | None = None

    def start(self) -> Answerer:
        deadline = time.monotonic() + 20
        while True:
            try:
                self.client.open()
                break
            except KextError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    info = self.client.recv_info(timeout=0.2)
                except KextTimeout:
                    continue
                except KextEOF:
                    return
                with self._cond:
                    self.infos.append(info)
                    self._cond.notify_all()
                if isinstance(info, ConnectionIpv4 | ConnectionIpv6):
                    verdict = self.decide(info)
                    if verdict is not None:
                        self.client.send_verdict(info.id, verdict)
                        self.answered[info.id] = verdict
        except (KextError, KextEOF) as exc:
            if not self._stop.is_set():
                self.errors.append(repr(exc))

    def stop(self) -> None:
        """Stop reading first: zmq sockets must not be closed under a thread using them."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.client.close()

    def connections(self, pred: Callable[[Conn], bool] = lambda i: True) -> list[Conn]:
        with self._cond:
            return [
                i for i in self.infos if isinstance(i, ConnectionIpv4 | ConnectionIpv6) and pred(i)
            ]

    def wait_for(
        self, pred: Callable[[Conn], bool], count: int = 1, timeout: float = 5.0
    ) -> list[Conn]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [
                    i
                    for i in self.infos
                    if isinstance(i, ConnectionIpv4 | ConnectionIpv6) and pred(i)
                ]
                left = deadline - time.monotonic()
                if len(found) >= count or left <= 0:
                    return found
                self._cond.wait(left)


class System:
    """`kextless up` for namespace `pair.a`, returned once it is ready; always torn down by
    `close()`."""

    def __init__(self, pair: NetnsPair, run_root: Path, *extra: str) -> None:
        self.pair = pair
        self.run_root = run_root
        self.run = RuntimeDir.for_instance(pair.a, root=run_root)
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        t0 = time.monotonic()
        res = subprocess.run(
            [
                *KEXTLESS,
                "up",
                "--netns",
                pair.a,
                "--no-policy",
                "--run-root",
                str(run_root),
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=90,
            env=env,
        )
        #: Seconds `kextless up` took, and what it printed (what it waited for, and how long).
        self.up_seconds = time.monotonic() - t0
        self.up_output = res.stdout
        if res.returncode != 0:
            self.down()
            raise AssertionError(f"kextless up failed:\n{res.stdout}\n{res.stderr}")
        # `up` returned: every actor is ready (deploy/status.not_ready), so a connection made
        # now is decided, attributed and ends with an event; no wait is needed here.
        self.endpoint = self.run.kext_endpoint

    def down(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*KEXTLESS, "down", "--netns", self.pair.a, "--run-root", str(self.run_root)],
            capture_output=True,
            text=True,
            timeout=90,
        )

    def logs(self) -> str:
        out = []
        for f in sorted(self.run.log_dir.glob("*.log")) if self.run.log_dir.exists() else []:
            out.append(f"==> {f.name}\n{f.read_text(errors='replace')[-4000:]}")
        return "\n".join(out)

    def close(self) -> None:
        self.down()
        shutil.rmtree(self.run_root, ignore_errors=True)


# ---- status and verdict timing (tests/system/test_interfaces_system.py) -----------------------


def status(system: System, as_json: bool = True) -> tuple[int, str]:
    """`kextless status` of the system: (exit code, stdout); JSON when `as_json`."""
    res = subprocess.run(
        [
            *KEXTLESS,
            "status",
            "--netns",
            system.pair.a,
            "--run-root",
            str(system.run_root),
            *(["--json"] if as_json else []),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return res.returncode, res.stdout


class Rules:
    """A `decide` for the Answerer: a verdict per (protocol, port) seen on either end, a
    default otherwise, and the wall-clock time each rule's verdict was last sent."""

    def __init__(self, default: Verdict = Verdict.PERMANENT_ACCEPT) -> None:
        self.default = default
        self.by_port: dict[tuple[int, int], Verdict] = {}
        self.sent_at: dict[tuple[int, int], float] = {}

    def __call__(self, info: Conn) -> Verdict | None:
        for port in (info.remote_port, info.local_port):
            key = (info.protocol, port)
            if key in self.by_port:
                self.sent_at[key] = time.time()
                return self.by_port[key]
        return self.default
