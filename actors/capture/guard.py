"""The fail-closed guard: a tiny TC program of ours that drops IP on a link until it is diverted.

A link that appears after the divert handle opened carries traffic nobody examines until a new
handle attaches to it (tens of ms). The guard closes that window: attached at once on ingress
and egress (clsact, direct-action, pref `GUARD_PREF`, after every divert program), it drops
IPv4 and IPv6 packets unless they carry the divert library's re-injection mark
(`0x4D49xxxx` in skb->mark, ../shared/reference/kernel-flow-cache.md §c; the guard test
measures it), and lets every other ethertype (ARP) through. It is removed once the new handle's
programs are seen on the link: traffic the divert filter does not match would else be dropped.

Twelve hand-assembled instructions, loaded with bpf(2) and attached by `tcbpf.py`.
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
    ETH_P_ALL,
    EXIT,
    JEQ_K,
    LDXW,
    MOV64_K,
    RSH32_K,
    SKB_MARK,
    SKB_PROTOCOL,
    TC_ACT_SHOT,
    TC_ACT_UNSPEC,
    insn,
)
from kextless.base.kernel_maps import EGRESS, INGRESS

log = logging.getLogger("capture.guard")

#: After the divert programs (pref 30001 - priority) so a re-injected packet is seen marked.
GUARD_PREF = 65000
GUARD_NAME = "kextless_guard"
#: High half of skb->mark on packets the divert library re-injects (its LOOP_PREVENTION_MARK).
REINJECT_MARK_HI = 0x4D49


def program() -> bytes:
    """The guard's instructions: non-IP -> UNSPEC; IP with the re-injection mark -> UNSPEC;
    other IP -> SHOT."""
    ip4 = socket.htons(0x0800)
    ip6 = socket.htons(0x86DD)
    return b"".join(
        [
            insn(LDXW, 2, 1, SKB_PROTOCOL),  # 0: r2 = skb->protocol
            insn(JEQ_K, 2, 0, 3, ip4),  # 1: IPv4 -> 5
            insn(JEQ_K, 2, 0, 2, ip6),  # 2: IPv6 -> 5
            insn(MOV64_K, 0, 0, 0, TC_ACT_UNSPEC),  # 3: not IP: leave it alone
            insn(EXIT),  # 4
            insn(LDXW, 2, 1, SKB_MARK),  # 5: r2 = skb->mark
            insn(RSH32_K, 2, 0, 0, 16),  # 6: w2 >>= 16
            insn(JEQ_K, 2, 0, 2, REINJECT_MARK_HI),  # 7: re-injected -> 10
            insn(MOV64_K, 0, 0, 0, TC_ACT_SHOT),  # 8: undiverted IP: drop
            insn(EXIT),  # 9
            insn(MOV64_K, 0, 0, 0, TC_ACT_UNSPEC),  # 10
            insn(EXIT),  # 11
        ]
    )


def load() -> int:
    """Load the guard program; its fd (the caller closes it). OSError with the verifier log."""
    return tcbpf.load(program(), GUARD_NAME)


def remove_stale(ipr: IPRoute) -> list[str]:
    """Remove guards a killed capture left (SIGKILL in a guarded window): on a link that is
    diverted now they would drop every IP packet the divert filter lets by. Returns
    "link/ingress"-style names of what was removed."""
    removed = []
    for link in ipr.get_links():
        index, name = int(link["index"]), str(link.get_attr("IFLA_IFNAME"))
        for parent, where in ((INGRESS, "ingress"), (EGRESS, "egress")):
            try:
                filters = ipr.get_filters(index=index, parent=parent)
            except NetlinkError:
                continue  # no clsact here
            for f in filters:
                opts = f.get_attr("TCA_OPTIONS")
                if opts is None or opts.get_attr("TCA_BPF_NAME") != GUARD_NAME:
                    continue
                try:
                    ipr.tc(
                        "del-filter",
                        "bpf",
                        index=index,
                        handle=f["handle"],
                        parent=parent,
                        prio=f["info"] >> 16,
                        protocol=ETH_P_ALL,
                    )
                    removed.append(f"{name}/{where}")
                except NetlinkError as e:
                    log.warning("removing a stale guard from %s %s failed: %s", name, where, e)
    for what in removed:
        log.warning("removed a guard a previous capture left on %s", what)
    return removed


@dataclass
class Guard:
    """The loaded guard program and the links it is attached to (ifindex -> name)."""

    ipr: IPRoute
    fd: int
    attached: dict[int, str]

    @classmethod
    def open(cls, ipr: IPRoute) -> Guard:
        return cls(ipr, load(), {})

    def attach(self, index: int, name: str = "") -> None:
        """Drop undiverted IP on `index` from now on (ingress and egress). OSError/NetlinkError."""
        tcbpf.attach(self.ipr, index, self.fd, GUARD_NAME, GUARD_PREF)
        self.attached[index] = name
        log.info("guard on %s (ifindex %d): undiverted IP dropped", name or "?", index)

    def detach(self, index: int) -> bool:
        """Remove the guard from `index`; False if the link is gone (its filters went with it)."""
        name = self.attached.pop(index, "")
        ok = tcbpf.detach(self.ipr, index, GUARD_PREF)
        log.info("guard off %s (ifindex %d)", name or "?", index)
        return ok

    def close(self) -> None:
        """Detach from every link still guarded, then close the program fd."""
        for index in list(self.attached):
            try:
                self.detach(index)
            except (OSError, NetlinkError) as e:
                log.warning("removing the guard from ifindex %d failed: %s", index, e)
        os.close(self.fd)
