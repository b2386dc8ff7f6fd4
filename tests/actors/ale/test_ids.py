"""Pending ids are never reused across ALE restarts."""

from __future__ import annotations

from pathlib import Path

import pytest

from kextless.actors.ale.ids import BLOCK, IdReservation


def test_fresh_start_at_one_then_past_every_reserved_block(tmp_path: Path) -> None:
    path = tmp_path / "ale-ids"
    first = IdReservation(path)
    assert first.first_id() == 1
    for next_id in range(1, BLOCK + 10):  # issue a block and a bit
        first.ensure(next_id)
    # The process dies here; whatever it issued is below the recorded limit.
    assert IdReservation(path).first_id() == 2 * BLOCK + 1
    assert IdReservation(path).first_id() == 3 * BLOCK + 1  # a crash loop still moves on


def test_writes_only_when_a_block_is_used_up(tmp_path: Path) -> None:
    res = IdReservation(tmp_path / "ale-ids")
    res.first_id()
    before = (tmp_path / "ale-ids").stat().st_mtime_ns
    res.ensure(BLOCK)  # last id of the first block: no write
    assert (tmp_path / "ale-ids").stat().st_mtime_ns == before
    assert res.limit == 1 + BLOCK


@pytest.mark.parametrize("content", ["garbage", "-5", "0"])
def test_corrupt_reservation_is_a_clear_error(tmp_path: Path, content: str) -> None:
    (tmp_path / "ale-ids").write_text(content)
    with pytest.raises(RuntimeError, match="id reservation"):
        IdReservation(tmp_path / "ale-ids").first_id()
