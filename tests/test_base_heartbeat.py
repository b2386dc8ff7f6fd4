"""Heartbeat files: written by one process's loop, read by the watchdog."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kextless.base.heartbeat import (
    EVERY_NS,
    MAX_SLEEP_S,
    Heartbeat,
    capped_timeout_ms,
    heartbeat_dir,
    read_heartbeats,
)


def test_a_beat_is_read_back_and_beats_closer_than_every_ns_are_not_written(
    tmp_path: Path,
) -> None:
    hb = Heartbeat(tmp_path, "capture")
    assert read_heartbeats(tmp_path) == {"capture": 0}
    hb.beat(5 * EVERY_NS)
    assert read_heartbeats(tmp_path) == {"capture": 5 * EVERY_NS}
    hb.beat(5 * EVERY_NS + 1)  # too soon: the stored beat stays
    assert read_heartbeats(tmp_path) == {"capture": 5 * EVERY_NS}
    hb.beat(6 * EVERY_NS)
    assert read_heartbeats(tmp_path)["capture"] == 6 * EVERY_NS
    hb.close()
    assert os.stat(heartbeat_dir(tmp_path)).st_mode & 0o777 == 0o700
    assert os.stat(hb.path).st_mode & 0o777 == 0o600


def test_a_second_writer_after_a_restart_takes_over_the_file(tmp_path: Path) -> None:
    Heartbeat(tmp_path, "ale").beat(10 * EVERY_NS)
    Heartbeat(tmp_path, "ale").beat(20 * EVERY_NS)
    assert read_heartbeats(tmp_path) == {"ale": 20 * EVERY_NS}


def test_junk_in_the_directory_is_skipped(tmp_path: Path) -> None:
    Heartbeat(tmp_path, "broker").beat(EVERY_NS)
    (heartbeat_dir(tmp_path) / "short").write_bytes(b"\x01")
    os.mkdir(heartbeat_dir(tmp_path) / "a-directory")
    assert read_heartbeats(tmp_path) == {"broker": EVERY_NS}
    assert read_heartbeats(tmp_path / "missing") == {}


def test_bad_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Heartbeat(tmp_path, "../escape")


@pytest.mark.parametrize(
    ("given", "expected"), [(None, 250), (-1, 250), (0, 0), (10, 10), (60_000, 250)]
)
def test_poll_timeouts_are_capped(given: int | None, expected: int) -> None:
    assert MAX_SLEEP_S == 0.25
    assert capped_timeout_ms(given) == expected
