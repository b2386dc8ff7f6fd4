"""The L2 pass: a tiny TC program of ours that lets every non-IP frame by before the divert
program can see it.

libebpfdivert 0.0.5 parses whatever it is handed from its first byte: an ARP frame (Ethernet
header and all) to a MAC starting with nibble 4 or 6 reads as an IPv4 / IPv6 packet with a
random protocol (the "IPv6 next header" is the first byte of the sender's MAC), and a filter
clause that asks about every protocol then takes it - the frame is lost and ARP to that
neighbour fails (tests/actors/capture/test_filters.py). This program runs first (clsact
ingress and egress, pref `L2PASS_PREF`, before the divert programs at 30001 - priority and
the guard at 65000): a frame whose ethertype is not IPv4, IPv6 or a VLAN tag gets TC_ACT_OK,
which ends the filter chain, so the divert program never reads it; every other frame goes on
(TC_ACT_UNSPEC). VLAN-tagged frames go on to the divert program, which parses the tag.

Nine hand-assembled instructions, loaded and attached like the guard (`tcbpf.py`).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from kextless.actors.capture import tcbpf
from kextless.actors.capture.tcbpf import (
    EXIT,
    JEQ_K,
    LDXW,
    MOV64_K,
    SKB_PROTOCOL,
    TC_ACT_OK,
    TC_ACT_UNSPEC,
    insn,
)

log = logging.getLogger("capture.l2pass")

#: Before every divert program (30001 - priority) and before a flow cache at pref 10
#: (../shared/reference/kernel-flow-cache.md §b).
L2PASS_PREF = 5
L2PASS_NAME = "kextless_l2pass"
#: Ethertypes that go on to the divert program (network byte order in skb->protocol).
IP_ETHERTYPES = (0x0800, 0x86DD, 0x8100, 0x88A8)


def program() -> bytes:
    """IPv4 / IPv6 / VLAN -> UNSPEC (on to the divert program); anything else -> OK."""
    n = len(IP_ETHERTYPES)
    insns = [insn(LDXW, 2, 1, SKB_PROTOCOL)]  # r2 = skb->protocol
    for i, et in enumerate(IP_ETHERTYPES):
        # jump over the remaining tests and the OK return (2 insns) to the UNSPEC return
        insns.append(insn(JEQ_K, 2, 0, (n - 1 - i) + 2, socket.htons(et)))
    insns += [
        insn(MOV64_K, 0, 0, 0, TC_ACT_OK),  # not IP: pass, the divert program never sees it
        insn(EXIT),
        insn(MOV64_K, 0, 0, 0, TC_ACT_UNSPEC),  # IP: on down the chain
        insn(EXIT),
    ]
    return b"".join(insns)


def load() -> int:
    """Load the program; its fd (the caller closes it). OSError with the verifier log."""
    return tcbpf.load(program(), L2PASS_NAME)


@dataclass
class L2Pass:
    """The loaded program and the links it is attached to (ifindex -> name). A link keeps it
    for its lifetime: it is harmless without a divert program, and is removed by `close`."""

    ipr: IPRoute
    fd: int
    attached: dict[int, str]

    @classmethod
    def open(cls, ipr: IPRoute | None = None) -> L2Pass:
        """Load the program (and open an rtnetlink socket unless given one). OSError."""
        fd = load()
        return cls(ipr if ipr is not None else IPRoute(), fd, {})

    def sync(self) -> list[str]:
        """Attach to every link of the namespace that lacks it (but `lo`, which carries no
        frames but IP): at start, before the first handle opens, and on every link event,
        before the handle for a new link opens. Returns the names attached now."""
        now = []
        present = set()
        for link in self.ipr.get_links():
            index, name = int(link["index"]), str(link.get_attr("IFLA_IFNAME"))
            present.add(index)
            if index in self.attached or name == "lo":
                continue
            try:
                self.attach(index, name)
                now.append(name)
            except (OSError, NetlinkError) as e:
                log.error(
                    "l2pass on %s (ifindex %d) failed: %s; ARP there may be lost", name, index, e
                )
        for gone in set(self.attached) - present:
            del self.attached[gone]
        return now

    def attach(self, index: int, name: str = "") -> None:
        """Let non-IP frames on `index` skip the divert program (ingress and egress); replaces
        one a previous capture left. OSError/NetlinkError."""
        tcbpf.attach(self.ipr, index, self.fd, L2PASS_NAME, L2PASS_PREF, replace=True)
        self.attached[index] = name
        log.debug("l2pass on %s (ifindex %d)", name or "?", index)

    def detach(self, index: int) -> None:
        """Remove it from `index` (a link that is gone took its filters with it)."""
        self.attached.pop(index, None)
        tcbpf.detach(self.ipr, index, L2PASS_PREF)

    def close(self) -> None:
        """Detach from every link, then close the program fd and the rtnetlink socket."""
        for index in list(self.attached):
            try:
                self.detach(index)
            except (OSError, NetlinkError) as e:
                log.warning("removing l2pass from ifindex %d failed: %s", index, e)
        os.close(self.fd)
        self.ipr.close()
