"""Write seed corpora for the atheris harnesses: valid encodings of every message, info and
command, and well-formed packets of every shape, so the fuzzer starts inside the formats.

msgspec and struct are C code atheris cannot see into (no coverage feedback there), so from
an empty corpus it seldom builds a framed info or a msgpack message at all.
Usage: .venv/bin/python fuzz/make_seeds.py [DIR]
(default fuzz/corpus); one file per seed, named by its SHA-1, in DIR/<target>/.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kextless.protocol import messages as m
from kextless.protocol.commands import encode_command
from kextless.protocol.infos import encode_info
from tests.fuzz import packetgen as g
from tests.fuzz.test_fuzz_messages import messages
from tests.protocol.test_protocol_properties import commands, infos

N = 200


def _draw(strategy: st.SearchStrategy[object], n: int = N) -> list[object]:
    out: list[object] = []

    @settings(max_examples=n, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(x: object) -> None:
        out.append(x)

    collect()
    return out


def _write(folder: Path, blobs: list[bytes]) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    for b in blobs:
        (folder / hashlib.sha1(b).hexdigest()).write_bytes(b)
    return len(blobs)


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parent / "corpus"
    # fuzz_protocol.py: first byte selects the decoder (0 command, 1 info, 2 stream, 3 message).
    proto = [b"\x00" + encode_command(c) for c in _draw(commands)]  # type: ignore[arg-type]
    proto += [b"\x01" + encode_info(i) for i in _draw(infos)]  # type: ignore[arg-type]
    proto += [b"\x02\x07" + b"".join(encode_info(i) for i in _draw(infos, 3))]  # type: ignore[arg-type]
    proto += [b"\x03" + m.encode(x) for x in _draw(messages)]
    n = _write(root / "protocol", proto)
    n += _write(root / "packets", [bytes(x) for x in _draw(g.packets, 2 * N)])  # type: ignore[arg-type]
    print(f"wrote {n} seeds under {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
