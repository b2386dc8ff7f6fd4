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

Nine hand-assembled instructions, loaded with bpf(2) like the guard (`guard.py`).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from kextless.actors.capture.guard import (
    _BPF_PROG_LOAD,
    _BPF_PROG_TYPE_SCHED_CLS,
    _ETH_P_ALL,
    _SKB_PROTOCOL,
    _SYS_BPF,
    _TC_ACT_UNSPEC,
    EGRESS,
    INGRESS,
    _insn,
    _ProgLoadAttr,
)

log = logging.getLogger("capture.l2pass")

#: Before every divert program (30001 - priority) and before a flow cache at pref 10
#: (../shared/reference/kernel-flow-cache.md §b).
L2PASS_PREF = 5
L2PASS_NAME = "kextless_l2pass"
_TC_ACT_OK = 0
#: Ethertypes that go on to the divert program (network byte order in skb->protocol).
IP_ETHERTYPES = (0x0800, 0x86DD, 0x8100, 0x88A8)


def program() -> bytes:
    """IPv4 / IPv6 / VLAN -> UNSPEC (on to the divert program); anything else -> OK."""
    ldxw, jeq_k, mov64_k, exit_ = 0x61, 0x15, 0xB7, 0x95
    n = len(IP_ETHERTYPES)
    insns = [_insn(ldxw, 2, 1, _SKB_PROTOCOL)]  # r2 = skb->protocol
    for i, et in enumerate(IP_ETHERTYPES):
        # jump over the remaining tests and the OK return (2 insns) to the UNSPEC return
        insns.append(_insn(jeq_k, 2, 0, (n - 1 - i) + 2, socket.htons(et)))
    insns += [
        _insn(mov64_k, 0, 0, 0, _TC_ACT_OK),  # not IP: pass, the divert program never sees it
        _insn(exit_),
        _insn(mov64_k, 0, 0, 0, _TC_ACT_UNSPEC),  # IP: on down the chain
        _insn(exit_),
    ]
    return b"".join(insns)


def load() -> int:
    """Load the program; its fd (the caller closes it). OSError with the verifier log."""
    code = program()
    insns = ctypes.create_string_buffer(code, len(code))
    lic = ctypes.create_string_buffer(b"GPL")
    vlog = ctypes.create_string_buffer(4096)
    attr = _ProgLoadAttr(
        prog_type=_BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt=len(code) // 8,
        insns=ctypes.addressof(insns),
        license=ctypes.addressof(lic),
        log_level=1,
        log_size=len(vlog),
        log_buf=ctypes.addressof(vlog),
        prog_name=L2PASS_NAME.encode()[:15],
    )
    libc = ctypes.CDLL(None, use_errno=True)
    fd = int(libc.syscall(_SYS_BPF, _BPF_PROG_LOAD, ctypes.byref(attr), ctypes.sizeof(attr)))
    if fd < 0:
        err = ctypes.get_errno() or errno.EIO
        text = vlog.value.decode(errors="replace").strip()
        raise OSError(err, f"loading the l2pass program: {os.strerror(err)}: {text}")
    return fd


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
        try:
            self.ipr.tc("add", "clsact", index=index)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise
        for parent in (INGRESS, EGRESS):
            self.ipr.tc(
                "replace-filter",
                "bpf",
                index=index,
                handle=1,
                fd=self.fd,
                name=L2PASS_NAME,
                parent=parent,
                prio=L2PASS_PREF,
                protocol=_ETH_P_ALL,
                classid=1,
                direct_action=True,
            )
        self.attached[index] = name
        log.debug("l2pass on %s (ifindex %d)", name or "?", index)

    def detach(self, index: int) -> None:
        """Remove it from `index` (a link that is gone took its filters with it)."""
        self.attached.pop(index, None)
        for parent in (INGRESS, EGRESS):
            try:
                self.ipr.tc(
                    "del-filter",
                    "bpf",
                    index=index,
                    handle=1,
                    parent=parent,
                    prio=L2PASS_PREF,
                    protocol=_ETH_P_ALL,
                )
            except NetlinkError as e:
                if e.code not in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
                    raise

    def close(self) -> None:
        """Detach from every link, then close the program fd and the rtnetlink socket."""
        for index in list(self.attached):
            try:
                self.detach(index)
            except (OSError, NetlinkError) as e:
                log.warning("removing l2pass from ifindex %d failed: %s", index, e)
        os.close(self.fd)
        self.ipr.close()
