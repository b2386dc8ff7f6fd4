"""The kernel flow verdict cache and the fail-closed guard: our two C programs
(`bpf/flowcache.bpf.c`, `bpf/guard.bpf.c`, built by `bpf/Makefile`), loaded with the system
libbpf through ctypes, attached with pyroute2 (`tcbpf.attach`), their maps driven from here.

Chain on each guarded link, ingress and egress (../shared/reference/kernel-flow-cache.md):

    pref 10      kextless_pre    non-IP, ND/MLD, pass_ports -> pass; TCP SYN/FIN/RST -> on;
                                 flow in `flows`: PASS -> pass (counted), DROP -> drop; miss -> on
    pref 30001-p the divert handle (Python decides)
    pref 65000   kextless_guard  IP without the divert library's re-injection mark -> drop;
                                 re-injected TCP/UDP: payload counted in `reinjected`
    (both pass the library's lo re-injection, mark 0x4D4Axxxx, on untouched)

A decided flow is written in both orientations (`put`), so neither direction reaches Python
again (but for TCP SYN/FIN/RST: openers and ends are always seen). A flow evicted from the
LRU map only goes back to Python: a miss never passes. A restarted capture finds the maps
through the programs still attached (`adopt`): no bpffs, and decided flows never notice.

    kc = KernelCache.load(flows_max=65536)            # or KernelCache.adopt(ipr)
    kc.attach(ipr, index)                             # pref 10 + (guard=True) pref 65000
    kc.put(FlowKey.of(6, "10.0.0.1", 40000, "10.0.0.2", 80), Action.PASS, verdict=2)
    kc.get(key) -> FlowEntry | None;  kc.entries();  kc.delete(key);  kc.stats()
    kc.detach(ipr, index);  kc.close()

Byte counting, for the bandwidth actor: a PASS entry counts its direction's application
payload (`FlowEntry.payload`); the guard counts the payload of every re-injected TCP/UDP packet
(what Python let through) per 5-tuple in `reinjected` (`ReinjectedEntry`). Together they see
every accepted packet once. `CounterMaps.open(ipr)` reads both, read-only, from the programs
attached to the namespace's links.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import ipaddress
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kextless.actors.capture import tcbpf
from kextless.protocol.messages import Flow

log = logging.getLogger("capture.kernel_cache")

#: Where the committed objects live (package data of kextless.actors.capture).
BPF_DIR = Path(__file__).with_name("bpf")
PRE_OBJECT = "flowcache.bpf.o"
GUARD_OBJECT = "guard.bpf.o"
PRE_NAME = "kextless_pre"
GUARD_NAME = "kextless_guard"
#: Before the divert programs (30001 - priority); the guard after them.
PRE_PREF = 10
GUARD_PREF = 65000
DEFAULT_FLOWS_MAX = 65536
LIBBPF = "libbpf.so.1"


class KernelCacheError(OSError):
    """libbpf or bpf(2) failed, or an attached program is not one this module can drive."""


class Family(enum.IntEnum):
    """The key's family byte."""

    V4 = 4
    V6 = 6


class Action(enum.IntEnum):
    """What kextless_pre does with a cached flow (enum flow_action in flowcache.bpf.c)."""

    PASS = 1
    DROP = 2


class PreStat(enum.IntEnum):
    """Index of kextless_pre's per-CPU counters (enum stat in flowcache.bpf.c)."""

    PASSED = 0
    DROPPED = 1
    MISSED = 2
    NON_IP = 3
    NEIGHBOUR = 4
    PASS_PORT = 5
    TCP_CONTROL = 6
    UNCACHED = 7
    LO_REDIRECT = 8


#: struct flow_key: family, proto, sport, dport (network order), pad, src[16], dst[16].
_KEY = struct.Struct("!BBHHH16s16s")
#: struct flow_val: last_seen_ns, packets, bytes, payload, action, verdict, then the TCP
#: stream span the program keeps (seq_valid, pad, seq_start, seq_end, pad2; Python writes 0).
_VAL = struct.Struct("=QQQQBB14x")
#: struct reinj_val (guard.bpf.c): last_seen_ns, packets, payload, then seq_end, seq_valid.
_REINJ = struct.Struct("=QQQ8x")
REINJECTED_MAP = "reinjected"
#: Where the payload counter sits in each value (a reader of raw values unpacks only it).
PAYLOAD_OFFSET = 24
REINJECTED_PAYLOAD_OFFSET = 16
#: BPF_F_RDONLY: a map fd that can only look up (uapi/linux/bpf.h).
_BPF_F_RDONLY = 1 << 3
#: struct pass_port: port (host order), proto, pad.
_PORT = struct.Struct("=HBx")
#: struct guard_stats: dropped, last_drop_ns.
_GUARD = struct.Struct("=QQ")


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
        return _KEY.pack(self.family, self.proto, self.sport, self.dport, 0, self.src, self.dst)

    @classmethod
    def unpack(cls, raw: bytes) -> FlowKey:
        family, proto, sport, dport, _pad, src, dst = _KEY.unpack(raw)
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
        last, packets, nbytes, payload, action, verdict = _VAL.unpack(raw)
        return cls(action, verdict, packets, nbytes, last, payload)


@dataclass(frozen=True, slots=True)
class ReinjectedEntry:
    """The guard's count of one orientation's re-injected packets (what Python let through)."""

    packets: int
    payload: int  # TCP/UDP payload bytes, headers excluded
    last_seen_ns: int  # CLOCK_MONOTONIC of the last one

    @classmethod
    def unpack(cls, raw: bytes) -> ReinjectedEntry:
        last, packets, payload = _REINJ.unpack(raw)
        return cls(packets, payload, last)


@dataclass(frozen=True, slots=True)
class GuardStats:
    """The guard's drops summed over CPUs, and the latest drop's time (0 = none)."""

    dropped: int
    last_drop_ns: int


# ---- the libbpf binding ------------------------------------------------------------------


class _Lib:
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


_lib: _Lib | None = None


def _libbpf() -> _Lib:
    global _lib
    if _lib is None:
        _lib = _Lib()
    return _lib


class _ProgInfo(ctypes.Structure):
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


class _MapInfo(ctypes.Structure):
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


def _map_info(fd: int) -> _MapInfo:
    info = _MapInfo()
    n = ctypes.c_uint32(ctypes.sizeof(info))
    lib = _libbpf()
    lib.check(lib.lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(n)), "map info")
    return info


class _FdByIdOpts(ctypes.Structure):
    """struct bpf_get_fd_by_id_opts (libbpf 1.1)."""

    _fields_ = [("sz", ctypes.c_size_t), ("open_flags", ctypes.c_uint32)]


def _map_fd_by_id(map_id: int, rdonly: bool) -> int:
    lib = _libbpf()
    if not rdonly:
        return lib.check(lib.lib.bpf_map_get_fd_by_id(map_id), f"map id {map_id}")
    opts = _FdByIdOpts(ctypes.sizeof(_FdByIdOpts), _BPF_F_RDONLY)
    rc = lib.lib.bpf_map_get_fd_by_id_opts(map_id, ctypes.byref(opts))
    return lib.check(rc, f"map id {map_id} (read-only)")


def _prog_load_time(prog_fd: int) -> int:
    """When the program was loaded: CLOCK_BOOTTIME ns (struct bpf_prog_info.load_time)."""
    lib = _libbpf()
    info = _ProgInfo()
    n = ctypes.c_uint32(ctypes.sizeof(info))
    rc = lib.lib.bpf_obj_get_info_by_fd(prog_fd, ctypes.byref(info), ctypes.byref(n))
    lib.check(rc, "prog info")
    return int(info.load_time)


def _prog_maps(prog_fd: int, rdonly: bool = False) -> dict[str, int]:
    """Open every map program `prog_fd` uses: name -> new fd (the caller closes them);
    `rdonly`: fds that can only read (BPF_F_RDONLY)."""
    lib = _libbpf()
    ids = (ctypes.c_uint32 * 16)()
    info = _ProgInfo(nr_map_ids=len(ids), map_ids=ctypes.addressof(ids))
    n = ctypes.c_uint32(ctypes.sizeof(info))
    lib.check(
        lib.lib.bpf_obj_get_info_by_fd(prog_fd, ctypes.byref(info), ctypes.byref(n)), "prog info"
    )
    out: dict[str, int] = {}
    for map_id in ids[: min(info.nr_map_ids, len(ids))]:
        fd = _map_fd_by_id(map_id, rdonly)
        out[_map_info(fd).name.decode()] = fd
    return out


def _load_object(path: Path, progs: list[str], max_entries: dict[str, int]) -> dict[str, int]:
    """Open, size, load `path`; dup'ed fds of `progs` and of every map (name -> fd). The
    libbpf object is closed again: the fds (and, once attached, the TC filters) keep the
    programs and maps alive."""
    lib = _libbpf()
    obj = lib.lib.bpf_object__open_file(str(path).encode(), None)
    if not obj:
        err = ctypes.get_errno() or errno.EINVAL
        raise KernelCacheError(err, f"opening {path}: {os.strerror(err)}")
    try:
        for name, size in max_entries.items():
            m = lib.lib.bpf_object__find_map_by_name(obj, name.encode())
            if not m:
                raise KernelCacheError(errno.ENOENT, f"{path.name} has no map {name}")
            lib.check(lib.lib.bpf_map__set_max_entries(m, size), f"sizing {name}")
        lib.check(lib.lib.bpf_object__load(obj), f"loading {path.name} (libbpf logged why)")
        fds: dict[str, int] = {}
        try:
            for name in progs:
                p = lib.lib.bpf_object__find_program_by_name(obj, name.encode())
                if not p:
                    raise KernelCacheError(errno.ENOENT, f"{path.name} has no program {name}")
                fds[name] = os.dup(lib.check(lib.lib.bpf_program__fd(p), name))
            maps = _prog_maps(fds[progs[0]])
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        return fds | maps
    finally:
        lib.lib.bpf_object__close(obj)


def _attached(ipr: Any) -> tuple[dict[int, list[int]], set[int], dict[int, str]]:
    """Our programs on this namespace's links: kextless_pre id -> link indexes, the guard
    ids, link index -> name."""
    pre_ids: dict[int, list[int]] = {}
    guard_ids: set[int] = set()
    names: dict[int, str] = {}
    for link in ipr.get_links():
        index = int(link["index"])
        names[index] = str(link.get_attr("IFLA_IFNAME"))
        for p in tcbpf.filters(ipr, index):
            if p.name == PRE_NAME and p.pref == PRE_PREF:
                pre_ids.setdefault(p.prog_id, []).append(index)
            elif p.name == GUARD_NAME and p.pref == GUARD_PREF:
                guard_ids.add(p.prog_id)
    return pre_ids, guard_ids, names


def _check_single(pre_ids: dict[int, list[int]], guard_ids: set[int]) -> None:
    if len(pre_ids) > 1 or len(guard_ids) > 1:
        raise KernelCacheError(
            errno.EEXIST,
            f"more than one kernel cache attached (programs {sorted(pre_ids)}, "
            f"guards {sorted(guard_ids)}): detach them and load afresh",
        )


def attached_program_ids(ipr: Any) -> tuple[int, ...]:
    """The ids of our programs attached in this namespace (kextless_pre first), () if none:
    a reader compares them to notice a capture that loaded fresh programs."""
    pre_ids, guard_ids, _names = _attached(ipr)
    return tuple(sorted(pre_ids)) + tuple(sorted(guard_ids))


# ---- the cache ---------------------------------------------------------------------------


class _Map:
    """A map fd with its key and value sizes, and the calls on it."""

    def __init__(self, fd: int, name: str, key_size: int, value_size: int) -> None:
        info = _map_info(fd)
        if (info.key_size, info.value_size) != (key_size, value_size):
            raise KernelCacheError(
                errno.EPROTO,
                f"map {name}: key/value {info.key_size}/{info.value_size} bytes, "
                f"expected {key_size}/{value_size} (a program of another kextless version)",
            )
        self.fd, self.name, self.key_size, self.value_size = fd, name, key_size, value_size
        self.max_entries = int(info.max_entries)
        self.map_id = int(info.id)
        self.lib = _libbpf()

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


@dataclass
class KernelCache:
    """Our loaded (or adopted) programs and their maps, and the links they are attached to.

    Owns its fds (closed by `close`); the programs stay in the kernel as long as a TC filter
    holds them, which is what lets the next capture `adopt` them."""

    pre_fd: int
    flows: _Map
    pass_ports: _Map
    stats_map: _Map
    guard_fd: int | None = None
    guard_map: _Map | None = None
    reinjected: _Map | None = None
    attached: dict[int, str] = field(default_factory=dict)
    ncpus: int = 1

    # ---- load / adopt / close --------------------------------------------------------------

    @classmethod
    def load(
        cls, flows_max: int = DEFAULT_FLOWS_MAX, guard: bool = True, bpf_dir: Path = BPF_DIR
    ) -> KernelCache:
        """Load kextless_pre with a `flows` map of `flows_max` entries, and (`guard`) the
        fail-closed guard. Nothing is attached yet. KernelCacheError (libbpf logs the
        verifier's reason on stderr)."""
        pre = _load_object(bpf_dir / PRE_OBJECT, [PRE_NAME], {"flows": flows_max})
        try:
            sizes = {REINJECTED_MAP: flows_max}
            g = _load_object(bpf_dir / GUARD_OBJECT, [GUARD_NAME], sizes) if guard else {}
        except BaseException:
            for fd in pre.values():
                os.close(fd)
            raise
        kc = cls._from_fds(pre, g)
        log.info(
            "kernel cache loaded: flows map id %d (%d entries), guard %s",
            kc.flows.map_id,
            kc.flows.max_entries,
            "loaded" if guard else "off",
        )
        return kc

    @classmethod
    def adopt(cls, ipr: Any) -> KernelCache | None:
        """The cache of the programs already attached to this namespace's links (a previous
        capture's), with their maps and entries as they are; None if no link has our
        kextless_pre. Links carrying it count as attached. KernelCacheError if it is not a
        program this module can drive, or two different ones are attached."""
        pre_ids, guard_ids, names = _attached(ipr)
        if not pre_ids:
            return None
        _check_single(pre_ids, guard_ids)
        lib = _libbpf()
        ((pre_id, links),) = pre_ids.items()
        pre_fd = lib.check(lib.lib.bpf_prog_get_fd_by_id(pre_id), f"program id {pre_id}")
        fds = {PRE_NAME: pre_fd}
        gfds: dict[str, int] = {}
        try:
            fds |= _prog_maps(pre_fd)
            if guard_ids:
                gid = next(iter(guard_ids))
                gfds[GUARD_NAME] = lib.check(lib.lib.bpf_prog_get_fd_by_id(gid), f"guard id {gid}")
                gfds |= _prog_maps(gfds[GUARD_NAME])
            kc = cls._from_fds(fds, gfds)
        except BaseException:
            for fd in (fds | gfds).values():
                os.close(fd)
            raise
        kc.attached = {i: names.get(i, "") for i in sorted(set(links))}
        log.info(
            "kernel cache adopted: program id %d on %s, flows map id %d, guard %s",
            pre_id,
            ",".join(kc.attached.values()),
            kc.flows.map_id,
            "found" if guard_ids else "absent",
        )
        return kc

    @classmethod
    def _from_fds(cls, pre: dict[str, int], guard: dict[str, int]) -> KernelCache:
        """Wrap fds by name (programs and maps); closes the ones it does not keep."""
        keep = {PRE_NAME, "flows", "pass_ports", "stats", GUARD_NAME, "guard_stats"}
        keep.add(REINJECTED_MAP)
        for name, fd in list(pre.items()) + list(guard.items()):
            if name not in keep:
                os.close(fd)
        missing = {"flows", "pass_ports", "stats"} - pre.keys()
        if guard:
            missing |= {"guard_stats", REINJECTED_MAP} - guard.keys()
        if missing:
            raise KernelCacheError(errno.ENOENT, f"maps missing: {sorted(missing)}")
        return cls(
            pre_fd=pre[PRE_NAME],
            flows=_Map(pre["flows"], "flows", _KEY.size, _VAL.size),
            pass_ports=_Map(pre["pass_ports"], "pass_ports", _PORT.size, 1),
            stats_map=_Map(pre["stats"], "stats", 4, 8),
            guard_fd=guard.get(GUARD_NAME),
            guard_map=(
                _Map(guard["guard_stats"], "guard_stats", 4, _GUARD.size) if guard else None
            ),
            reinjected=(
                _Map(guard[REINJECTED_MAP], REINJECTED_MAP, _KEY.size, _REINJ.size)
                if guard
                else None
            ),
            ncpus=_libbpf().check(_libbpf().lib.libbpf_num_possible_cpus(), "possible cpus"),
        )

    def close(self) -> None:
        """Close our fds. Attached programs stay (for the next capture to adopt): `detach`
        every link first to remove them."""
        maps = [self.flows, self.pass_ports, self.stats_map, self.guard_map, self.reinjected]
        for fd in [self.pre_fd, self.guard_fd] + [m.fd if m else None for m in maps]:
            if fd is not None:
                os.close(fd)

    # ---- links -----------------------------------------------------------------------------

    def attach(self, ipr: Any, index: int, name: str = "", guard: bool = True) -> None:
        """Put kextless_pre (pref 10) and, if loaded and `guard`, kextless_guard (pref 65000)
        on both hooks of link `index`; replaces what is at those prefs (an adopted or stale
        copy). OSError/NetlinkError."""
        tcbpf.attach(ipr, index, self.pre_fd, PRE_NAME, PRE_PREF, replace=True)
        if guard and self.guard_fd is not None:
            tcbpf.attach(ipr, index, self.guard_fd, GUARD_NAME, GUARD_PREF, replace=True)
        self.attached[index] = name
        log.info("kernel cache on %s (ifindex %d), guard %s", name or "?", index, guard)

    def detach(self, ipr: Any, index: int) -> bool:
        """Remove both programs from `index`; False if the link is gone (with its filters)."""
        name = self.attached.pop(index, "")
        ok = tcbpf.detach(ipr, index, PRE_PREF)
        ok = tcbpf.detach(ipr, index, GUARD_PREF) and ok
        log.info("kernel cache off %s (ifindex %d)", name or "?", index)
        return ok

    # ---- flows -----------------------------------------------------------------------------

    def put(self, key: FlowKey, action: Action, verdict: int = 0) -> None:
        """Decide the flow in the kernel, both orientations, counters from zero: effective at
        the next packet. KernelCacheError (E2BIG never: the LRU evicts)."""
        value = _VAL.pack(0, 0, 0, 0, action, verdict)
        self.flows.update(key.pack(), value)
        self.flows.update(key.reversed().pack(), value)

    def delete(self, key: FlowKey) -> bool:
        """Forget the flow, both orientations (its next packet goes to Python); False if
        neither was there."""
        a = self.flows.delete(key.pack())
        b = self.flows.delete(key.reversed().pack())
        return a or b

    def get(self, key: FlowKey) -> FlowEntry | None:
        """This orientation's entry (its counters are this direction's), or None."""
        raw = self.flows.lookup(key.pack())
        return None if raw is None else FlowEntry.unpack(raw)

    def entries(self) -> Iterator[tuple[FlowKey, FlowEntry]]:
        """Every entry, one per orientation (for expiry sweeps and restart adoption)."""
        for k, v in self.flows.items():
            yield FlowKey.unpack(k), FlowEntry.unpack(v)

    def reinjected_entries(self) -> Iterator[tuple[FlowKey, ReinjectedEntry]]:
        """The guard's per-orientation counts of re-injected packets (none without a guard)."""
        if self.reinjected is not None:
            for k, v in self.reinjected.items():
                yield FlowKey.unpack(k), ReinjectedEntry.unpack(v)

    def clear(self) -> int:
        """Delete every entry (ClearCache); how many were deleted."""
        keys = [k for k, _v in self.flows.items()]
        return sum(self.flows.delete(k) for k in keys)

    # ---- pass ports and counters -----------------------------------------------------------

    def set_pass_port(self, proto: int, port: int) -> None:
        """TCP/UDP with `port` on either side skips the divert (our own control traffic)."""
        self.pass_ports.update(_PORT.pack(port, proto), b"\x01")

    def clear_pass_port(self, proto: int, port: int) -> bool:
        return self.pass_ports.delete(_PORT.pack(port, proto))

    def pass_port_list(self) -> list[tuple[int, int]]:
        """(proto, port) pairs set now."""
        return sorted((pr, po) for po, pr in (_PORT.unpack(k) for k, _v in self.pass_ports.items()))

    def stats(self) -> dict[PreStat, int]:
        """kextless_pre's counters summed over CPUs."""
        out = {}
        size = 8 * self.ncpus
        for st in PreStat:
            raw = self.stats_map.lookup(struct.pack("=I", st), size) or b""
            out[st] = sum(struct.unpack(f"={len(raw) // 8}Q", raw))
        return out

    def guard_stats(self) -> GuardStats | None:
        """The guard's drops (None without a guard)."""
        if self.guard_map is None:
            return None
        raw = self.guard_map.lookup(struct.pack("=I", 0), _GUARD.size * self.ncpus) or b""
        per = [_GUARD.unpack_from(raw, i * _GUARD.size) for i in range(len(raw) // _GUARD.size)]
        return GuardStats(sum(d for d, _t in per), max((t for _d, t in per), default=0))


# ---- read-only counters (the bandwidth actor) -----------------------------------------------


@dataclass
class CounterMaps:
    """The byte counters of the programs attached in this namespace, opened read-only
    (BPF_F_RDONLY map fds: a reader can never change a verdict), found the way
    `KernelCache.adopt` finds them: through the links' TC filters, no bpffs."""

    flows: _Map
    reinjected: _Map | None
    program_ids: tuple[int, ...]
    #: When kextless_pre was loaded (CLOCK_BOOTTIME ns): a reader that started later
    #: joins counters that already hold bytes it never saw counted.
    loaded_boot_ns: int = 0

    @classmethod
    def open(cls, ipr: Any) -> CounterMaps | None:
        """None if no kextless_pre is attached (no capture yet, or --no-kernel-cache);
        KernelCacheError for programs of another layout or two caches at once."""
        pre_ids, guard_ids, _names = _attached(ipr)
        if not pre_ids:
            return None
        _check_single(pre_ids, guard_ids)
        lib = _libbpf()
        fds: dict[str, int] = {}
        loaded = 0
        try:
            for pid in [*pre_ids, *guard_ids]:
                prog = lib.check(lib.lib.bpf_prog_get_fd_by_id(pid), f"program id {pid}")
                try:
                    fds |= _prog_maps(prog, rdonly=True)
                    loaded = loaded or _prog_load_time(prog)
                finally:
                    os.close(prog)
            if "flows" not in fds:
                raise KernelCacheError(errno.ENOENT, "kextless_pre has no flows map")
            flows = _Map(fds.pop("flows"), "flows", _KEY.size, _VAL.size)
            reinj = fds.pop(REINJECTED_MAP, None)
            reinjected = (
                None if reinj is None else _Map(reinj, REINJECTED_MAP, _KEY.size, _REINJ.size)
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
