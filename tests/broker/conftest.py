"""Fixtures that run a real `kextless run broker` process (helpers in broker_testlib)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.broker.broker_testlib import Broker, start_broker, stop_broker


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = start_broker()
    try:
        yield b
    finally:
        stop_broker(b)
        shutil.rmtree(b.dir, ignore_errors=True)
