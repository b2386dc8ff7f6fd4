"""Incremental decoder for the info byte stream that reads return.

A read may end anywhere inside a record and may hold many records, so the decoder keeps at most
one partial record. Error handling mirrors Portmaster's RecvInfo: a known type whose body does
not fit is reported and skipped by its length field; an unknown type ends the stream, because
after it nothing can be framed.
"""

from __future__ import annotations

import msgspec

from kextless.protocol.enums import InfoType
from kextless.protocol.errors import ProtocolError
from kextless.protocol.infos import HEADER, HEADER_SIZE, Info, decode_info_body

#: Bodies larger than this are reported and skipped without being buffered, so a corrupt length
#: field cannot make the decoder hold gigabytes. The kext's largest real records (bandwidth
#: tables) are hundreds of KiB.
DEFAULT_MAX_BODY = 16 * 1024 * 1024


class DecodeError(msgspec.Struct, frozen=True):
    """A record that could not be decoded, at `offset` bytes into the stream."""

    message: str
    offset: int
    #: True when decoding cannot go on (unknown type); no more records will come out.
    fatal: bool = False


class InfoStreamDecoder:
    """Feed it bytes as they arrive; it returns whole infos and decode errors in stream order."""

    def __init__(self, max_body: int = DEFAULT_MAX_BODY) -> None:
        self._buf = bytearray()
        self._base = 0  # stream offset of self._buf[0]
        self._skip = 0  # bytes of an oversized body still to discard
        self._skip_offset = 0  # stream offset of the record being discarded
        self._max_body = max_body
        self.finished = False

    @property
    def buffered(self) -> int:
        """Bytes held for a record that is not complete yet."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Info | DecodeError]:
        if self.finished or not data:
            return []
        buf = self._buf
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            self._base += n
            data = data[n:]
        buf += data
        out: list[Info | DecodeError] = []
        pos = 0
        end = len(buf)
        while end - pos >= HEADER_SIZE:
            info_type, length = HEADER.unpack_from(buf, pos)
            offset = self._base + pos
            if info_type > 6:
                out.append(DecodeError(f"unknown info type {info_type}", offset, fatal=True))
                self.finished = True
                pos = end
                break
            if length > self._max_body:
                out.append(
                    DecodeError(
                        f"{InfoType(info_type).kext_name}: body of {length} bytes exceeds the "
                        f"{self._max_body}-byte limit; skipped",
                        offset,
                    )
                )
                available = end - pos - HEADER_SIZE
                take = min(available, length)
                self._skip = length - take
                self._skip_offset = offset
                pos += HEADER_SIZE + take
                continue
            if end - pos - HEADER_SIZE < length:
                break
            start = pos + HEADER_SIZE
            pos = start + length
            try:
                out.append(decode_info_body(info_type, bytes(buf[start:pos])))
            except ProtocolError as exc:
                out.append(DecodeError(str(exc), offset))
        if pos:
            del buf[:pos]
            self._base += pos
        return out

    def close(self) -> list[DecodeError]:
        """End of stream: report a truncated record, if one was being assembled."""
        errors: list[DecodeError] = []
        if not self.finished and (self._buf or self._skip):
            have = len(self._buf)
            if self._skip:
                errors.append(
                    DecodeError(
                        f"stream ended {self._skip} bytes before the end of a skipped record",
                        self._skip_offset,
                    )
                )
            elif have < HEADER_SIZE:
                errors.append(
                    DecodeError(
                        f"truncated header: stream ended after {have} of 5 header bytes", self._base
                    )
                )
            else:
                info_type, length = HEADER.unpack_from(self._buf)
                errors.append(
                    DecodeError(
                        f"truncated {InfoType(info_type).kext_name}: stream ended after "
                        f"{have - HEADER_SIZE} of {length} body bytes",
                        self._base,
                    )
                )
        self._buf.clear()
        self._skip = 0
        self.finished = True
        return errors
