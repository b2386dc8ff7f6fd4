"""The divert programs attached in a namespace, read and removed over rtnetlink (pyroute2).

A divert handle attaches a `tc_divert_ingress`/`tc_divert_egress` BPF filter (pref 30001 minus
its priority) to every interface; a clean close removes them, a SIGKILL leaves them attached
(../shared/reference/pydivert-linux.md §4.3), still run on every packet. The capture is its
namespace's only divert user by design, so before it opens its first handle it removes every
such program (`remove_orphans`); `kextless down` does the same from the host through
pyroute2's NetNS, and `kextless status` reads the same list to show which interfaces are guarded.

Every function takes an open IPRoute-like object (IPRoute() in the namespace itself, NetNS(name)
from outside it), so the caller decides where it acts and nothing here can reach another
namespace by accident.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("capture")

#: Kernel program names are cut to 15 characters (`tc_divert_ingre`): match the stem.
DIVERT_PREFIX = "tc_divert_"
#: Our own programs beside it (l2pass.py, guard.py, kernel_cache.py's kextless_pre and
#: kextless_guard): left behind by a killed capture too. The kernel cache's are kept at the
#: next start (adopted, `remove_orphans(keep=...)`); `kextless down` removes them all.
OURS_PREFIX = "kextless_"
#: The fail-closed guard's program name (guard.bpf.c; the reactive guard.py's too).
GUARD_NAME = "kextless_guard"


class Hook(enum.Enum):
    """A clsact hook, valued by its tc parent handle (TC_H_CLSACT:TC_H_MIN_INGRESS/EGRESS)."""

    INGRESS = 0xFFFFFFF2
    EGRESS = 0xFFFFFFF3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class DivertProgram:
    """One divert tc filter: where it hangs and what the kernel calls it."""

    ifname: str
    index: int
    hook: Hook
    pref: int
    name: str

    def describe(self) -> str:
        return f"{self.ifname} {self.hook.label} pref {self.pref} {self.name}"


@dataclass(frozen=True)
class Coverage:
    """Whether an interface has a divert program on each hook (a packet on an unguarded hook
    passes kextless unseen)."""

    ifname: str
    index: int
    kind: str
    up: bool
    ingress: bool
    egress: bool
    #: The fail-closed guard (kextless_guard) on that hook: undiverted IP is dropped there, so
    #: a hook without divert programs but with the guard is closed, not open.
    held_ingress: bool = False
    held_egress: bool = False

    @property
    def guarded(self) -> bool:
        return self.ingress and self.egress

    @property
    def closed(self) -> bool:
        """No packet of it passes unseen: each hook diverted or held by the guard."""
        return (self.ingress or self.held_ingress) and (self.egress or self.held_egress)


def _links(ipr: Any) -> list[tuple[int, str, str, bool]]:
    """(index, name, kind, up) of every interface the handle's namespace has."""
    out = []
    for link in ipr.get_links():
        info = link.get_attr("IFLA_LINKINFO")
        kind = (info.get_attr("IFLA_INFO_KIND") if info is not None else None) or (
            "loopback" if link["index"] == 1 else "device"
        )
        out.append(
            (link["index"], str(link.get_attr("IFLA_IFNAME")), str(kind), bool(link["flags"] & 1))
        )
    return out


def _programs_on(
    ipr: Any, index: int, ifname: str, prefixes: tuple[str, ...] = (DIVERT_PREFIX,)
) -> list[DivertProgram]:
    found = []
    for hook in Hook:
        try:
            filters = ipr.get_filters(index=index, parent=hook.value)
        except Exception as e:  # no clsact qdisc, or the interface just vanished
            log.debug("no filters on %s %s: %s", ifname, hook.label, e)
            continue
        for f in filters:
            opts = f.get_attr("TCA_OPTIONS")
            name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
            if f.get_attr("TCA_KIND") == "bpf" and name and name.startswith(prefixes):
                found.append(DivertProgram(ifname, index, hook, f["info"] >> 16, str(name)))
    return found


def divert_programs(ipr: Any) -> list[DivertProgram]:
    """Every divert program attached to any interface of the handle's namespace."""
    found = []
    for index, ifname, _kind, _up in _links(ipr):
        found += _programs_on(ipr, index, ifname)
    return found


def leftover_programs(ipr: Any) -> list[DivertProgram]:
    """Divert programs and our own (l2pass, guard): what a killed capture leaves behind."""
    found = []
    for index, ifname, _kind, _up in _links(ipr):
        found += _programs_on(ipr, index, ifname, (DIVERT_PREFIX, OURS_PREFIX))
    return found


def coverage(ipr: Any) -> list[Coverage]:
    """Each interface of the namespace with its guarded hooks, in interface index order."""
    out = []
    for index, ifname, kind, up in sorted(_links(ipr)):
        progs = _programs_on(ipr, index, ifname, (DIVERT_PREFIX, GUARD_NAME))
        hooks = {p.hook for p in progs if p.name.startswith(DIVERT_PREFIX)}
        held = {p.hook for p in progs if p.name == GUARD_NAME}
        out.append(
            Coverage(
                ifname,
                index,
                kind,
                up,
                Hook.INGRESS in hooks,
                Hook.EGRESS in hooks,
                Hook.INGRESS in held,
                Hook.EGRESS in held,
            )
        )
    return out


def remove(ipr: Any, programs: list[DivertProgram]) -> tuple[list[DivertProgram], list[str]]:
    """Delete the prefs holding these programs: (removed, errors). A pref holds one filter
    kind, and a divert pref only the handle's program, so deleting the pref deletes exactly
    it."""
    removed, errors = [], []
    done: set[tuple[int, Hook, int]] = set()
    for p in programs:
        key = (p.index, p.hook, p.pref)
        if key in done:
            removed.append(p)
            continue
        try:
            # tcm_info = pref << 16 (protocol 0: any). Not `prio=`: without `kind` pyroute2
            # drops it, and the kernel then deletes every filter of the hook (measured).
            ipr.tc("del-filter", index=p.index, parent=p.hook.value, info=p.pref << 16)
        except Exception as e:
            errors.append(f"could not remove {p.describe()}: {e}")
            continue
        done.add(key)
        removed.append(p)
    return removed, errors


def remove_orphans(
    ipr: Any | None = None, keep: Collection[tuple[str, int]] = ()
) -> list[DivertProgram]:
    """Remove every divert program of this namespace (IPRoute() unless given), one log line
    each; called by the capture before its first open, when any such program is an orphan.

    `keep`: (name, pref) of programs that stay - a killed capture's kernel flow cache, which
    the new capture adopted (its verdicts still pass decided flows, its guard still drops)."""
    opened = ipr is None
    if ipr is None:
        from pyroute2 import IPRoute

        ipr = IPRoute()
    try:
        stale = [p for p in leftover_programs(ipr) if (p.name, p.pref) not in keep]
        removed, errors = remove(ipr, stale)
    finally:
        if opened:
            with contextlib.suppress(Exception):
                ipr.close()
    for p in removed:
        log.warning("removed orphan divert program: %s", p.describe())
    for e in errors:
        log.error("orphan divert program: %s", e)
    return removed


def remove_nft_tables(netns: str | None = None) -> tuple[list[str], list[str]]:
    """Remove the nft guard tables (nftguard.py) a killed capture left in `netns` (the current
    namespace if None): (removed, errors), one log line each. For `kextless down`, not for the
    capture's start: a starting capture replaces its predecessor's table in one transaction
    (NftGuard.create) instead, so new links stay fail closed meanwhile. Without nft no table of
    ours can exist, so nothing is reported."""
    from kextless.actors.capture import nftguard

    try:
        nftguard.nft_argv()
    except nftguard.NftError:
        return [], []
    removed, errors = nftguard.remove_tables(netns)
    for what in removed:
        log.warning("removed orphan %s", what)
    for e in errors:
        log.error("orphan nft table: %s", e)
    return removed, errors
