"""A real `kextless run ale` fed hostile frames on both of its sockets (ale.sock, where the
capture and the lifecycle actor talk to it, and from the broker side): it must log and drop
them, stay up, and still decide a held packet afterwards.

Before protocol/messages.py turned UnicodeDecodeError and RecursionError into DecodeError (and
unbundle stopped recursing), the first such frame ended the process.
"""

from __future__ import annotations

import random

import pytest

from kextless.protocol import messages as m
from kextless.protocol.enums import Verdict
from tests.actors.ale.test_shell_process import FLOW, TIMEOUT_S, Ale, ale  # noqa: F401

CLEAR = m.encode(m.CacheClear())
HOSTILE = [
    b"\x91\xaaCa\x80heClear",  # invalid UTF-8 in the tag
    b"\x93\xa3Log\x03\xa3ab\xff",  # ... in a string field
    b"\x92\xa6Bundle\x91" * 5000 + CLEAR,  # too deep for msgspec
    b"\x92\xa6Bundle\x91" * 480 + CLEAR,  # decodes; the old unbundle recursed over the stack
    b"",
    b"\xc1",
]


@pytest.mark.slow
def test_the_ale_survives_hostile_frames_and_still_decides(ale: Ale) -> None:  # noqa: F811
    rng = random.Random(12)
    noise = [rng.randbytes(rng.randint(1, 60)) for _ in range(300)]
    for frame in HOSTILE + noise:
        ale.capture.send(frame)
        ale.broker.send_multipart([b"ale", frame])
    # Still serving: a held packet gets its default verdict at the timeout, as always.
    ale.hold(7)
    deadline_msgs = [ale.from_capture_side(timeout=TIMEOUT_S + 5) for _ in range(2)]
    assert m.Decision((7,), Verdict.DROP) in deadline_msgs, deadline_msgs
    assert ale.proc.poll() is None, ale.log.read_text()[-3000:]
    text = ale.log.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert "garbage from capture dropped" in text
