"""What happens to connections while no client is connected, against the real system.

issue 11: with `--no-policy` and no client a connection was refused after the verdict timeout,
no log file said why, and the next client to connect was handed that already-decided
connection as its first info. Here:
* `--no-client wait` (the default): the held connection gets the default verdict at the
  timeout, `logs/ale.log` names it, and a client that connects later never reads it;
* `--no-client default` (`--actor-arg broker=--no-client=default`): with no session open a
  connection gets the default verdict at once and `logs/broker.log` says so; with a client it
  waits for that client's verdict as usual.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kextless.protocol.enums import Verdict
from tests import apps
from tests.netns import NetnsPair, wait_diverted
from tests.system.harness import Answerer, System, status

pytestmark = [pytest.mark.root, pytest.mark.slow]

TIMEOUT_S = 2.0


class Pair(NetnsPair):
    """A NetnsPair under this module's own namespace prefix (kxp5-)."""

    def __init__(self, tag: str) -> None:
        super().__init__(tag)
        self.a = f"kxp5-{os.getpid()}-{tag}-a"
        self.b = f"kxp5-{os.getpid()}-{tag}-b"


def _up(tag: str, tmp: Path, *extra: str) -> Iterator[tuple[Pair, System]]:
    with Pair(tag) as pair:
        system = System(pair, tmp, "--verdict-timeout", str(TIMEOUT_S), *extra)
        try:
            wait_diverted(pair.a, "va", timeout=20)  # `up` returns before the capture attaches
            yield pair, system
        finally:
            print(system.logs())
            system.close()


@pytest.fixture(scope="module")
def waiting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pair, System]]:
    yield from _up("w", tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def defaulting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pair, System]]:
    yield from _up("d", tmp_path_factory.mktemp("run"), "--actor-arg", "broker=--no-client=default")


def _connect(pair: Pair, port: int, timeout: float = 8.0) -> dict[str, object]:
    return apps.run(pair, pair.a, apps.TCP_CLIENT, pair.ip4_b, port, timeout, timeout=timeout + 5)


def _log(system: System, name: str) -> str:
    path = system.run.log_dir / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def test_a_timed_out_connection_is_logged_and_never_handed_to_a_later_client(
    waiting: tuple[Pair, System],
) -> None:
    pair, system = waiting
    apps.start(pair, pair.b, apps.ECHO_SERVER, 23501)
    res = _connect(pair, 23500)  # nobody answers: the default verdict (Block) at the timeout
    assert res["result"] == "refused", res
    assert TIMEOUT_S - 0.3 <= float(str(res["elapsed"])) < TIMEOUT_S + 2, res
    answerer = Answerer(system.endpoint).start()
    try:
        answerer.decide = lambda info: Verdict.PERMANENT_ACCEPT
        res = _connect(pair, 23501)
        assert res["result"] == "ok", res
        assert answerer.wait_for(lambda i: i.remote_port == 23501)
        first = answerer.connections()[0]
        assert first.remote_port == 23501, answerer.connections()
        assert not answerer.connections(lambda i: i.remote_port == 23500)
    finally:
        answerer.stop()
    assert f"{pair.ip4_b}:23500 timed out" in _log(system, "ale"), _log(system, "ale")
    _, out = status(system)
    assert json.loads(out)["broker"]["infos"]["withdrawn"]["ConnectionIpv4"] == 1, out
    # The ALE's counters reach the broker with its next Health (once a second): wait for them.
    deadline = time.monotonic() + 3
    while True:
        _, text = status(system, as_json=False)
        if "verdict timeout(s)" in text or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    print(text)
    assert len(text.splitlines()) <= 25, text
    assert "  1 decided by timeout before any client read them (not handed out)" in text
    assert "verdict timeout(s): no verdict in time, got the default" in text


def test_no_client_default_refuses_at_once_and_a_client_still_decides(
    defaulting: tuple[Pair, System],
) -> None:
    pair, system = defaulting
    apps.start(pair, pair.b, apps.ECHO_SERVER, 23511)
    res = _connect(pair, 23511)
    assert res["result"] == "refused", res
    assert float(str(res["elapsed"])) < 1.0, res  # not after the 2 s verdict timeout
    deadline = time.monotonic() + 3
    while "no client session" not in _log(system, "broker") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "no client session" in _log(system, "broker"), _log(system, "broker")

    answerer = Answerer(system.endpoint).start()
    try:
        answerer.decide = lambda info: Verdict.PERMANENT_ACCEPT
        res = _connect(pair, 23511)  # a new local port: a new connection, asked
        assert res["result"] == "ok", res
        assert answerer.wait_for(lambda i: i.remote_port == 23511)
    finally:
        answerer.stop()
    # The session is closed again: refused at once once more.
    res = _connect(pair, 23511)
    assert res["result"] == "refused", res
    assert float(str(res["elapsed"])) < 1.0, res
