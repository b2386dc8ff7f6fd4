"""The WinDivert filter strings the capture handle is opened with.

A handle's filter is fixed at open, so the set of TCP connections that need every packet is
expressed as local ports and the handle is swapped when it changes (see shell.py). The
filter language only negates single tests (`not tcp`; `not (...)` is a parse error) and a
compiled filter holds a few hundred terms (docs/measurements.md M4).

How libebpfdivert 0.0.5 runs a filter (its prefilter.c, measured in docs/measurements.md M22):
it lowers the filter to at most 64 kernel rules per family, one per path through the
compiled filter, each matching a protocol (one value, or all but one value), port ranges,
TCP flags, addresses. What a rule cannot express is dropped from it ("widened"): the kernel
then hands the library more than the filter asks for and the library re-checks each packet
and re-injects the rest in C. That is free for the few packets the kernel already diverts and
ruinous for bulk TCP: a path that excludes TWO protocols (`ip and not tcp and not udp`, or a
`not icmpv6` test after `not tcp`) or a protocol range (`ip.Protocol > 17`) becomes "every
protocol", so every bulk TCP packet went to the library (throughput halved, M10). So:

* every protocol but TCP is asked with ONE exclusion per family: `ip.Protocol != 6` and
  `ipv6 and not tcp` are exact in the kernel (UDP, ICMP and every other protocol, in both
  families, whatever its number);
* what must then be left out is tested only with fields the kernel rules do not know
  (`ipv6.NextHdr`, `packet[i]`): the kernel rule stays "IPv6 but TCP" and the library does
  the exact test on those packets only - IPv6 neighbour discovery / MLD (link plumbing, the
  ARP of IPv6; holding it breaks IPv6) and our own control ports over UDP;
* the IPv6 clause comes last: a failed earlier clause must not add its exclusions to it.

A packet whose real protocol sits behind IPv6 extension headers has its first next header in
the kernel's view: not 6, so it is diverted and the library's exact filter (which walks the
headers) decides; TCP behind extension headers follows the TCP clauses.

These clauses also match ARP frames: the library parses a frame from its first byte, so an ARP
frame to a MAC starting with nibble 4 or 6 reads as IPv4 / IPv6 with a random protocol and
would be taken and lost (measured). `l2pass.py` lets every non-IP frame by before the divert
program; the capture attaches it on every link of the namespace it owns (shell.py).
"""

from __future__ import annotations

from collections.abc import Iterable

#: Always to Python: TCP connection openers in both directions and FIN/RST (so we see
#: connections end). Further TCP (per-packet ports) is added by `build`.
TCP_BASE = "(tcp.Syn and not tcp.Ack) or tcp.Fin or tcp.Rst"
#: Every IPv4 packet but TCP: UDP, ICMP and every other protocol.
V4_OTHER = "ip.Protocol != 6"
#: Every IPv6 packet but TCP, except neighbour discovery and MLD (ICMPv6 types 130-137 and
#: 143, directly or behind one hop-by-hop header, as MLD is sent). The ICMPv6 tests are
#: reached only for next header 58 or 0, so no path of the kernel rules says "not ICMPv6".
V6_OTHER = (
    "(ipv6 and not tcp and ((ipv6.NextHdr != 58 and ipv6.NextHdr != 0)"
    " or (ipv6.NextHdr == 0 and packet[40] != 58)"
    " or icmpv6.Type < 130 or (icmpv6.Type > 137 and icmpv6.Type != 143)))"
)
#: The protocol part of every filter: what always needs Python. IPv6 last (see above).
BASE = f"{TCP_BASE} or {V4_OTHER} or {V6_OTHER}"

#: Filter term budget for per-connection ports, two terms each; beyond it: all TCP.
MAX_PORTS = 96


def _tcp_exclusion(ports: list[int]) -> str:
    """Never divert our own control traffic over TCP (either side of the port); applied inside
    the TCP clauses, where the kernel rules express it exactly."""
    return "".join(f" and tcp.SrcPort != {p} and tcp.DstPort != {p}" for p in ports)


def _udp_exclusion(ports: list[int], v6: bool) -> str:
    """The same for UDP, inside the "every protocol but TCP" clauses: "not UDP" is tested on the
    raw header (`packet[9]` / `ipv6.NextHdr`), which the kernel rules ignore - a `not udp` there
    would be a second protocol exclusion and take every bulk TCP packet (see the docstring)."""
    if not ports:
        return ""
    not_udp = "ipv6.NextHdr != 17" if v6 else "packet[9] != 17"
    ok = " and ".join(f"udp.SrcPort != {p} and udp.DstPort != {p}" for p in ports)
    return f" and ({not_udp} or ({ok}))"


def build(per_packet_ports: frozenset[int] | None, exclude_ports: Iterable[int] = ()) -> str:
    """The filter: BASE, plus every TCP packet on `per_packet_ports` (None: all TCP), minus
    `exclude_ports` (TCP and UDP, either side)."""
    excl = sorted(set(exclude_ports))
    if per_packet_ports is None:
        tcp = "tcp"
    elif per_packet_ports:
        ports = " or ".join(
            f"tcp.SrcPort == {p} or tcp.DstPort == {p}" for p in sorted(per_packet_ports)
        )
        tcp = f"{TCP_BASE} or (tcp and ({ports}))"
    else:
        tcp = TCP_BASE
    if excl:
        tcp = f"(tcp and ({tcp}){_tcp_exclusion(excl)})"
        v4 = f"({V4_OTHER}{_udp_exclusion(excl, v6=False)})"
        v6 = f"({V6_OTHER}{_udp_exclusion(excl, v6=True)})"
    else:
        tcp, v4, v6 = f"({tcp})", V4_OTHER, V6_OTHER
    return f"{tcp} or {v4} or {v6}"


#: With the kernel flow cache (kernel_cache.py) the filter is fixed: every IP packet that
#: kextless_pre (pref 10, before the divert program) lets on - a flow not decided in the
#: kernel, a TCP SYN/FIN/RST, a fragment, an unknown protocol - reaches Python. What must
#: not is left out before the divert program, in the kernel: non-IP frames and IPv6
#: neighbour discovery / MLD pass there, and our own control ports are in its `pass_ports`
#: map. So this filter has one exact kernel rule per family, and no handle swap is ever
#: needed for a verdict (the map replaces the per-port filters).
ALL_IP = "ip or ipv6"


def build_all() -> str:
    """The kernel-cache mode's fixed filter (`ALL_IP`); excluded ports are pass_ports."""
    return ALL_IP
