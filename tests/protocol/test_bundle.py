"""Bundle: several internal messages in one frame, unbundled in order; a burst bigger than
BUNDLE_MAX leaves as several frames; a single message is sent bare (old receivers read it)."""

from __future__ import annotations

from kextless.protocol import messages as m
from kextless.protocol.enums import Verdict

FLOW = m.Flow(6, bytes([10, 0, 0, 1]), 40000, bytes([10, 0, 0, 2]), 443)


def test_one_message_is_sent_bare() -> None:
    (frame,) = m.encode_many([m.CaptureReady(7)])
    assert frame == m.encode(m.CaptureReady(7))
    assert m.unbundle(m.decode(frame)) == (m.CaptureReady(7),)


def test_a_burst_comes_back_in_order_in_as_few_frames_as_fit() -> None:
    msgs: list[m.Message] = []
    for i in range(m.BUNDLE_MAX + 10):
        msgs += [m.CacheSet(FLOW, Verdict.PERMANENT_ACCEPT), m.Decision((i,), Verdict.ACCEPT)]
    frames = m.encode_many(msgs)
    assert len(frames) == 3  # 2 * 266 messages, at most 256 a frame
    back = [x for f in frames for x in m.unbundle(m.decode(f))]
    assert back == msgs


def test_a_nested_bundle_is_flattened() -> None:
    inner = m.Bundle((m.CaptureReady(1), m.CaptureReady(2)))
    outer = m.decode(m.encode(m.Bundle((inner, m.CaptureReady(3)))))
    assert m.unbundle(outer) == (m.CaptureReady(1), m.CaptureReady(2), m.CaptureReady(3))
