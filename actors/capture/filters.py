"""The WinDivert filter strings the capture handle is opened with.

A handle's filter is fixed at open, so the set of TCP connections that need every packet is
expressed as local ports and the handle is swapped when it changes (see shell.py). The
filter language only negates single tests (`not tcp`; `not (...)` is a parse error) and a
compiled filter holds a few hundred terms (docs/measurements.md M4).
The in-kernel matcher is only exact for positive tests (see OTHER_PROTOCOLS).
"""

from __future__ import annotations

from collections.abc import Iterable

#: IP protocols other than TCP/UDP/ICMP that are asked about, as the kext asks about every
#: packet of them: IGMP, IPIP, IPv6-in-IPv4, GRE, ESP, AH, OSPF, PIM, VRRP, L2TP, SCTP,
#: UDP-Lite. A list, not "everything but TCP/UDP", because the in-kernel matcher only
#: approximates negated and ranged protocol tests: `ip and not tcp and not udp` (and
#: `ip.Protocol != 6`, `ip.Protocol > 17`) made the kernel divert every bulk TCP packet
#: to the library, which re-checks and reinjects it - halving throughput (docs/measurements.md
#: M10). Unlisted protocols pass unasked (documented deviation).
OTHER_PROTOCOLS = (2, 4, 41, 47, 50, 51, 89, 103, 112, 115, 132, 136)

#: What always needs Python: TCP connection openers in both directions, FIN/RST (so we see
#: connections end), every UDP datagram, ICMP, the protocols above over IPv4, and ICMPv6
#: except neighbour discovery / MLD (link plumbing, the ARP of IPv6; holding it breaks IPv6).
#:
#: Other IPv6 protocols are not diverted, because libebpfdivert 0.0.5 hands ARP frames
#: (Ethernet header and all) to the filter as if they were IP: when the destination MAC
#: starts with nibble 6 they parse as IPv6 with a random next header, an "other IPv6
#: protocol" clause matches them in the kernel and the frame is lost - ARP to that
#: neighbour fails and every connection with it (measured). Residual risk: a neighbour
#: whose MAC starts with 0x3a can still be misread as ICMPv6 by a host whose MAC starts
#: with nibble 6.
BASE = (
    "(tcp.Syn and not tcp.Ack) or tcp.Fin or tcp.Rst or udp or icmp"
    " or (icmpv6 and (icmpv6.Type < 130 or icmpv6.Type > 137) and icmpv6.Type != 143)"
    + "".join(f" or ip.Protocol == {n}" for n in OTHER_PROTOCOLS)
)

#: Filter term budget for per-connection ports, two terms each; beyond it: all TCP.
MAX_PORTS = 96


def _exclusion(ports: Iterable[int]) -> str:
    """Never divert our own control traffic (either side of the port)."""
    terms = []
    for p in sorted(ports):
        terms.append(f"(not tcp or (tcp.SrcPort != {p} and tcp.DstPort != {p}))")
        terms.append(f"(not udp or (udp.SrcPort != {p} and udp.DstPort != {p}))")
    return " and ".join(terms)


def build(per_packet_ports: frozenset[int] | None, exclude_ports: Iterable[int] = ()) -> str:
    """The filter: BASE, plus every TCP packet on `per_packet_ports` (None: all TCP)."""
    if per_packet_ports is None:
        wanted = f"tcp or ({BASE})"
    elif per_packet_ports:
        ports = " or ".join(
            f"tcp.SrcPort == {p} or tcp.DstPort == {p}" for p in sorted(per_packet_ports)
        )
        wanted = f"({BASE}) or (tcp and ({ports}))"
    else:
        wanted = BASE
    excl = _exclusion(exclude_ports)
    return f"({excl}) and ({wanted})" if excl else wanted
