"""Hostile packets against the capture's parser, rewriter, reject builders and core.

Beyond tests/actors/capture/test_packets.py (hand-made cases, "parse never raises" on noise):
differential testing against an independent RFC reading (tests/fuzz/packetgen.py), rewrite and
reject-packet properties on packets with IPv4 options, IPv6 extension-header chains and
fragments, and the core's promise that every captured packet is decided exactly once and a
blocked flow's packets never pass, whatever arrives.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kextless.actors.capture import packets as pk
from kextless.actors.capture.core import (
    CaptureCore,
    Config,
    Drop,
    Inject,
    Pass,
    Reroute,
    SetFilter,
    ToAle,
)
from kextless.protocol.enums import Verdict
from kextless.protocol.messages import CacheClear, CacheSet, Decision, Flow, PacketHeld
from tests.actors.capture.crafted import naive_sum
from tests.fuzz import packetgen as g

CI = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _fields(p: pk.Parsed | g.Ref) -> tuple[object, ...]:
    return (
        p.version, p.protocol, bytes(p.src), bytes(p.dst), p.l4, p.end, p.sport, p.dport,
        p.flags, p.seq, p.ack, p.payload_len, p.fragment, p.icmp_type,
    )  # fmt: skip


@CI
@given(g.packets)
def test_parse_agrees_with_the_reference_reading(raw: bytes) -> None:
    got = pk.parse(raw)
    want = g.reference_parse(raw)
    assert (got is None) == (want is None), (raw.hex(), got, want)
    if got is not None and want is not None:
        assert _fields(got) == _fields(want), raw.hex()
        assert 0 <= got.l4 <= got.end <= len(raw)


@CI
@given(g.packets, st.sampled_from([bytes, bytearray, memoryview]))
def test_parse_reads_any_buffer_type_alike(raw: bytes, kind: type) -> None:
    a, b = pk.parse(raw), pk.parse(kind(raw))
    assert (a is None and b is None) or (a and b and _fields(a) == _fields(b))


def test_a_chain_of_hundreds_of_extension_headers_ends() -> None:
    # 8-byte destination-options headers, each naming the next as another one, to the end of
    # the buffer: the walk stops at the buffer (no transport header: None), never loops.
    n = 8000
    chain = bytes([g.DSTOPTS, 0]) + bytes(6)
    raw = struct.pack("!IHBB16s16s", 0x60000000, 8 * n, g.DSTOPTS, 64, g.V6[0], g.V6[1])
    assert pk.parse(raw + chain * n) is None
    # ... and with a UDP header after it, the header is found.
    udp = struct.pack("!HHHH", 1, 2, 8, 0)
    tail = bytes([g.UDP, 0]) + bytes(6)
    p = pk.parse(raw[:4] + struct.pack("!H", 8 * n + 8) + raw[6:] + chain * (n - 1) + tail + udp)
    assert p is not None and (p.protocol, p.sport, p.dport, p.l4) == (g.UDP, 1, 2, 40 + 8 * n)


def _checksums_ok(buf: bytes, q: pk.Parsed) -> bool:
    """Independent check of the IPv4 header sum and the TCP/UDP sum over [l4:end]."""
    if q.version == 4 and naive_sum(buf[: q.l4]) != 0xFFFF:
        return False
    seg = buf[q.l4 : q.end]
    if q.version == 4:
        pseudo = q.src + q.dst + struct.pack("!BBH", 0, q.protocol, len(seg))
    else:
        pseudo = q.src + q.dst + struct.pack("!I3xB", len(seg), q.protocol)
    return naive_sum(pseudo + seg) == 0xFFFF


@CI
@given(g.packets, st.data())
def test_rewrite_keeps_the_five_tuple_semantics(raw: bytes, data: st.DataObject) -> None:
    p = pk.parse(raw)
    if p is None or p.fragment or p.protocol not in (pk.TCP, pk.UDP):
        return
    pool = g.V4 if p.version == 4 else g.V6
    new = {
        "src": data.draw(st.none() | st.sampled_from(pool)),
        "sport": data.draw(st.none() | st.integers(0, 0xFFFF)),
        "dst": data.draw(st.none() | st.sampled_from(pool)),
        "dport": data.draw(st.none() | st.integers(0, 0xFFFF)),
    }
    out = bytes(pk.rewrite(raw, p, **new))
    q = pk.parse(out)
    assert q is not None and len(out) == len(raw)
    want = {
        "src": p.src if new["src"] is None else new["src"],
        "sport": p.sport if new["sport"] is None else new["sport"],
        "dst": p.dst if new["dst"] is None else new["dst"],
        "dport": p.dport if new["dport"] is None else new["dport"],
    }
    assert (q.src, q.sport, q.dst, q.dport) == (
        want["src"],
        want["sport"],
        want["dst"],
        want["dport"],
    )
    same = ("version", "protocol", "l4", "end", "flags", "seq", "ack", "payload_len", "fragment")
    assert all(getattr(q, f) == getattr(p, f) for f in same)
    assert _checksums_ok(out, q)
    # Only addresses, ports and checksums changed; options, extension headers, the rest of the
    # transport header, the payload and any trailing bytes are as they were.
    csum = 16 if p.protocol == pk.TCP else 6
    touched = set(range(p.l4, p.l4 + 4)) | set(range(p.l4 + csum, p.l4 + csum + 2))
    touched |= set(range(10, 20)) if p.version == 4 else set(range(8, 40))
    assert all(out[i] == raw[i] for i in range(len(raw)) if i not in touched)


@CI
@given(g.packets)
def test_reject_packets_answer_any_parsed_packet(raw: bytes) -> None:
    p = pk.parse(raw)
    if p is None or p.fragment:
        return
    if p.protocol == pk.TCP:
        for rst, back in ((pk.build_rst(p), True), (pk.build_rst_forward(p), False)):
            q = pk.parse(bytes(rst))
            assert q is not None and q.protocol == pk.TCP and q.flags & pk.TCP_RST
            tup = (q.src, q.sport, q.dst, q.dport)
            assert tup == (
                (p.dst, p.dport, p.src, p.sport) if back else (p.src, p.sport, p.dst, p.dport)
            )
            assert _checksums_ok(bytes(rst), q)
    elif p.protocol == pk.UDP:
        err = bytes(pk.build_port_unreachable(raw, p))
        q = pk.parse(err)
        assert q is not None and (q.src, q.dst) == (p.dst, p.src)
        assert len(err) <= (576 if p.version == 4 else 1280)
        assert err[q.l4 + 8 :] == raw[: len(err) - q.l4 - 8]  # quotes the offending packet
        assert q.icmp_type == (3 if p.version == 4 else 1)


def test_rewrite_refuses_an_address_of_the_other_family() -> None:
    raw = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 1, 0, 64, 17, 0, g.V4[0], g.V4[1])
    raw += struct.pack("!HHHH", 1, 2, 8, 0)
    p = pk.parse(raw)
    assert p is not None
    with pytest.raises(ValueError, match="4-byte address"):
        pk.rewrite(raw, p, dst=g.V6[0])  # would overwrite the ports with address bytes


# ---- the core: every packet decided once, blocked flows never pass ---------------------------


class Tok:
    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def __repr__(self) -> str:
        return f"Tok({self.n})"


_BLOCKING = {
    Verdict.PERMANENT_BLOCK,
    Verdict.PERMANENT_DROP,
    Verdict.FAILED,
    Verdict.UNDETERMINABLE,
}

#: Eight flows: few enough that verdicts and packets meet often.
flows = st.builds(
    Flow,
    st.sampled_from([g.TCP, g.UDP]),
    st.just(g.V4[0]),
    st.sampled_from([80, 40000]),
    st.just(g.V4[1]),
    st.sampled_from([80, 40000]),
)


@st.composite
def flow_packet(draw: st.DrawFn) -> tuple[str, bytes, bool, bool]:
    """A packet of one of `flows`' flows (so verdicts apply), any TCP flags, maybe options."""
    f = draw(flows)
    outbound = draw(st.booleans())
    raw = g.for_flow(
        *(f.protocol, f.local_ip, f.local_port, f.remote_ip, f.remote_port),
        outbound,
        draw(st.sampled_from([0x02, 0x12, 0x10, 0x18, 0x11, 0x04, 0x14, 0x03, 0x07])),
        draw(st.sampled_from([b"", b"\x01\x01\x01\x00", b"\x07\x07\x04" + bytes(5)])),
        draw(st.binary(max_size=8)),
    )
    return ("packet", raw, outbound, draw(st.booleans()))


_packet = flow_packet()
_noise = st.tuples(st.just("packet"), g.packets, st.booleans(), st.booleans())
_decide = st.tuples(st.just("decide"), st.integers(0, 40), st.sampled_from(Verdict))
_cache = st.tuples(st.just("cache"), flows, st.sampled_from(Verdict))
# one_of picks its branches alike: repeating one weights it. Mostly flow packets and
# verdicts, so that verdicts meet their flows' packets; a CacheClear now and then.
steps = st.lists(
    st.one_of(_packet, _packet, _packet, _noise, _decide, _cache, _cache, st.just(("clear",))),
    min_size=5,
    max_size=80,
)


def _disposed(acts: list[object]) -> list[object]:
    return [a.token for a in acts if isinstance(a, Pass | Drop | Reroute)]


@pytest.mark.parametrize("kernel_cache", [False, True], ids=["filters", "kernel-cache"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=steps)
def test_core_decides_every_packet_once_and_never_passes_a_blocked_flow(
    kernel_cache: bool, steps: list
) -> None:
    core = CaptureCore(Config(kernel_cache=kernel_cache))
    now = 1_000_000_000
    seen: dict[int, Tok] = {}
    disposed: list[object] = []
    held: set[int] = set()
    verdicts: dict[Flow, Verdict] = {}  # what the ALE told us, keyed like the core

    def run(acts: list[object]) -> list[object]:
        """Carry out `acts` as the shell would; the tokens they released (Pass/Drop/Reroute)."""
        out = _disposed(acts)
        disposed.extend(out)
        for a in acts:
            if isinstance(a, ToAle) and isinstance(a.msg, PacketHeld):
                held.add(a.msg.hold_id)
            elif isinstance(a, SetFilter):  # the shell's new handle is live at once
                out += run(core.filter_active(a.generation, a.ports, now))
            assert not isinstance(a, Inject) or isinstance(a.raw, bytes)
        return out

    for step in steps:
        now += 1_000_000
        if step[0] == "packet":
            _, raw, outbound, loopback = step
            t = Tok(len(seen))
            seen[t.n] = t
            acts = core.on_packet(t, raw, outbound, loopback, now)
            run(acts)
            p = pk.parse(raw)
            if p is None:
                assert acts == [Drop(t)]  # fail closed: unreadable packets are dropped
                continue
            if p.fragment or p.protocol not in (pk.TCP, pk.UDP):
                continue
            flow = (
                Flow(p.protocol, p.src, p.sport, p.dst, p.dport)
                if outbound
                else Flow(p.protocol, p.dst, p.dport, p.src, p.sport)
            )
            if verdicts.get(flow) in _BLOCKING and not loopback:
                passed = [a for a in acts if isinstance(a, Pass | Reroute) and a.token is t]
                assert not passed, (flow, verdicts[flow], acts)
        elif step[0] == "decide":
            _, hold, verdict = step
            run(core.on_message(Decision((hold,), verdict), now))
        elif step[0] == "cache":
            _, flow, verdict = step
            verdicts[flow] = verdict
            run(core.on_message(CacheSet(flow, verdict), now))
        else:
            verdicts.clear()
            run(core.on_message(CacheClear(), now))
    # Decide everything still held: now every captured packet has had exactly one fate.
    run(core.on_message(Decision(tuple(sorted(held)), Verdict.PERMANENT_DROP), now + 1))
    for t in seen.values():
        assert disposed.count(t) == 1, (t, disposed.count(t))  # never lost, never twice
    assert not core.held
