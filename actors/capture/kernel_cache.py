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
every accepted packet once. `base/kernel_maps.py` holds the map layouts and the libbpf calls
this module shares with the bandwidth actor, whose `CounterMaps.open(ipr)` reads both maps,
read-only, from the programs attached to the namespace's links; this module loads, attaches
and writes.

Owners: kextless_pre records who sent each egress opener (TCP SYN, UDP datagram of an
uncached flow) in `owners`, sized like `flows`: `kc.owners.get(FlowKey.from_flow(flow))` ->
Owner(pid, cookie, ktime_ns) | None, so an outbound PacketHeld can carry its pid at once.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kextless.actors.capture import tcbpf
from kextless.actors.capture.parked import SYN_SHADOW_MAP, ParkControl, ParkRing, open_parking

# The map layouts, the libbpf binding and the lookup of our attached programs are shared with
# the bandwidth actor through base; the names the capture shell imports from here are
# re-exported explicitly (`X as X`).
from kextless.base.kernel_maps import (
    FLOW_KEY,
    FLOW_VAL,
    GUARD_NAME,
    GUARD_PREF,
    OWNERS_MAP,
    PRE_NAME,
    PRE_PREF,
    REINJ_VAL,
    REINJECTED_MAP,
    BpfMap,
    FlowEntry,
    FlowKey,
    KernelCacheError,
    OwnerMap,
    ReinjectedEntry,
    attached_programs,
    check_single,
    libbpf,
    prog_maps,
)

log = logging.getLogger("capture.kernel_cache")

#: Where the committed objects live (package data of kextless.actors.capture).
BPF_DIR = Path(__file__).with_name("bpf")
PRE_OBJECT = "flowcache.bpf.o"
GUARD_OBJECT = "guard.bpf.o"
DEFAULT_FLOWS_MAX = 65536


class Action(enum.IntEnum):
    """What kextless_pre does with a cached flow (enum flow_action in flowcache.bpf.c)."""

    PASS = 1
    DROP = 2


#: A retired entry's action: not a flow_action, so the program treats the flow as a miss (its
#: packets go to the divert program) and leaves the counters as they were.
RETIRED_ACTION = 0


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
    PARKED = 9
    PARK_LOST = 10


#: struct pass_port: port (host order), proto, pad.
_PORT = struct.Struct("=HBx")
#: struct guard_stats: dropped, last_drop_ns.
_GUARD = struct.Struct("=QQ")


@dataclass(frozen=True, slots=True)
class GuardStats:
    """The guard's drops summed over CPUs, and the latest drop's time (0 = none)."""

    dropped: int
    last_drop_ns: int


# ---- loading -----------------------------------------------------------------------------


def _load_object(path: Path, progs: list[str], max_entries: dict[str, int]) -> dict[str, int]:
    """Open, size, load `path`; dup'ed fds of `progs` and of every map (name -> fd). The
    libbpf object is closed again: the fds (and, once attached, the TC filters) keep the
    programs and maps alive."""
    lib = libbpf()
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
            maps = prog_maps(fds[progs[0]])
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        return fds | maps
    finally:
        lib.lib.bpf_object__close(obj)


# ---- the cache ---------------------------------------------------------------------------


@dataclass
class KernelCache:
    """Our loaded (or adopted) programs and their maps, and the links they are attached to.

    Owns its fds (closed by `close`); the programs stay in the kernel as long as a TC filter
    holds them, which is what lets the next capture `adopt` them."""

    pre_fd: int
    flows: BpfMap
    pass_ports: BpfMap
    stats_map: BpfMap
    guard_fd: int | None = None
    guard_map: BpfMap | None = None
    reinjected: BpfMap | None = None
    #: Who sent each egress opener (None: an adopted program older than the map).
    owners: OwnerMap | None = None
    #: Packets parked while no capture read (parked.py; None: an older program).
    park_ring: ParkRing | None = None
    park_ctl: ParkControl | None = None
    #: The shadow SYN circle's fd (parked.read_shadow; None: an older program).
    syn_shadow_fd: int | None = None
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
        pre = _load_object(
            bpf_dir / PRE_OBJECT, [PRE_NAME], {"flows": flows_max, OWNERS_MAP: flows_max}
        )
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
        pre_ids, guard_ids, names = attached_programs(ipr)
        if not pre_ids:
            return None
        check_single(pre_ids, guard_ids)
        lib = libbpf()
        ((pre_id, links),) = pre_ids.items()
        pre_fd = lib.check(lib.lib.bpf_prog_get_fd_by_id(pre_id), f"program id {pre_id}")
        fds = {PRE_NAME: pre_fd}
        gfds: dict[str, int] = {}
        try:
            fds |= prog_maps(pre_fd)
            if guard_ids:
                gid = next(iter(guard_ids))
                gfds[GUARD_NAME] = lib.check(lib.lib.bpf_prog_get_fd_by_id(gid), f"guard id {gid}")
                gfds |= prog_maps(gfds[GUARD_NAME])
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
        keep |= {REINJECTED_MAP, OWNERS_MAP, SYN_SHADOW_MAP}
        parking = open_parking(pre)  # takes its maps' fds out of `pre` (closed on failure)
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
            flows=BpfMap(pre["flows"], "flows", FLOW_KEY.size, FLOW_VAL.size),
            pass_ports=BpfMap(pre["pass_ports"], "pass_ports", _PORT.size, 1),
            stats_map=BpfMap(pre["stats"], "stats", 4, 8),
            guard_fd=guard.get(GUARD_NAME),
            guard_map=(
                BpfMap(guard["guard_stats"], "guard_stats", 4, _GUARD.size) if guard else None
            ),
            reinjected=(
                BpfMap(guard[REINJECTED_MAP], REINJECTED_MAP, FLOW_KEY.size, REINJ_VAL.size)
                if guard
                else None
            ),
            owners=OwnerMap.from_fd(pre[OWNERS_MAP]) if OWNERS_MAP in pre else None,
            park_ring=parking[0] if parking else None,
            park_ctl=parking[1] if parking else None,
            syn_shadow_fd=pre.get(SYN_SHADOW_MAP),
            ncpus=libbpf().check(libbpf().lib.libbpf_num_possible_cpus(), "possible cpus"),
        )

    def close(self) -> None:
        """Close our fds. Attached programs stay (for the next capture to adopt): `detach`
        every link first to remove them."""
        maps = [self.flows, self.pass_ports, self.stats_map, self.guard_map, self.reinjected]
        maps.append(self.owners.map if self.owners else None)
        for fd in [self.pre_fd, self.guard_fd] + [m.fd if m else None for m in maps]:
            if fd is not None:
                os.close(fd)
        if self.syn_shadow_fd is not None:
            os.close(self.syn_shadow_fd)
        if self.park_ring is not None:
            self.park_ring.close()
        if self.park_ctl is not None:
            self.park_ctl.close()

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
        """Decide the flow in the kernel, both orientations: effective at the next packet.
        An entry already there (a verdict change, a retired entry) keeps its counters, so the
        bandwidth actor loses nothing it had not read yet; its TCP stream span starts afresh
        (what passed through Python meanwhile was counted by the guard). KernelCacheError
        (E2BIG never: the LRU evicts)."""
        for k in (key.pack(), key.reversed().pack()):
            self.flows.update(k, self._rewritten(self.flows.lookup(k), action, verdict))

    def retire(self, key: FlowKey) -> bool:
        """Send the flow's packets to Python again, both orientations, but keep each entry's
        counters (an action the program does not know is a miss); False if neither was
        there. `delete` removes it for good once the connection is forgotten."""
        found = False
        for k in (key.pack(), key.reversed().pack()):
            old = self.flows.lookup(k)
            if old is not None:
                self.flows.update(k, self._rewritten(old, RETIRED_ACTION, 0))
                found = True
        return found

    @staticmethod
    def _rewritten(old: bytes | None, action: int, verdict: int) -> bytes:
        """`old`'s counters (none: zero) with a new action and verdict and no TCP span. A
        packet counted between the lookup and the update is lost, never counted twice."""
        if old is None:
            return FLOW_VAL.pack(0, 0, 0, 0, action, verdict)
        last, packets, nbytes, payload, _a, _v = FLOW_VAL.unpack(old)
        return FLOW_VAL.pack(last, packets, nbytes, payload, action, verdict)

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
