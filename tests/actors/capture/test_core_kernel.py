"""The capture core with the kernel flow cache (Config.kernel_cache): which verdicts go into the
kernel's map, when entries are deleted, the fixed filter, idle expiry through the kernel."""

from __future__ import annotations

from kextless.actors.capture.core import (
    Action,
    CaptureCore,
    Config,
    Drop,
    ExistingFlow,
    ExistingMode,
    Inject,
    KernelClear,
    KernelDelete,
    KernelProbe,
    KernelPut,
    KernelRedirect,
    KernelVerdict,
    Pass,
    Reroute,
    SetFilter,
    ToAle,
)
from kextless.protocol.enums import Direction, Verdict
from kextless.protocol.messages import CacheClear, CacheSet, Decision, Flow, PacketHeld
from tests.actors.capture import crafted as c
from tests.actors.capture.crafted import a
from tests.actors.capture.test_core import L4, NOW, R4, asked, feed, syn_out, tcp_flow

IDLE = 60_000_000_000


def kcore(**kw: object) -> CaptureCore:
    return CaptureCore(Config(kernel_cache=True, idle_ns=IDLE, **kw))  # type: ignore[arg-type]


def kernel(acts: list[Action]) -> list[Action]:
    return [x for x in acts if isinstance(x, KernelPut | KernelDelete | KernelClear | KernelProbe)]


def udp_out(sport: int = 5000, dport: int = 53, payload: bytes = b"q") -> bytes:
    return c.v4(L4, R4, c.udp(sport, dport, payload))


def udp_flow(lport: int = 5000, rport: int = 53) -> Flow:
    return Flow(17, a(L4), lport, a(R4), rport)


def ack_out(sport: int = 40000, dport: int = 80, flags: int = c.ACK) -> bytes:
    return c.v4(L4, R4, c.tcp(sport, dport, flags, seq=2000, payload=b"data"))


def decide(core: CaptureCore, raw: bytes, verdict: Verdict, now: int = NOW) -> list[Action]:
    """Ask about `raw` and answer it like the ALE (CacheSet for permanent verdicts, then the
    Decision); every action from the answer, in order."""
    _, acts = feed(core, raw, now=now)
    (held,) = asked(acts)
    out: list[Action] = []
    if verdict.is_permanent:
        out += core.on_message(CacheSet(held.flow, verdict), now)
    out += core.on_message(Decision((held.hold_id,), verdict), now)
    return out


def test_asking_deletes_a_stale_entry_first_and_only_once() -> None:
    core = kcore()
    _, acts = feed(core, syn_out())
    assert isinstance(acts[0], KernelDelete) and acts[0].flow == tcp_flow()
    assert isinstance(acts[1], ToAle) and isinstance(acts[1].msg, PacketHeld)
    # A retransmitted SYN joins the request; another packet of the same undecided flow is
    # asked again, with no second delete (we know there is no entry).
    _, acts = feed(core, syn_out(seq=1000))
    assert acts == []
    _, acts = feed(core, udp_out())
    # Retired, not deleted: a predecessor's counters stay readable for the bandwidth actor.
    assert kernel(acts) == [KernelDelete(udp_flow(), keep_counts=True)]
    _, acts = feed(core, udp_out(payload=b"other"))
    assert kernel(acts) == [] and asked(acts)


def test_permanent_accept_puts_pass_before_the_held_packet_is_released() -> None:
    core = kcore()
    tok, acts = feed(core, syn_out())
    (held,) = asked(acts)
    out = core.on_message(Decision((held.hold_id,), Verdict.PERMANENT_ACCEPT), NOW)
    puts = [i for i, x in enumerate(out) if isinstance(x, KernelPut)]
    passes = [i for i, x in enumerate(out) if isinstance(x, Pass)]
    assert len(puts) == 1 and passes == [puts[0] + 1]
    assert out[puts[0]] == KernelPut(tcp_flow(), KernelVerdict.PASS, Verdict.PERMANENT_ACCEPT)
    assert out[passes[0]] == Pass(tok)
    assert not [x for x in out if isinstance(x, SetFilter)]
    # The ALE's CacheSet for the same verdict arriving after the Decision writes nothing new.
    assert kernel(core.on_message(CacheSet(tcp_flow(), Verdict.PERMANENT_ACCEPT), NOW)) == []


def test_udp_cache_set_before_decision_puts_once() -> None:
    core = kcore()
    out = decide(core, udp_out(), Verdict.PERMANENT_ACCEPT)
    assert kernel(out) == [KernelPut(udp_flow(), KernelVerdict.PASS, Verdict.PERMANENT_ACCEPT)]
    assert isinstance(out[-1], Pass)
    assert out.index(kernel(out)[0]) < out.index(out[-1])


def test_permanent_drop_puts_drop() -> None:
    core = kcore()
    out = decide(core, udp_out(), Verdict.PERMANENT_DROP)
    assert kernel(out) == [KernelPut(udp_flow(), KernelVerdict.DROP, Verdict.PERMANENT_DROP)]
    assert isinstance(out[-1], Drop)


def test_blocks_temporary_verdicts_and_redirects_stay_out_of_the_kernel() -> None:
    for verdict in (
        Verdict.PERMANENT_BLOCK,
        Verdict.BLOCK,
        Verdict.ACCEPT,
        Verdict.DROP,
        Verdict.UNDETERMINABLE,
        Verdict.REDIRECT_NAME_SERVER,
    ):
        core = kcore()
        out = decide(core, udp_out(), verdict)
        assert not [x for x in kernel(out) if isinstance(x, KernelPut)], verdict
        core = kcore()
        out = decide(core, syn_out(), verdict)
        assert not [x for x in kernel(out) if isinstance(x, KernelPut)], verdict
        # No filter swap and nothing parked: the held SYN's fate is in the same answer.
        assert not [x for x in out if isinstance(x, SetFilter)], verdict
        assert [x for x in out if isinstance(x, Pass | Drop | Reroute)], verdict


def test_temporary_accept_tcp_asks_every_packet_without_a_filter_change() -> None:
    core = kcore()
    decide(core, syn_out(), Verdict.ACCEPT)
    _, acts = feed(core, ack_out())
    assert asked(acts) and not [x for x in acts if isinstance(x, SetFilter)]


def test_verdict_change_deletes_the_entry() -> None:
    core = kcore()
    decide(core, syn_out(), Verdict.PERMANENT_ACCEPT)
    out = core.on_message(CacheSet(tcp_flow(), Verdict.PERMANENT_BLOCK), NOW + 1)
    # Retired: its packets come here again, its counters stay for the bandwidth actor.
    assert kernel(out) == [KernelDelete(tcp_flow(), keep_counts=True)]
    assert not [x for x in out if isinstance(x, SetFilter)]
    # Its next packet reaches us (the entry is gone) and is reset at both ends.
    _, acts = feed(core, ack_out(), now=NOW + 2)
    assert [x for x in acts if isinstance(x, Inject)] and isinstance(acts[0], Drop)
    # Accept -> drop overwrites the entry; drop -> accept again.
    out = core.on_message(CacheSet(tcp_flow(), Verdict.PERMANENT_DROP), NOW + 3)
    assert kernel(out) == [KernelPut(tcp_flow(), KernelVerdict.DROP, Verdict.PERMANENT_DROP)]
    out = core.on_message(CacheSet(tcp_flow(), Verdict.PERMANENT_ACCEPT), NOW + 4)
    assert kernel(out) == [KernelPut(tcp_flow(), KernelVerdict.PASS, Verdict.PERMANENT_ACCEPT)]
    out = core.on_message(CacheSet(tcp_flow(), Verdict.REDIRECT_TUNNEL), NOW + 5)
    assert kernel(out) == [KernelDelete(tcp_flow(), keep_counts=True)]
    # Forgotten (CacheClear aside, the only way): the retired entry is deleted for good, and
    # the redirect's byte translation goes with it.
    assert core._forget(tcp_flow(), NOW + 6) == [
        KernelDelete(tcp_flow()),
        KernelRedirect(tcp_flow(), (a(L4), 717), counted=False),
    ]


def test_cache_clear_clears_the_kernel_and_re_asks() -> None:
    core = kcore()
    decide(core, syn_out(), Verdict.PERMANENT_ACCEPT)
    decide(core, udp_out(), Verdict.PERMANENT_ACCEPT)
    out = core.on_message(CacheClear(), NOW + 1)
    assert out == [KernelClear()]
    # The live TCP connection's next packet is asked, and no delete is needed: all cleared.
    _, acts = feed(core, ack_out(), now=NOW + 2)
    assert asked(acts) and kernel(acts) == []
    # UDP's record went with its verdict: asked again like a new flow.
    _, acts = feed(core, udp_out(), now=NOW + 2)
    assert asked(acts)


def test_a_packet_of_an_evicted_flow_puts_it_back_but_not_control_packets() -> None:
    core = kcore()
    decide(core, syn_out(), Verdict.PERMANENT_ACCEPT)
    later = NOW + 10_000_000
    tok, acts = feed(core, ack_out(), now=later)
    assert acts == [
        KernelPut(tcp_flow(), KernelVerdict.PASS, Verdict.PERMANENT_ACCEPT),
        Pass(tok),
    ]
    # Packets queued behind that put arrive too: no second write within kernel_reput_ns.
    tok, acts = feed(core, ack_out(), now=later + 1000)
    assert acts == [Pass(tok)]
    # SYN/FIN/RST always come here: they pass without a write.
    tok, acts = feed(core, ack_out(flags=c.ACK | c.FIN), now=later + 20_000_000)
    assert acts == [Pass(tok)]
    # UDP the same; a dropped flow's evicted DROP entry too.
    decide(core, udp_out(), Verdict.PERMANENT_ACCEPT)
    tok, acts = feed(core, udp_out(), now=later)
    assert acts == [KernelPut(udp_flow(), KernelVerdict.PASS, Verdict.PERMANENT_ACCEPT), Pass(tok)]
    decide(core, udp_out(sport=5001), Verdict.PERMANENT_DROP)
    tok, acts = feed(core, udp_out(sport=5001), now=later)
    assert acts == [
        KernelPut(udp_flow(5001), KernelVerdict.DROP, Verdict.PERMANENT_DROP),
        Drop(tok),
    ]


def test_excluded_ports_and_other_protocols_are_never_put() -> None:
    core = kcore(exclude_ports=frozenset({53}))
    assert kernel(core.on_message(CacheSet(udp_flow(), Verdict.PERMANENT_ACCEPT), NOW)) == [
        KernelDelete(udp_flow(), keep_counts=True)
    ]
    icmp = Flow(1, a(L4), 0, a(R4), 0)
    assert core.on_message(CacheSet(icmp, Verdict.PERMANENT_ACCEPT), NOW) == []


def test_idle_udp_flow_is_probed_kept_while_the_kernel_sees_it_then_forgotten() -> None:
    core = kcore()
    decide(core, udp_out(), Verdict.PERMANENT_ACCEPT)
    due = core.next_deadline_ns()
    assert due is not None and due > NOW + IDLE
    out = core.on_deadline(due)
    assert out == [KernelProbe((udp_flow(),))]
    assert udp_flow() in core.connections  # not forgotten: its packets pass in the kernel
    assert core.on_deadline(due + 1) == []  # one probe at a time
    # The kernel passed a packet 10 s ago: kept until idle_ns after that.
    seen = due - 10_000_000_000
    assert core.kernel_activity({udp_flow(): seen}, due) == []
    assert core.next_deadline_ns() == seen + IDLE + 1
    out = core.on_deadline(seen + IDLE + 1)
    assert out == [KernelProbe((udp_flow(),))]
    # No packet since: forgotten, entry deleted; the next packet is asked again.
    out = core.kernel_activity({udp_flow(): seen}, seen + IDLE + 1)
    assert out == [KernelDelete(udp_flow())]
    assert udp_flow() not in core.connections
    _, acts = feed(core, udp_out(), now=seen + IDLE + 2)
    assert asked(acts)


def test_an_entry_gone_from_the_kernel_expires_and_a_stale_probe_answer_is_ignored() -> None:
    core = kcore()
    decide(core, udp_out(), Verdict.PERMANENT_ACCEPT)
    due = core.next_deadline_ns()
    assert due is not None
    assert core.on_deadline(due) == [KernelProbe((udp_flow(),))]
    # A new verdict arrives before the answer: the answer no longer counts.
    core.on_message(CacheSet(udp_flow(), Verdict.PERMANENT_ACCEPT), due + 1)
    assert core.kernel_activity({udp_flow(): None}, due + 2) == []
    assert udp_flow() in core.connections
    due = core.next_deadline_ns()
    assert due is not None
    assert core.on_deadline(due) == [KernelProbe((udp_flow(),))]
    assert core.kernel_activity({udp_flow(): None}, due) == [KernelDelete(udp_flow())]


def test_ended_tcp_and_dropped_flows_expire_without_a_probe() -> None:
    core = kcore()
    decide(core, syn_out(), Verdict.PERMANENT_ACCEPT)
    fin_at = NOW + 5
    feed(core, ack_out(flags=c.ACK | c.FIN), now=fin_at)
    due = core.next_deadline_ns()
    assert due is not None
    assert core.on_deadline(due) == [KernelDelete(tcp_flow())]
    decide(core, udp_out(), Verdict.PERMANENT_DROP)
    due = core.next_deadline_ns()
    assert due is not None
    assert core.on_deadline(due) == [KernelDelete(udp_flow())]


def test_a_new_syn_on_an_ended_tuple_deletes_before_asking() -> None:
    core = kcore()
    decide(core, syn_out(), Verdict.PERMANENT_ACCEPT)
    feed(core, ack_out(flags=c.ACK | c.RST), now=NOW + 5)
    _, acts = feed(core, syn_out(seq=9), now=NOW + 10)
    assert isinstance(acts[0], KernelDelete) and asked(acts)
    assert len(kernel(acts)) == 1


def test_the_max_flows_bound_deletes_the_forgotten_entry() -> None:
    core = kcore(max_flows=1)
    decide(core, udp_out(), Verdict.PERMANENT_ACCEPT)
    out = decide(core, udp_out(sport=5001), Verdict.PERMANENT_ACCEPT)
    assert KernelDelete(udp_flow()) in out
    assert out.index(KernelDelete(udp_flow())) < out.index(
        KernelPut(udp_flow(5001), KernelVerdict.PASS, Verdict.PERMANENT_ACCEPT)
    )


def test_existing_connections_accept_puts_and_ask_deletes() -> None:
    flow = tcp_flow(41000, 443)
    core = kcore(existing=ExistingMode.ACCEPT)
    out = core.existing([ExistingFlow(flow, Direction.OUTBOUND)], NOW)
    assert kernel(out) == [KernelPut(flow, KernelVerdict.PASS, Verdict.PERMANENT_ACCEPT)]
    core = kcore()
    out = core.existing([ExistingFlow(flow, Direction.OUTBOUND)], NOW)
    assert kernel(out) == [KernelDelete(flow, keep_counts=True)]
    assert out.index(KernelDelete(flow, keep_counts=True)) < out.index(
        next(x for x in out if isinstance(x, ToAle))
    )
    assert not [x for x in out if isinstance(x, SetFilter)]


def test_without_the_kernel_cache_no_kernel_action_is_ever_emitted() -> None:
    core = CaptureCore(Config(idle_ns=IDLE))
    out: list[Action] = []
    out += decide(core, syn_out(), Verdict.PERMANENT_ACCEPT)
    out += decide(core, udp_out(), Verdict.PERMANENT_ACCEPT)
    out += decide(core, udp_out(sport=5001), Verdict.PERMANENT_DROP)
    out += core.on_message(CacheSet(tcp_flow(), Verdict.ACCEPT), NOW + 1)
    out += core.on_message(CacheClear(), NOW + 2)
    out += core.on_deadline(NOW + 2 * IDLE)
    assert kernel(out) == []
    assert [x for x in out if isinstance(x, SetFilter)]  # the per-port filter path


def test_after_the_replay_adopted_entries_nobody_vouches_for_are_deleted() -> None:
    from kextless.actors.capture.core import KernelAudit, ScanExisting, _reversed

    core = kcore()
    core.start(1, NOW)
    # The ALE's replay after a restart: this UDP flow keeps its verdict (and is re-put).
    out = core.on_message(CacheSet(udp_flow(), Verdict.PERMANENT_ACCEPT), NOW + 1)
    assert kernel(out) == [KernelPut(udp_flow(), KernelVerdict.PASS, Verdict.PERMANENT_ACCEPT)]
    due = core.next_deadline_ns()
    assert due is not None
    assert core.on_deadline(due) == [ScanExisting(), KernelAudit()]
    stale = tcp_flow(41000, 443)
    # The map, as the kernel lists it: both orientations of each flow.
    listed = [udp_flow(), _reversed(udp_flow()), stale, _reversed(stale)]
    assert core.kernel_audit(listed, due) == [KernelDelete(stale)]
    # Without the kernel cache there is no audit.
    plain = CaptureCore(Config())
    plain.start(1, NOW)
    due = plain.next_deadline_ns()
    assert due is not None
    assert plain.on_deadline(due) == [ScanExisting()]


# ---- redirects: their bytes belong to the connection the application sees ------------------


def _redirects(acts: list[Action]) -> list[Action]:
    return [x for x in acts if isinstance(x, KernelRedirect)]


def test_a_redirect_has_its_rewritten_packets_counted_as_the_applications_flow() -> None:
    core = kcore()
    query = c.v4(L4, "10.0.0.99", c.udp(40000, 53, b"dns?"))
    flow = Flow(17, a(L4), 40000, a("10.0.0.99"), 53)
    out = decide(core, query, Verdict.REDIRECT_NAME_SERVER)
    lo = (a("127.0.0.1"), 53)
    # The translation is written once, before the first rewritten packet is re-injected.
    assert _redirects(out) == [KernelRedirect(flow, lo)]
    first = next(i for i, x in enumerate(out) if isinstance(x, KernelRedirect))
    assert first < next(i for i, x in enumerate(out) if isinstance(x, Reroute))
    _, acts = feed(core, query, now=NOW + 1)
    assert isinstance(acts[-1], Reroute) and _redirects(acts) == []
    # A verdict that is no redirect: the flow's packets carry its own 5-tuple again.
    out = core.on_message(CacheSet(flow, Verdict.PERMANENT_ACCEPT), NOW + 2)
    assert _redirects(out) == [KernelRedirect(flow, lo, counted=False)]
    out = core.on_message(CacheSet(flow, Verdict.REDIRECT_NAME_SERVER), NOW + 3)
    assert _redirects(out) == [KernelRedirect(flow, lo)]
    assert _redirects(core._forget(flow, NOW + 4)) == [KernelRedirect(flow, lo, counted=False)]


def test_two_redirects_sharing_a_rewritten_tuple_keep_the_latest_senders() -> None:
    """One UDP socket querying two servers, both redirected to the one resolver: after the
    rewrite their packets carry the same 5-tuple, so the translation (like the reply key)
    follows the connection that sent last, and the other's end does not remove it."""
    core = kcore()
    one = Flow(17, a(L4), 40000, a("10.0.0.98"), 53)
    two = Flow(17, a(L4), 40000, a("10.0.0.99"), 53)
    lo = (a("127.0.0.1"), 53)
    decide(core, c.v4(L4, "10.0.0.98", c.udp(40000, 53, b"a")), Verdict.REDIRECT_NAME_SERVER)
    out = decide(core, c.v4(L4, "10.0.0.99", c.udp(40000, 53, b"b")), Verdict.REDIRECT_NAME_SERVER)
    assert _redirects(out) == [KernelRedirect(two, lo)]
    _, acts = feed(core, c.v4(L4, "10.0.0.98", c.udp(40000, 53, b"c")), now=NOW + 1)
    assert _redirects(acts) == [KernelRedirect(one, lo)]
    assert _redirects(core._forget(two, NOW + 2)) == []  # `one` owns it now
    assert _redirects(core._forget(one, NOW + 3)) == [KernelRedirect(one, lo, counted=False)]


def test_without_the_kernel_cache_no_redirect_translation_is_asked_for() -> None:
    core = CaptureCore()
    out = decide(core, c.v4(L4, "10.0.0.99", c.udp(40000, 53, b"q")), Verdict.REDIRECT_NAME_SERVER)
    assert isinstance(out[-1], Reroute) and _redirects(out) == []
