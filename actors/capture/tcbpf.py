"""Our own TC programs: hand-assembled eBPF loaded with bpf(2) through ctypes, attached to a
link's clsact ingress and egress hooks (direct-action) with pyroute2. No clang, no bpffs.

`guard.py` (drop undiverted IP on a new link) and `l2pass.py` (let non-IP frames skip the
divert program) are two such programs; this module is what they share. `kernel_cache.py`
attaches its libbpf-loaded C programs with `attach` too, and finds them again after a restart
with `base.kernel_maps.filters` (the filter dump with each program id, which the bandwidth
actor needs too).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

# The clsact hooks (ingress / egress) are base's, where the filter dump reads them.
from kextless.base.kernel_maps import HOOKS

ETH_P_ALL = 0x0003
TC_ACT_UNSPEC = -1
TC_ACT_OK = 0
TC_ACT_SHOT = 2
#: struct __sk_buff offsets (uapi/linux/bpf.h): mark, protocol (network byte order).
SKB_MARK = 8
SKB_PROTOCOL = 16
#: The few opcodes our programs use.
LDXW, JEQ_K, MOV64_K, RSH32_K, EXIT = 0x61, 0x15, 0xB7, 0x74, 0x95

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)
_BPF_PROG_LOAD = 5
_BPF_PROG_TYPE_SCHED_CLS = 3


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One eBPF instruction."""
    return struct.pack("<BBhi", code, dst | (src << 4), off, imm)


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


def load(code: bytes, name: str) -> int:
    """Load `code` as a TC classifier named `name`; its fd (the caller closes it). OSError
    with the verifier's log."""
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
        prog_name=name.encode()[:15],
    )
    libc = ctypes.CDLL(None, use_errno=True)
    fd = int(libc.syscall(_SYS_BPF, _BPF_PROG_LOAD, ctypes.byref(attr), ctypes.sizeof(attr)))
    if fd < 0:
        err = ctypes.get_errno() or errno.EIO
        text = vlog.value.decode(errors="replace").strip()
        raise OSError(err, f"loading the {name} program: {os.strerror(err)}: {text}")
    return fd


def attach(ipr: Any, index: int, fd: int, name: str, pref: int, replace: bool = False) -> None:
    """Put program `fd` on both hooks of link `index` at `pref` (adding clsact if needed);
    `replace` takes over a filter already at that pref. OSError/NetlinkError."""
    try:
        ipr.tc("add", "clsact", index=index)
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise
    for parent in HOOKS:
        ipr.tc(
            "replace-filter" if replace else "add-filter",
            "bpf",
            index=index,
            handle=1,
            fd=fd,
            name=name,
            parent=parent,
            prio=pref,
            protocol=ETH_P_ALL,
            classid=1,
            direct_action=True,
        )


def detach(ipr: Any, index: int, pref: int) -> bool:
    """Remove our program at `pref` from both hooks of `index`; False if the link (and with it
    its filters) is gone. NetlinkError for anything else."""
    ok = True
    for parent in HOOKS:
        try:
            ipr.tc(
                "del-filter",
                "bpf",
                index=index,
                handle=1,
                parent=parent,
                prio=pref,
                protocol=ETH_P_ALL,
            )
        except NetlinkError as e:
            if e.code not in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
                raise
            ok = False
    return ok
