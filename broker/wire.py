"""Byte values of the broker's client wire (docs/broker-wire.md), shared by server and client.

Ops and replies are single ASCII bytes in the first frame of a multipart message; they are
codec-level constants, compared directly with received frames.
"""

from __future__ import annotations

import struct
from enum import IntEnum

# Requests (client -> broker)
OPEN = b"O"
CLOSE = b"C"
READ = b"R"
WRITE = b"W"
VERSION = b"V"
STATS = b"S"
# Replies that are not an echo of the request's op
EOF = b"E"
TIMEOUT = b"T"
ERROR = b"X"

#: u32 little-endian: R's max_bytes and timeout_ms frames.
U32 = struct.Struct("<I")

#: Largest read buffer the broker accepts (the reply must fit comfortably in one message).
MAX_READ_BYTES = 16 * 1024 * 1024


class Status(IntEnum):
    """First byte of a W reply's status frame; anything but OK is followed by a UTF-8 reason."""

    OK = 0
    #: The command is not valid kext wire format (empty, short, trailing bytes, unknown type or
    #: verdict value). Nothing changed; an Error LogLine was queued in the log ring.
    MALFORMED = 1
    #: Valid, but no running actor handles this command type (e.g. Verdict with no ALE actor).
    UNHANDLED = 2
