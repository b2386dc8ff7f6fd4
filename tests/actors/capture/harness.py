"""A running capture process inside a test namespace, with a test ALE peer answering it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from kextless.protocol.enums import Verdict
from kextless.protocol.messages import PacketHeld
from tests.actors.capture.ale_peer import AlePeer
from tests.entry import KEXTLESS
from tests.netns import NetnsPair


@dataclass
class CaptureEnv:
    pair: NetnsPair
    ale: AlePeer
    proc: subprocess.Popen[bytes]
    #: Verdict returned by the ALE peer per PacketHeld; tests replace it.
    policy: list = field(default_factory=list)

    def restart_ale(self) -> AlePeer:
        """Stop the ALE peer and bind a fresh one (same policy) where it was: an ALE restart."""
        old = self.ale
        old.__exit__(None, None, None)
        new = AlePeer(old.endpoint, old.policy).__enter__()
        self.ale = new
        self._peers.append(new)
        return new

    def set_policy(self, policy: object) -> None:
        """A Verdict for every later PacketHeld, or a callable PacketHeld -> Verdict | None."""
        self.policy[0] = policy

    def held_for(self, port: int) -> list[PacketHeld]:
        """Requests the ALE peer got for connections with this port on either side."""
        return self.ale.held_matching(lambda m: port in (m.flow.local_port, m.flow.remote_port))

    def log(self) -> str:
        """The capture's stderr so far (a file, so a chatty DEBUG log can never block it)."""
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    log_path: Path | None = None
    _peers: list = field(default_factory=list)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


@contextmanager
def capture_env(
    policy: object = Verdict.PERMANENT_ACCEPT, extra_args: tuple[str, ...] = (), ns_side: str = "a"
) -> Iterator[CaptureEnv]:
    """Namespaces a <-> b; capture (with `extra_args`) guards `ns_side`; ALE peer answers.

    `policy`: a Verdict for every PacketHeld, or a callable PacketHeld -> Verdict | None.
    """
    with tempfile.TemporaryDirectory(prefix="klt-cap-") as tmp, NetnsPair() as pair:
        endpoint = f"ipc://{tmp}/ale.sock"
        holder: list = [policy]

        def answer(msg: PacketHeld) -> Verdict | None:
            p = holder[0]
            return p(msg) if callable(p) else p

        with AlePeer(endpoint, answer) as ale:
            ns = pair.a if ns_side == "a" else pair.b
            log_path = Path(tmp) / "capture.log"
            with log_path.open("wb") as log_file:
                proc = pair.popen(
                    ns,
                    [
                        *KEXTLESS,
                        "run",
                        "capture",
                        "--ale-endpoint",
                        endpoint,
                        "--log-level",
                        os.environ.get("KLT_CAPTURE_LOG", "INFO"),
                        *extra_args,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=log_file,
                )
            env = CaptureEnv(pair, ale, proc, holder, log_path=log_path)
            try:
                if not ale.ready.wait(10):
                    env.stop()
                    raise RuntimeError(f"capture never became ready:\n{env.log()}")
                yield env
            finally:
                rc = env.stop()
                for peer in env._peers:
                    peer.__exit__(None, None, None)
                if os.environ.get("KLT_SHOW_CAPTURE_LOG"):
                    print(env.log(), file=sys.stderr)
                assert rc == 0, f"capture exited {rc}:\n{env.log()[-4000:]}"
