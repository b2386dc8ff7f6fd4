"""Outbound connections carry their opener's pid from the kernel (kextless_pre's `owners` map),
with no lifecycle actor at all: the capture looks the pid up when it holds the opener, so the
ALE emits the info at once (issue 10's attribution latency, docs/measurements.md M25).

Namespace `a` is guarded by `kextless up --netns a --no-policy --no-lifecycle`; `b` runs an
echo server. The clients print their own pid, so every expectation comes from the
application itself.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kextless.protocol.enums import IpProtocol
from tests import apps
from tests.netns import NetnsPair
from tests.system.harness import Answerer, System
from tests.system.test_lifecycle_system import clients, conn_pid

pytestmark = [pytest.mark.root, pytest.mark.slow]

PORT = 23900


@pytest.fixture(scope="module")
def pair() -> Iterator[NetnsPair]:
    with NetnsPair("o") as p:
        apps.start(p, p.b, apps.ECHO_SERVER, PORT, "::")
        yield p


@pytest.fixture(scope="module")
def system(pair: NetnsPair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    s = System(pair, tmp_path_factory.mktemp("run"), "--no-lifecycle", "--verdict-timeout", "3")
    try:
        yield s
    finally:
        s.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("kind", "v6"), [("tcp", False), ("tcp", True), ("udp", False), ("sendto", True)]
)
def test_outbound_pids_come_from_the_kernel_without_the_lifecycle_actor(
    pair: NetnsPair, system: System, answerer: Answerer, kind: str, v6: bool
) -> None:
    assert not (system.run.log_dir / "lifecycle.log").exists()  # no lifecycle actor ran
    proto = IpProtocol.TCP if kind == "tcp" else IpProtocol.UDP
    reports = clients(pair, pair.ip6_b if v6 else pair.ip4_b, PORT, kind, 4, 3)
    assert len({r["pid"] for r in reports}) == 3
    for r in reports:
        assert conn_pid(answerer, proto, r["port"]) == [r["pid"]], r
