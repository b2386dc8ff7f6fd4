"""Hostile frames for the actors' contract (protocol/messages.py) and the kext dissector.

Every shell catches exactly msgspec.DecodeError / ValidationError around `decode`, then walks
the message with `unbundle`; anything else raised there takes the process (ALE, capture,
lifecycle, bandwidth) down, or loses the rest of the broker's multipart message. So: no input
raises anything else, and whatever decodes re-encodes to a message that decodes the same.
"""

from __future__ import annotations

import sys

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kextless.protocol import messages as m
from kextless.protocol.enums import CommandType, Direction, InfoType, Severity, Verdict

CI = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError)

u64 = st.integers(0, 2**64 - 1)
ip = st.sampled_from([4, 16]).flatmap(lambda n: st.binary(min_size=n, max_size=n))
flows = st.builds(
    m.Flow, st.integers(0, 255), ip, st.integers(0, 0xFFFF), ip, st.integers(0, 0xFFFF)
)
commands = st.sampled_from(CommandType)
floats = st.floats(allow_nan=False)
leaf: st.SearchStrategy[m.Message] = st.one_of(
    st.builds(m.Hello, st.text(max_size=8), u64, st.integers(0, 9), st.lists(commands).map(tuple)),
    st.builds(m.Health, st.text(max_size=8), u64, st.dictionaries(st.text(max_size=5), floats)),
    st.builds(m.Log, st.sampled_from(Severity), st.text(max_size=20)),
    st.builds(m.Emit, st.sampled_from(InfoType), st.binary(max_size=40), u64),
    st.builds(m.EmitRefused, u64, st.text(max_size=10)),
    st.builds(m.Command, st.sampled_from(CommandType), st.binary(max_size=40), u64),
    st.builds(m.PacketHeld, u64, flows, st.sampled_from(Direction), st.binary(), u64, u64, u64),
    st.builds(m.Rehold, st.binary(), st.sampled_from(Direction), u64),
    st.builds(m.Decision, st.lists(u64, max_size=5).map(tuple), st.sampled_from(Verdict)),
    st.builds(m.CacheSet, flows, st.sampled_from(Verdict)),
    st.just(m.CacheClear()),
    st.builds(m.CaptureReady, u64),
    st.builds(m.ConnectionEnded, flows, st.sampled_from(Direction), u64, u64),
    st.builds(m.Attribution, st.sampled_from(m.AttributionKind), flows, u64, u64),
)  # fmt: skip
messages = st.recursive(
    leaf, lambda inner: st.lists(inner, max_size=4).map(lambda x: m.Bundle(tuple(x))), max_leaves=20
)


def _flatten(msg: m.Message) -> list[m.Message]:
    if isinstance(msg, m.Bundle):
        return [x for inner in msg.msgs for x in _flatten(inner)]
    return [msg]


def _nested(depth: int) -> bytes:
    return b"\x92\xa6Bundle\x91" * depth + m.encode(m.CaptureReady(7))  # [tag "Bundle", [inner]]


def _deep_stack(n: int, fn):  # type: ignore[no-untyped-def]
    """Call fn() with `n` frames already on the stack, as a shell's loop has."""
    return fn() if n == 0 else _deep_stack(n - 1, fn)


@CI
@given(messages)
def test_round_trip_and_unbundle_order(msg: m.Message) -> None:
    back = m.decode(m.encode(msg))
    assert back == msg
    assert list(m.unbundle(back)) == _flatten(msg)


@CI
@given(st.binary(max_size=200))
def test_decode_raises_only_decode_errors_on_noise(data: bytes) -> None:
    try:
        msg = m.decode(data)
    except DECODE_ERRORS:
        return
    m.unbundle(msg)
    assert m.decode(m.encode(msg)) == msg


@CI
@given(messages, st.data())
def test_decode_of_a_mutated_frame_raises_only_decode_errors(
    msg: m.Message, data: st.DataObject
) -> None:
    frame = bytearray(m.encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        how = data.draw(st.sampled_from(["set", "cut", "insert"]))
        i = data.draw(st.integers(0, max(len(frame) - 1, 0)))
        if how == "set" and frame:
            frame[i] = data.draw(st.integers(0, 255))
        elif how == "cut":
            del frame[i:]
        else:
            frame[i:i] = data.draw(st.binary(min_size=1, max_size=9))
    try:
        got = m.decode(bytes(frame))
    except DECODE_ERRORS:
        return
    m.unbundle(got)
    assert m.decode(m.encode(got)) == got


@pytest.mark.parametrize("depth", [1, 100, 480, 600, 5000, 100_000])
def test_deeply_nested_bundles_are_garbage_or_unbundled(depth: int) -> None:
    # Regression: 499+ levels raised RecursionError out of decode, and ~450 levels that did
    # decode raised it out of the recursive unbundle in a shell's loop; neither was caught
    # (the ALE and capture shells catch only decode errors).
    try:
        msg = m.decode(_nested(depth))
    except msgspec.DecodeError as exc:
        assert "nested too deeply" in str(exc)
        return
    assert _deep_stack(sys.getrecursionlimit() // 2, lambda: m.unbundle(msg)) == (
        m.CaptureReady(7),
    )


def test_a_flat_bundle_unbundles_to_its_own_tuple() -> None:
    msgs = tuple(m.CaptureReady(i) for i in range(m.BUNDLE_MAX))
    assert m.unbundle(m.decode(m.encode(m.Bundle(msgs)))) == msgs
    assert m.unbundle(m.Bundle(())) == ()


@pytest.mark.parametrize(
    "frame",
    [
        b"\x91\xaaCa\x80heClear",  # the tag itself
        b"\x93\xa3Log\x03\xa3ab\xff",  # a Log line
        b"\x95\xa5Hello\xa2\xc3\x28\x01\x01\x90",  # the actor name of a Hello
    ],
)
def test_invalid_utf8_is_a_decode_error(frame: bytes) -> None:
    # Regression: msgspec raised UnicodeDecodeError, which no shell catches.
    with pytest.raises(msgspec.DecodeError, match="invalid UTF-8"):
        m.decode(frame)
