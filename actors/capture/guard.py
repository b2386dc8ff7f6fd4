"""The fail-closed guard: a tiny TC program of ours that drops IP on a link until it is diverted.

A link that appears after the divert handle opened carries traffic nobody examines until a new
handle attaches to it (tens of ms). The guard closes that window: attached at once on ingress
and egress (clsact, direct-action, pref `GUARD_PREF`, after every divert program), it drops
IPv4 and IPv6 packets unless they carry the divert library's re-injection mark
(`0x4D49xxxx` in skb->mark, ../shared/reference/kernel-flow-cache.md §c; the guard test
measures it), and lets every other ethertype (ARP) through. It is removed once the new handle's
programs are seen on the link: traffic the divert filter does not match would else be dropped.

Twelve hand-assembled instructions, loaded with bpf(2) through ctypes: no clang, no bpffs.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import socket
import struct
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger("capture.guard")

#: After the divert programs (pref 30001 - priority) so a re-injected packet is seen marked.
GUARD_PREF = 65000
GUARD_NAME = "kextless_guard"
#: clsact parents: ingress / egress.
INGRESS = 0xFFFFFFF2
EGRESS = 0xFFFFFFF3
#: High half of skb->mark on packets the divert library re-injects (its LOOP_PREVENTION_MARK).
REINJECT_MARK_HI = 0x4D49

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)
_BPF_PROG_LOAD = 5
_BPF_PROG_TYPE_SCHED_CLS = 3
_TC_ACT_UNSPEC = -1
_TC_ACT_SHOT = 2
#: struct __sk_buff offsets (uapi/linux/bpf.h): mark, protocol (network byte order).
_SKB_MARK = 8
_SKB_PROTOCOL = 16
_ETH_P_ALL = 0x0003


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | (src << 4), off, imm)


def program() -> bytes:
    """The guard's instructions: non-IP -> UNSPEC; IP with the re-injection mark -> UNSPEC;
    other IP -> SHOT."""
    ldxw, jeq_k, mov64_k, rsh32_k, exit_ = 0x61, 0x15, 0xB7, 0x74, 0x95
    ip4 = socket.htons(0x0800)
    ip6 = socket.htons(0x86DD)
    return b"".join(
        [
            _insn(ldxw, 2, 1, _SKB_PROTOCOL),  # 0: r2 = skb->protocol
            _insn(jeq_k, 2, 0, 3, ip4),  # 1: IPv4 -> 5
            _insn(jeq_k, 2, 0, 2, ip6),  # 2: IPv6 -> 5
            _insn(mov64_k, 0, 0, 0, _TC_ACT_UNSPEC),  # 3: not IP: leave it alone
            _insn(exit_),  # 4
            _insn(ldxw, 2, 1, _SKB_MARK),  # 5: r2 = skb->mark
            _insn(rsh32_k, 2, 0, 0, 16),  # 6: w2 >>= 16
            _insn(jeq_k, 2, 0, 2, REINJECT_MARK_HI),  # 7: re-injected -> 10
            _insn(mov64_k, 0, 0, 0, _TC_ACT_SHOT),  # 8: undiverted IP: drop
            _insn(exit_),  # 9
            _insn(mov64_k, 0, 0, 0, _TC_ACT_UNSPEC),  # 10
            _insn(exit_),  # 11
        ]
    )


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
        ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
    ]


def load() -> int:
    """Load the guard program; its fd (the caller closes it). OSError with the verifier log."""
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
        prog_name=GUARD_NAME.encode()[:15],
    )
    libc = ctypes.CDLL(None, use_errno=True)
    fd = int(libc.syscall(_SYS_BPF, _BPF_PROG_LOAD, ctypes.byref(attr), ctypes.sizeof(attr)))
    if fd < 0:
        err = ctypes.get_errno() or errno.EIO
        text = vlog.value.decode(errors="replace").strip()
        raise OSError(err, f"loading the guard program: {os.strerror(err)}: {text}")
    return fd


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
                        protocol=_ETH_P_ALL,
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
        try:
            self.ipr.tc("add", "clsact", index=index)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise
        for parent in (INGRESS, EGRESS):
            self.ipr.tc(
                "add-filter",
                "bpf",
                index=index,
                handle=1,
                fd=self.fd,
                name=GUARD_NAME,
                parent=parent,
                prio=GUARD_PREF,
                protocol=_ETH_P_ALL,
                classid=1,
                direct_action=True,
            )
        self.attached[index] = name
        log.info("guard on %s (ifindex %d): undiverted IP dropped", name or "?", index)

    def detach(self, index: int) -> bool:
        """Remove the guard from `index`; False if the link is gone (its filters went with it)."""
        name = self.attached.pop(index, "")
        ok = True
        for parent in (INGRESS, EGRESS):
            try:
                self.ipr.tc(
                    "del-filter",
                    "bpf",
                    index=index,
                    handle=1,
                    parent=parent,
                    prio=GUARD_PREF,
                    protocol=_ETH_P_ALL,
                )
            except NetlinkError as e:
                if e.code not in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
                    raise
                ok = False
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
