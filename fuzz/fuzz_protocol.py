"""atheris: the kext codecs and the actors' message decoder on arbitrary bytes.

Only the documented errors may come out (ProtocolError; msgspec DecodeError/ValidationError),
whatever decodes must re-encode to the same bytes (infos: same fields), and the stream decoder
must never raise nor buffer more than it was fed. Run: see fuzz/README.md.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    import msgspec

    from kextless.protocol import messages as m
    from kextless.protocol.commands import decode_command, encode_command
    from kextless.protocol.errors import ProtocolError
    from kextless.protocol.infos import LogLine, decode_info, encode_info
    from kextless.protocol.stream import DecodeError, InfoStreamDecoder


def one_input(data: bytes) -> None:
    if not data:
        return
    kind, body = data[0] % 4, data[1:]
    if kind == 0:
        try:
            cmd = decode_command(body)
        except ProtocolError:
            return
        assert encode_command(cmd) == body
    elif kind == 1:
        try:
            info = decode_info(body)
        except ProtocolError:
            return
        assert isinstance(info, LogLine) or encode_info(info) == body
    elif kind == 2:
        dec = InfoStreamDecoder(max_body=4096)
        step = 1 + (body[0] if body else 0) % 64
        out = []
        for i in range(0, len(body), step):
            out += dec.feed(body[i : i + step])
            assert dec.buffered <= len(body)
        out += dec.close()
        for x in out:
            if not isinstance(x, DecodeError):
                assert isinstance(x, LogLine) or decode_info(encode_info(x)) == x
    else:
        try:
            msg = m.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        m.unbundle(msg)
        assert m.decode(m.encode(msg)) == msg


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
