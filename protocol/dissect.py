"""`kextless decode`: a dissector for captured kext streams, printing one JSON object per record.

Infos go through the same incremental decoder the live system uses, in fixed-size chunks, so a
capture of any size decodes in constant memory and a live pipe shows records as they arrive.
Errors are JSON lines too (`{"error": ..., "offset": N}`), so the output stays machine-readable.
Exit status: 0 when the input could be framed to its end (individual bad records are reported
and skipped), 1 when decoding had to stop (unknown info type, any undecodable command), 2 for
usage errors or an unreadable file, 141 (as if killed by SIGPIPE) when the reader went away.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from typing import BinaryIO

import msgspec

from kextless.protocol.commands import command_size, command_to_json, decode_command
from kextless.protocol.errors import ProtocolError
from kextless.protocol.infos import info_to_json
from kextless.protocol.stream import DecodeError, InfoStreamDecoder

#: Read size. Large enough to amortise per-call overhead, small enough to stay in cache.
CHUNK = 64 * 1024

_encode = msgspec.json.Encoder().encode


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kextless decode",
        description="Decode a captured kext stream into JSON lines, one object per record.",
    )
    kind = parser.add_mutually_exclusive_group(required=True)
    kind.add_argument(
        "--infos", action="store_true", help="the input is an info stream (kext -> Portmaster)"
    )
    kind.add_argument(
        "--commands",
        action="store_true",
        help="the input is concatenated commands (Portmaster -> kext)",
    )
    parser.add_argument(
        "file",
        nargs="?",
        default="-",
        metavar="FILE",
        help="input file; standard input if omitted or '-'",
    )
    return parser


def _chunks(stream: BinaryIO) -> Iterator[bytes]:
    # read1 returns what is available instead of waiting for a full chunk, so a live pipe
    # is shown as it arrives.
    read = getattr(stream, "read1", stream.read)
    while chunk := read(CHUNK):
        yield chunk


def _error_line(message: str, offset: int) -> bytes:
    return _encode({"error": message, "offset": offset}) + b"\n"


def _decode_infos(stream: BinaryIO, out: BinaryIO) -> int:
    decoder = InfoStreamDecoder()
    fatal = False
    for chunk in _chunks(stream):
        lines = []
        for item in decoder.feed(chunk):
            if isinstance(item, DecodeError):
                lines.append(_error_line(item.message, item.offset))
                fatal = fatal or item.fatal
            else:
                lines.append(_encode(info_to_json(item)) + b"\n")
        if lines:
            out.write(b"".join(lines))
            out.flush()
        if decoder.finished:
            break
    out.write(b"".join(_error_line(e.message, e.offset) for e in decoder.close()))
    return 1 if fatal else 0


def _decode_commands(stream: BinaryIO, out: BinaryIO) -> int:
    """Commands carry no length field: a bad one loses the framing, so the first error ends."""
    buf = bytearray()
    base = 0  # input offset of buf[0]
    for chunk in _chunks(stream):
        buf += chunk
        pos = 0
        lines = []
        try:
            while pos < len(buf):
                size = command_size(buf[pos])
                if len(buf) - pos < size:
                    break
                lines.append(
                    _encode(command_to_json(decode_command(bytes(buf[pos : pos + size])))) + b"\n"
                )
                pos += size
        except ProtocolError as exc:
            lines.append(_error_line(str(exc), base + pos))
            out.write(b"".join(lines))
            return 1
        out.write(b"".join(lines))
        out.flush()
        del buf[:pos]
        base += pos
    if buf:
        try:
            decode_command(bytes(buf))
        except ProtocolError as exc:  # always: what is left is shorter than its command
            out.write(_error_line(str(exc), base))
        return 1
    return 0


def main(argv: list[str]) -> int:
    """Entry point of `kextless decode`; returns the exit status."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help or a usage error; argparse already printed
        return int(exc.code or 0)
    try:
        source: ContextManager[BinaryIO] = (
            nullcontext(sys.stdin.buffer) if args.file == "-" else open(args.file, "rb")  # noqa: SIM115
        )
    except OSError as exc:
        print(f"kextless decode: cannot open {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    out = sys.stdout.buffer
    try:
        with source as stream:
            status = (_decode_infos if args.infos else _decode_commands)(stream, out)
        out.flush()
        return status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (e.g. `| head`) has gone. Point stdout at /dev/null so the interpreter's
        # final flush does not raise again, and exit like a tool killed by SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        print(f"kextless decode: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
