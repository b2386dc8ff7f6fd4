"""atheris: the capture's packet parser, rewriter and reject builders on arbitrary bytes.

parse() must agree with the independent RFC reading in tests/fuzz/packetgen.py, never raise,
and a rewrite of any parsed TCP/UDP packet must parse back with the new addresses/ports and
everything else unchanged. Run: see fuzz/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for the reference

from tests.fuzz import packetgen as g  # the oracle (and hypothesis): not instrumented

with atheris.instrument_imports():
    from kextless.actors.capture import packets as pk


def one_input(data: bytes) -> None:
    p = pk.parse(data)
    want = g.reference_parse(data)
    assert (p is None) == (want is None), data.hex()
    if p is None or want is None:
        return
    assert (p.protocol, p.l4, p.end, p.sport, p.dport, p.fragment, p.payload_len) == (
        want.protocol, want.l4, want.end, want.sport, want.dport, want.fragment, want.payload_len,
    )  # fmt: skip
    if p.fragment or p.protocol not in (pk.TCP, pk.UDP):
        return
    addr = bytes(reversed(p.src))
    out = bytes(pk.rewrite(data, p, dst=addr, dport=p.sport ^ 0x5A5A))
    q = pk.parse(out)
    assert q is not None and (q.dst, q.dport, q.src, q.sport) == (
        addr,
        p.sport ^ 0x5A5A,
        p.src,
        p.sport,
    )
    assert (q.l4, q.end, q.flags, q.seq, q.payload_len) == (
        p.l4,
        p.end,
        p.flags,
        p.seq,
        p.payload_len,
    )
    if p.protocol == pk.TCP:
        assert pk.parse(bytes(pk.build_rst(p))) is not None
    else:
        assert pk.parse(bytes(pk.build_port_unreachable(data, p))) is not None


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
