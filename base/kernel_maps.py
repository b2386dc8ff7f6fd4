"""The kernel flow cache's maps as every reader needs them: the map layouts (struct flow_key,
flow_val, reinj_val of actors/capture/bpf/*.bpf.c), the system libbpf through ctypes (maps by
id, read-only fds, lookup, batch iteration), how our programs are found on a namespace's links
(the TC filter dump, which carries each filter's program id), and `CounterMaps`, the read-only
view of the byte counters.

Shared here so that no actor imports another: the capture (`kernel_cache.py`, which loads,
attaches and writes the maps) and the bandwidth actor (which only reads them) both build on it.
Nothing here loads a program or writes a map entry.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import ipaddress
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from kextless.protocol.messages import Flow

#: Our two programs as their TC filters name them, and the prefs they are attached at:
#: kextless_pre before the divert programs (30001 - priority), the guard after them.
PRE_NAME = "kextless_pre"
GUARD_NAME = "kextless_guard"
PRE_PREF = 10
GUARD_PREF = 65000
LIBBPF = "libbpf.so.1"
#: clsact parents: ingress / egress.
INGRESS = 0xFFFFFFF2
EGRESS = 0xFFFFFFF3
HOOKS = (INGRESS, EGRESS)
#: struct flow_key: family, proto, sport, dport (network order), pad, src[16], dst[16].
FLOW_KEY = struct.Struct("!BBHHH16s16s")
#: struct flow_val: last_seen_ns, packets, bytes, payload, action, verdict, then the TCP
#: stream span the program keeps (seq_valid, pad, seq_start, seq_end, pad2; Python writes 0).
FLOW_VAL = struct.Struct("=QQQQBB14x")
#: struct reinj_val (guard.bpf.c): last_seen_ns, packets, payload, then seq_end, seq_valid.
REINJ_VAL = struct.Struct("=QQQ8x")
REINJECTED_MAP = "reinjected"
#: struct owner_val (flowcache.bpf.c): tgid, pad, socket cookie, ktime.
OWNER_VAL = struct.Struct("=I4xQQ")
OWNERS_MAP = "owners"
#: Where the payload counter sits in each value (a reader of raw values unpacks only it).
PAYLOAD_OFFSET = 24
REINJECTED_PAYLOAD_OFFSET = 16
#: BPF_F_RDONLY: a map fd that can only look up (uapi/linux/bpf.h).
_BPF_F_RDONLY = 1 << 3


class KernelCacheError(OSError):
    """libbpf or bpf(2) failed, or an attached program is not one of our layout (another
    kextless version)."""


class Family(enum.IntEnum):
    """The key's family byte."""

    V4 = 4
    V6 = 6


@dataclass(frozen=True, slots=True)
class FlowKey:
    """A 5-tuple as a packet carries it (src -> dst); addresses packed (4 or 16 bytes)."""

    proto: int
    src: bytes
    sport: int
    dst: bytes
    dport: int

    @classmethod
    def of(cls, proto: int, src: str, sport: int, dst: str, dport: int) -> FlowKey:
        """From text addresses, e.g. FlowKey.of(17, "10.0.0.1", 5353, "10.0.0.2", 53)."""
        s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
        if len(s) != len(d):
            raise ValueError(f"mixed families: {src} -> {dst}")
        return cls(proto, s, sport, d, dport)

    @classmethod
    def from_flow(cls, flow: Flow) -> FlowKey:
        """The capture's Flow as its outbound packets carry it (local -> remote)."""
        return cls(flow.protocol, flow.local_ip, flow.local_port, flow.remote_ip, flow.remote_port)

    @property
    def family(self) -> Family:
        return Family.V6 if len(self.src) == 16 else Family.V4

    def reversed(self) -> FlowKey:
        """The key of the reply packets."""
        return FlowKey(self.proto, self.dst, self.dport, self.src, self.sport)

    def pack(self) -> bytes:
        """The 40-byte map key."""
        return FLOW_KEY.pack(self.family, self.proto, self.sport, self.dport, 0, self.src, self.dst)

    @classmethod
    def unpack(cls, raw: bytes) -> FlowKey:
        family, proto, sport, dport, _pad, src, dst = FLOW_KEY.unpack(raw)
        n = 16 if family == Family.V6 else 4
        return cls(proto, src[:n], sport, dst[:n], dport)

    def __str__(self) -> str:
        s, d = ipaddress.ip_address(self.src), ipaddress.ip_address(self.dst)
        return f"proto {self.proto} {s}:{self.sport} -> {d}:{self.dport}"


@dataclass(frozen=True, slots=True)
class FlowEntry:
    """One direction's entry: what Python stored and what the kernel counted since."""

    action: int  # Action, or an unknown value (then treated as a miss)
    verdict: int  # opaque u8 the caller stored
    packets: int
    nbytes: int  # skb->len summed: L2 header included
    last_seen_ns: int  # CLOCK_MONOTONIC (bpf_ktime_get_ns) of the last packet, 0 = none
    payload: int = 0  # TCP/UDP payload bytes summed (headers excluded): what bandwidth reports

    @classmethod
    def unpack(cls, raw: bytes) -> FlowEntry:
        last, packets, nbytes, payload, action, verdict = FLOW_VAL.unpack(raw)
        return cls(action, verdict, packets, nbytes, last, payload)


@dataclass(frozen=True, slots=True)
class ReinjectedEntry:
    """The guard's count of one orientation's re-injected packets (what Python let through)."""

    packets: int
    payload: int  # TCP/UDP payload bytes, headers excluded
    last_seen_ns: int  # CLOCK_MONOTONIC of the last one

    @classmethod
    def unpack(cls, raw: bytes) -> ReinjectedEntry:
        last, packets, payload = REINJ_VAL.unpack(raw)
        return cls(packets, payload, last)


@dataclass(frozen=True, slots=True)
class Owner:
    """Who sent a flow's opener, as kextless_pre saw it at egress (`owners`)."""

    pid: int  # the tgid of the task that sent the SYN / datagram (never 0)
    cookie: int  # the socket's cookie: a new socket on the same 5-tuple has another
    ktime_ns: int  # CLOCK_MONOTONIC (bpf_ktime_get_ns) when it was recorded

    @classmethod
    def unpack(cls, raw: bytes) -> Owner:
        tgid, cookie, ktime = OWNER_VAL.unpack(raw)
        return cls(tgid, cookie, ktime)


# ---- the libbpf binding ------------------------------------------------------------------


class Lib:
    """The few libbpf 1.x calls we use, typed. Low-level calls return -errno."""

    def __init__(self, name: str = LIBBPF) -> None:
        lib = ctypes.CDLL(name, use_errno=True)
        vp, cp, i, u32 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32
        sigs: dict[str, tuple[Any, list[Any]]] = {
            "bpf_object__open_file": (vp, [cp, vp]),
            "bpf_object__find_map_by_name": (vp, [vp, cp]),
            "bpf_object__find_program_by_name": (vp, [vp, cp]),
            "bpf_object__load": (i, [vp]),
            "bpf_object__close": (None, [vp]),
            "bpf_map__set_max_entries": (i, [vp, u32]),
            "bpf_map__fd": (i, [vp]),
            "bpf_program__fd": (i, [vp]),
            "bpf_map_update_elem": (i, [i, cp, cp, ctypes.c_uint64]),
            "bpf_map_lookup_elem": (i, [i, cp, vp]),
            "bpf_map_delete_elem": (i, [i, cp]),
            "bpf_map_get_next_key": (i, [i, vp, vp]),
            "bpf_map_lookup_batch": (i, [i, vp, vp, vp, vp, ctypes.POINTER(u32), vp]),
            "bpf_prog_get_fd_by_id": (i, [u32]),
            "bpf_map_get_fd_by_id": (i, [u32]),
            "bpf_map_get_fd_by_id_opts": (i, [u32, vp]),
            "bpf_obj_get_info_by_fd": (i, [i, vp, ctypes.POINTER(u32)]),
            "libbpf_num_possible_cpus": (i, []),
        }
        for fname, (res, args) in sigs.items():
            fn = getattr(lib, fname)
            fn.restype, fn.argtypes = res, args
        self.lib = lib

    def check(self, rc: int, what: str) -> int:
        """rc, or KernelCacheError for a negative one (libbpf returns -errno)."""
        if rc < 0:
            raise KernelCacheError(-rc, f"{what}: {os.strerror(-rc)}")
        return rc


_lib: Lib | None = None


def libbpf() -> Lib:
    global _lib
    if _lib is None:
        _lib = Lib()
    return _lib


class ProgInfo(ctypes.Structure):
    """The head of struct bpf_prog_info (uapi/linux/bpf.h): enough for its maps and name."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    ]


class MapInfo(ctypes.Structure):
    """The head of struct bpf_map_info."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    n = ctypes.c_uint32(ctypes.sizeof(info))
    lib = libbpf()
    lib.check(lib.lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(n)), "map info")
    return info


class _FdByIdOpts(ctypes.Structure):
    """struct bpf_get_fd_by_id_opts (libbpf 1.1)."""

    _fields_ = [("sz", ctypes.c_size_t), ("open_flags", ctypes.c_uint32)]


def map_fd_by_id(map_id: int, rdonly: bool) -> int:
    lib = libbpf()
    if not rdonly:
        return lib.check(lib.lib.bpf_map_get_fd_by_id(map_id), f"map id {map_id}")
    opts = _FdByIdOpts(ctypes.sizeof(_FdByIdOpts), _BPF_F_RDONLY)
    rc = lib.lib.bpf_map_get_fd_by_id_opts(map_id, ctypes.byref(opts))
    return lib.check(rc, f"map id {map_id} (read-only)")


def prog_load_time(prog_fd: int) -> int:
    """When the program was loaded: CLOCK_BOOTTIME ns (struct bpf_prog_info.load_time)."""
    lib = libbpf()
    info = ProgInfo()
    n = ctypes.c_uint32(ctypes.sizeof(info))
    rc = lib.lib.bpf_obj_get_info_by_fd(prog_fd, ctypes.byref(info), ctypes.byref(n))
    lib.check(rc, "prog info")
    return int(info.load_time)


def prog_maps(prog_fd: int, rdonly: bool = False) -> dict[str, int]:
    """Open every map program `prog_fd` uses: name -> new fd (the caller closes them);
    `rdonly`: fds that can only read (BPF_F_RDONLY)."""
    lib = libbpf()
    ids = (ctypes.c_uint32 * 16)()
    info = ProgInfo(nr_map_ids=len(ids), map_ids=ctypes.addressof(ids))
    n = ctypes.c_uint32(ctypes.sizeof(info))
    lib.check(
        lib.lib.bpf_obj_get_info_by_fd(prog_fd, ctypes.byref(info), ctypes.byref(n)), "prog info"
    )
    out: dict[str, int] = {}
    for map_id in ids[: min(info.nr_map_ids, len(ids))]:
        fd = map_fd_by_id(map_id, rdonly)
        out[map_info(fd).name.decode()] = fd
    return out


# ---- our programs on the namespace's links ----------------------------------------------


#: rtattr types of a TC filter dump (uapi/linux/rtnetlink.h, pkt_cls.h). pyroute2 0.9 does
#: not decode TCA_BPF_ID, so `filters` reads the raw message.
_TCA_KIND, _TCA_OPTIONS = 1, 2
_TCA_BPF_NAME, _TCA_BPF_ID = 7, 11
#: struct nlmsghdr (16 bytes) + struct tcmsg (20 bytes) precede the attributes.
_TC_ATTRS_AT = 16 + 20


@dataclass(frozen=True)
class TcProgram:
    """A cls_bpf filter found on a link's clsact hook, with its kernel program id."""

    index: int
    hook: int  # INGRESS / EGRESS
    pref: int
    name: str
    prog_id: int


def _rtattrs(buf: bytes, start: int, end: int) -> dict[int, bytes]:
    """The attributes in buf[start:end] by type (the nested flag masked off)."""
    out: dict[int, bytes] = {}
    while start + 4 <= end:
        length, kind = struct.unpack_from("=HH", buf, start)
        if length < 4:
            break
        out[kind & 0x3FFF] = buf[start + 4 : start + length]
        start += (length + 3) & ~3
    return out


def filters(ipr: Any, index: int) -> list[TcProgram]:
    """Every BPF filter on both clsact hooks of link `index` with its program id ([] if the
    link has no clsact qdisc). Restart adoption finds our programs (and their maps) this way."""
    found = []
    for hook in HOOKS:
        try:
            msgs = ipr.get_filters(index=index, parent=hook)
        except NetlinkError:
            continue
        for msg in msgs:
            raw = bytes(msg.data[msg.offset : msg.offset + msg.length])
            attrs = _rtattrs(raw, _TC_ATTRS_AT, len(raw))
            if attrs.get(_TCA_KIND, b"").rstrip(b"\0") != b"bpf" or _TCA_OPTIONS not in attrs:
                continue
            opts = attrs[_TCA_OPTIONS]
            bpf = _rtattrs(opts, 0, len(opts))
            if _TCA_BPF_ID not in bpf:
                continue
            name = bpf.get(_TCA_BPF_NAME, b"").rstrip(b"\0").decode(errors="replace")
            prog_id = struct.unpack_from("=I", bpf[_TCA_BPF_ID])[0]
            found.append(TcProgram(index, hook, int(msg["info"]) >> 16, name, prog_id))
    return found


def attached_programs(ipr: Any) -> tuple[dict[int, list[int]], set[int], dict[int, str]]:
    """Our programs on this namespace's links: kextless_pre id -> link indexes, the guard
    ids, link index -> name."""
    pre_ids: dict[int, list[int]] = {}
    guard_ids: set[int] = set()
    names: dict[int, str] = {}
    for link in ipr.get_links():
        index = int(link["index"])
        names[index] = str(link.get_attr("IFLA_IFNAME"))
        for p in filters(ipr, index):
            if p.name == PRE_NAME and p.pref == PRE_PREF:
                pre_ids.setdefault(p.prog_id, []).append(index)
            elif p.name == GUARD_NAME and p.pref == GUARD_PREF:
                guard_ids.add(p.prog_id)
    return pre_ids, guard_ids, names


def check_single(pre_ids: dict[int, list[int]], guard_ids: set[int]) -> None:
    if len(pre_ids) > 1 or len(guard_ids) > 1:
        raise KernelCacheError(
            errno.EEXIST,
            f"more than one kernel cache attached (programs {sorted(pre_ids)}, "
            f"guards {sorted(guard_ids)}): detach them and load afresh",
        )


def attached_program_ids(ipr: Any) -> tuple[int, ...]:
    """The ids of our programs attached in this namespace (kextless_pre first), () if none:
    a reader compares them to notice a capture that loaded fresh programs."""
    pre_ids, guard_ids, _names = attached_programs(ipr)
    return tuple(sorted(pre_ids)) + tuple(sorted(guard_ids))


# ---- a map -------------------------------------------------------------------------------


class BpfMap:
    """A map fd with its key and value sizes, and the calls on it."""

    def __init__(self, fd: int, name: str, key_size: int, value_size: int) -> None:
        info = map_info(fd)
        if (info.key_size, info.value_size) != (key_size, value_size):
            raise KernelCacheError(
                errno.EPROTO,
                f"map {name}: key/value {info.key_size}/{info.value_size} bytes, "
                f"expected {key_size}/{value_size} (a program of another kextless version)",
            )
        self.fd, self.name, self.key_size, self.value_size = fd, name, key_size, value_size
        self.max_entries = int(info.max_entries)
        self.map_id = int(info.id)
        self.lib = libbpf()

    def update(self, key: bytes, value: bytes) -> None:
        self.lib.check(
            self.lib.lib.bpf_map_update_elem(self.fd, key, value, 0), f"{self.name} update"
        )

    def lookup(self, key: bytes, size: int | None = None) -> bytes | None:
        out = ctypes.create_string_buffer(size or self.value_size)
        rc = self.lib.lib.bpf_map_lookup_elem(self.fd, key, out)
        if rc == -errno.ENOENT:
            return None
        self.lib.check(rc, f"{self.name} lookup")
        return out.raw

    def delete(self, key: bytes) -> bool:
        rc = self.lib.lib.bpf_map_delete_elem(self.fd, key)
        if rc == -errno.ENOENT:
            return False
        self.lib.check(rc, f"{self.name} delete")
        return True

    def items(self, chunk: int = 256) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value), in batches of `chunk` (BPF_MAP_LOOKUP_BATCH), falling back to
        get_next_key where batch ops are missing. Entries the kernel adds or evicts meanwhile
        may or may not be seen; none is seen twice by the batch path."""
        ks, vs = self.key_size, self.value_size
        keys = ctypes.create_string_buffer(ks * chunk)
        vals = ctypes.create_string_buffer(vs * chunk)
        token = ctypes.create_string_buffer(max(ks, 8))
        first = True
        while True:
            count = ctypes.c_uint32(chunk)
            rc = self.lib.lib.bpf_map_lookup_batch(
                self.fd, None if first else token, token, keys, vals, ctypes.byref(count), None
            )
            if rc < 0 and rc != -errno.ENOENT:
                if first and rc in (-errno.EINVAL, -errno.ENOTSUP, -524):  # 524: ENOTSUPP
                    yield from self._items_slow()
                    return
                self.lib.check(rc, f"{self.name} batch lookup")
            first = False
            kr, vr = keys.raw, vals.raw
            for i in range(count.value):
                yield kr[i * ks : (i + 1) * ks], vr[i * vs : (i + 1) * vs]
            if rc == -errno.ENOENT:
                return

    def _items_slow(self) -> Iterator[tuple[bytes, bytes]]:
        prev: bytes | None = None
        nxt = ctypes.create_string_buffer(self.key_size)
        while self.lib.lib.bpf_map_get_next_key(self.fd, prev, nxt) == 0:
            prev = nxt.raw
            value = self.lookup(prev)
            if value is not None:
                yield prev, value


# ---- the owners of egress openers (the capture) --------------------------------------------


class OwnerMap:
    """kextless_pre's `owners`: the pid that sent each flow's first egress packet, keyed by
    the packet's 5-tuple (local -> remote: `FlowKey.from_flow`). The capture looks an outbound
    opener up here so the ALE need not wait for a socket event to learn the pid."""

    def __init__(self, m: BpfMap) -> None:
        self.map = m
        self._out = ctypes.create_string_buffer(OWNER_VAL.size)
        self._lookup = m.lib.lib.bpf_map_lookup_elem

    @classmethod
    def from_fd(cls, fd: int) -> OwnerMap:
        """Wrap an fd of `owners` (owned from now on); KernelCacheError for another layout."""
        return cls(BpfMap(fd, OWNERS_MAP, FLOW_KEY.size, OWNER_VAL.size))

    @classmethod
    def open(cls, ipr: Any) -> OwnerMap | None:
        """The map of the kextless_pre attached in this namespace, by id, read-only; None if
        none is attached or it has no `owners` (an older program)."""
        pre_ids, guard_ids, _names = attached_programs(ipr)
        if not pre_ids:
            return None
        check_single(pre_ids, guard_ids)
        lib = libbpf()
        pid = next(iter(pre_ids))
        prog = lib.check(lib.lib.bpf_prog_get_fd_by_id(pid), f"program id {pid}")
        try:
            fds = prog_maps(prog, rdonly=True)
        finally:
            os.close(prog)
        fd = fds.pop(OWNERS_MAP, None)
        for other in fds.values():
            os.close(other)
        if fd is None:
            return None
        try:
            return cls.from_fd(fd)
        except BaseException:
            os.close(fd)
            raise

    def get(self, key: FlowKey) -> Owner | None:
        """The owner recorded for this orientation's opener, or None (not seen, evicted,
        or not an egress opener of a local socket)."""
        rc = self._lookup(self.map.fd, key.pack(), self._out)
        if rc == -errno.ENOENT:
            return None
        self.map.lib.check(rc, "owners lookup")
        return Owner.unpack(self._out.raw)

    def delete(self, key: FlowKey) -> bool:
        """Forget an owner (needs a writable fd). Rarely wanted: while the entry is there a
        retransmitted SYN of the same socket records nothing; once gone, it records the
        task its timer interrupted."""
        return self.map.delete(key.pack())

    def entries(self) -> Iterator[tuple[FlowKey, Owner]]:
        for k, v in self.map.items():
            yield FlowKey.unpack(k), Owner.unpack(v)

    def close(self) -> None:
        os.close(self.map.fd)


# ---- read-only counters (the bandwidth actor) -----------------------------------------------


@dataclass
class CounterMaps:
    """The byte counters of the programs attached in this namespace, opened read-only
    (BPF_F_RDONLY map fds: a reader can never change a verdict), found the way
    `KernelCache.adopt` finds them: through the links' TC filters, no bpffs."""

    flows: BpfMap
    reinjected: BpfMap | None
    program_ids: tuple[int, ...]
    #: When kextless_pre was loaded (CLOCK_BOOTTIME ns): a reader that started later
    #: joins counters that already hold bytes it never saw counted.
    loaded_boot_ns: int = 0

    @classmethod
    def open(cls, ipr: Any) -> CounterMaps | None:
        """None if no kextless_pre is attached (no capture yet, or --no-kernel-cache);
        KernelCacheError for programs of another layout or two caches at once."""
        pre_ids, guard_ids, _names = attached_programs(ipr)
        if not pre_ids:
            return None
        check_single(pre_ids, guard_ids)
        lib = libbpf()
        fds: dict[str, int] = {}
        loaded = 0
        try:
            for pid in [*pre_ids, *guard_ids]:
                prog = lib.check(lib.lib.bpf_prog_get_fd_by_id(pid), f"program id {pid}")
                try:
                    fds |= prog_maps(prog, rdonly=True)
                    loaded = loaded or prog_load_time(prog)
                finally:
                    os.close(prog)
            if "flows" not in fds:
                raise KernelCacheError(errno.ENOENT, "kextless_pre has no flows map")
            flows = BpfMap(fds.pop("flows"), "flows", FLOW_KEY.size, FLOW_VAL.size)
            reinj = fds.pop(REINJECTED_MAP, None)
            reinjected = (
                None
                if reinj is None
                else BpfMap(reinj, REINJECTED_MAP, FLOW_KEY.size, REINJ_VAL.size)
            )
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        for fd in fds.values():  # the maps a reader does not need
            os.close(fd)
        ids = tuple(sorted(pre_ids)) + tuple(sorted(guard_ids))
        return cls(flows, reinjected, ids, loaded)

    def flow_entries(self) -> Iterator[tuple[FlowKey, FlowEntry]]:
        """kextless_pre's entries, one per orientation."""
        for k, v in self.flows.items():
            yield FlowKey.unpack(k), FlowEntry.unpack(v)

    def reinjected_entries(self) -> Iterator[tuple[FlowKey, ReinjectedEntry]]:
        """The guard's counts of re-injected packets (none without a guard: fail open)."""
        if self.reinjected is not None:
            for k, v in self.reinjected.items():
                yield FlowKey.unpack(k), ReinjectedEntry.unpack(v)

    def close(self) -> None:
        os.close(self.flows.fd)
        if self.reinjected is not None:
            os.close(self.reinjected.fd)
