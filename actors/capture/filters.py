"""The WinDivert filter strings the capture handle is opened with.

A handle's filter is fixed at open, so the set of TCP connections that need every packet is
expressed as local ports and the handle is swapped when it changes (see shell.py). The
filter language only negates single tests (`not tcp`; `not (...)` is a parse error) and a
compiled filter holds ~250 terms (measured: 252 `localPort == N` terms, 126 port pairs).
"""

from __future__ import annotations

from collections.abc import Iterable

#: What always needs Python: TCP connection openers in both directions, FIN/RST (so we see
#: connections end), every UDP datagram, every other IPv4 protocol and ICMPv6 except
#: neighbour discovery / MLD (link plumbing, the ARP of IPv6; holding it breaks IPv6 itself).
#:
#: Other IPv6 protocols are NOT diverted, because libebpfdivert 0.0.5 hands ARP frames
#: (Ethernet header and all) to the filter as if they were IP: when the destination MAC
#: starts with nibble 6 they parse as IPv6 with a random next header, an "other IPv6
#: protocol" clause matches them in the kernel and the frame is lost - ARP to that
#: neighbour fails and every connection with it (measured; a guard on the ARP signature
#: with packet32[] is not honoured by the in-kernel matcher). Residual risk: a neighbour
#: whose MAC starts with 0x3a can still be misread as ICMPv6 by a host whose MAC starts
#: with nibble 6.
BASE = ("(tcp.Syn and not tcp.Ack) or tcp.Fin or tcp.Rst or udp"
        " or (ip and not tcp and not udp)"
        " or (icmpv6 and (icmpv6.Type < 130 or icmpv6.Type > 137) and icmpv6.Type != 143)")

#: Filter term budget for per-connection ports, two terms each; beyond it: all TCP.
MAX_PORTS = 100


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
        ports = " or ".join(f"tcp.SrcPort == {p} or tcp.DstPort == {p}"
                            for p in sorted(per_packet_ports))
        wanted = f"({BASE}) or (tcp and ({ports}))"
    else:
        wanted = BASE
    excl = _exclusion(exclude_ports)
    return f"({excl}) and ({wanted})" if excl else wanted
