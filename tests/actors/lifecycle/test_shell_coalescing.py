"""When the lifecycle shell lets its events wait (off the connect path) and when it may not."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from kextless.actors.lifecycle import main as lifecycle_main
from kextless.actors.lifecycle.core import LifecycleConfig, LifecycleCore
from kextless.actors.lifecycle.shell import COALESCE_S, LifecycleShell


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[LifecycleShell]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    s = LifecycleShell(
        LifecycleCore(LifecycleConfig()),
        f"ipc://{tmp_path}/ale.sock",
        f"ipc://{tmp_path}/actors.sock",
        ctx=ctx,
    )
    yield s
    s.ale.close()
    s.broker.close()
    ctx.term()


def test_events_wait_only_when_the_kernel_records_outbound_owners(shell: LifecycleShell) -> None:
    assert shell.coalesce_s == COALESCE_S > 0
    assert not shell._coalescing()  # owners unknown: a CONNECT may need resolving here
    shell._kernel_owners = True
    assert shell._coalescing()


def test_a_connect_being_resolved_here_is_never_delayed(shell: LifecycleShell) -> None:
    shell._kernel_owners = True
    shell._connects[7] = (1234, 0, 2)
    assert not shell._coalescing()


def test_coalescing_switched_off(shell: LifecycleShell) -> None:
    shell._kernel_owners = True
    shell.coalesce_s = 0
    assert not shell._coalescing()


@pytest.mark.parametrize(
    "argv", [["--coalesce-ms", "101"], ["--coalesce-ms", "-1"], ["--nice", "20"]]
)
def test_bad_priority_options_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        lifecycle_main.main(argv)
    assert exc.value.code == 2
