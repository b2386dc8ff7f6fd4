"""Links of the capture's namespace: which are diverted, which need a guard and a new handle.

A divert handle attaches its programs to the links present when it opens (and `lo`); a link
that appears later (created, moved in with `ip link set X netns`, re-created under an old
name) would pass unexamined. `LinkTable` is the pure decision part: it gets link snapshots and
the coverage seen on each link (the divert programs on ingress and egress), and answers with
effects: guard this link now (fail closed, guard.py), open a new handle generation, remove the
guard, refuse a link the library did not attach to. `LinkWatcher` is the I/O part: an rtnetlink
socket bound to link events (pyroute2), polled by the shell beside the handle and the DEALER;
every wakeup re-reads the whole link list, so an event pyroute2 buffered is never missed.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import time
from dataclasses import dataclass
from typing import Protocol

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from kextless.actors.capture.guard import GUARD_PREF, Guard, remove_stale
from kextless.actors.capture.nftguard import NftError, NftGuard
from kextless.base.kernel_maps import EGRESS, INGRESS
from kextless.protocol.enums import Severity
from kextless.protocol.messages import Log

log = logging.getLogger("capture.links")

_RTMGRP_LINK = 1
_IFF_UP = 1
#: TCA_BPF_NAME prefixes of libebpfdivert 0.0.5's programs (the kernel cuts names at 15).
_DIVERT_IN = "tc_divert_ingre"
_DIVERT_OUT = "tc_divert_egres"


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str
    up: bool


class LinkEvent(enum.Enum):
    APPEARED = "appeared"
    CHANGED = "changed"
    GONE = "gone"


@dataclass(frozen=True)
class Coverage:
    """Whether a divert program was seen on the link's ingress / egress."""

    ingress: bool
    egress: bool

    @property
    def full(self) -> bool:
        return self.ingress and self.egress


# ---- effects ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    event: LinkEvent
    link: Link


@dataclass(frozen=True)
class GuardLink:
    link: Link


@dataclass(frozen=True)
class UnguardLink:
    link: Link
    #: When the link was first seen undiverted (the start of its guarded window).
    since_ns: int = 0


@dataclass(frozen=True)
class NeedHandle:
    """Open a new handle generation: it attaches to every link present when it opens."""

    links: tuple[Link, ...]


@dataclass(frozen=True)
class Refuse:
    link: Link
    reason: str


Effect = Seen | GuardLink | UnguardLink | NeedHandle | Refuse


class LinkTable:
    """The links of the namespace and what is known of their coverage (no sockets, no clock)."""

    def __init__(self) -> None:
        self.links: dict[int, Link] = {}
        #: ifindex -> when (shell monotonic ns) the link was first seen uncovered.
        self.pending: dict[int, int] = {}
        self.guarded: set[int] = set()
        self.covered: set[int] = set()
        self.refused: set[int] = set()

    def on_links(self, snapshot: list[Link], now_ns: int) -> list[Effect]:
        """A fresh link list: report changes; guard and ask a handle for links not covered."""
        new = {link.index: link for link in snapshot}
        out: list[Effect] = []
        for index, link in self.links.items():
            if index not in new:
                out.append(Seen(LinkEvent.GONE, link))
                self.pending.pop(index, None)
                self.guarded.discard(index)  # its filters went with it
                self.covered.discard(index)
                self.refused.discard(index)
        fresh: list[Link] = []
        for index, link in new.items():
            old = self.links.get(index)
            if old is None:
                out.append(Seen(LinkEvent.APPEARED, link))
            elif old != link:
                out.append(Seen(LinkEvent.CHANGED, link))
            if index in self.covered or index in self.refused or index in self.pending:
                continue
            fresh.append(link)
        self.links = new
        for link in fresh:
            self.pending[link.index] = now_ns
            out.append(GuardLink(link))
        if fresh:
            out.append(NeedHandle(tuple(fresh)))
        return out

    def seed(
        self, snapshot: list[Link], coverage: dict[int, Coverage], now_ns: int
    ) -> list[Effect]:
        """The links at start, with the first handle's coverage: guard and re-open the rest."""
        self.links = {link.index: link for link in snapshot}
        self.covered = {i for i, c in coverage.items() if c.full and i in self.links}
        return self.on_links(snapshot, now_ns)

    def guard_attached(self, index: int) -> None:
        self.guarded.add(index)

    def on_coverage(self, coverage: dict[int, Coverage], opened_ns: int | None) -> list[Effect]:
        """Coverage read after a handle became active; `opened_ns`: when that handle's open
        started (None: coverage read without a new handle). A pending link now covered loses
        its guard; one still uncovered although it was there before the open is refused (its
        guard stays: fail closed); one that appeared during the open asks another handle."""
        out: list[Effect] = []
        again: list[Link] = []
        for index, since in list(self.pending.items()):
            link = self.links[index]
            cov = coverage.get(index, Coverage(False, False))
            if cov.full:
                del self.pending[index]
                self.covered.add(index)
                if index in self.guarded:
                    self.guarded.discard(index)
                    out.append(UnguardLink(link, since))
            elif opened_ns is not None and since <= opened_ns:
                del self.pending[index]
                self.refused.add(index)
                missing = [
                    d for d, ok in (("ingress", cov.ingress), ("egress", cov.egress)) if not ok
                ]
                out.append(Refuse(link, f"no divert program on {' and '.join(missing)}"))
            else:
                again.append(link)
        again += self._lost(coverage, opened_ns or 0, out)
        if again:
            out.append(NeedHandle(tuple(again)))
        return out

    def on_changed(self, coverage: dict[int, Coverage], now_ns: int) -> list[Effect]:
        """Coverage of links that changed (renamed, up/down, or a different device that got a
        gone link's ifindex: a link moved in keeps its ifindex when it is free): one without
        its programs is guarded and asks a handle, like a link that lost them."""
        out: list[Effect] = []
        again = self._lost(coverage, now_ns, out)
        if again:
            out.append(NeedHandle(tuple(again)))
        return out

    def _lost(self, coverage: dict[int, Coverage], since_ns: int, out: list[Effect]) -> list[Link]:
        again = []
        for index in sorted(self.covered):
            now_cov = coverage.get(index)
            if now_cov is not None and not now_cov.full and index in self.links:
                # Lost its programs (someone removed them): guard it and re-attach.
                self.covered.discard(index)
                self.pending[index] = since_ns
                out.append(GuardLink(self.links[index]))
                again.append(self.links[index])
        return again

    def admitted(self) -> set[int]:
        """Links whose IP the nft guard lets by: a TC guard or the divert programs are on both
        hooks (a refused link keeps its TC guard, so it stays admitted and fail closed)."""
        return {i for i in self.links if i in self.guarded or i in self.covered}

    def unguarded(self) -> list[Link]:
        """Links not (yet) verified as diverted, for status and logs."""
        return [link for i, link in self.links.items() if i not in self.covered]


# ---- I/O --------------------------------------------------------------------------------------


def _link(msg: object) -> Link:
    info = msg.get_attr("IFLA_LINKINFO")  # type: ignore[attr-defined]
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    return Link(
        index=int(msg["index"]),  # type: ignore[index]
        name=str(msg.get_attr("IFLA_IFNAME")),  # type: ignore[attr-defined]
        kind=str(kind or "device"),
        up=bool(msg["flags"] & _IFF_UP),  # type: ignore[index]
    )


def _divert_on(ipr: IPRoute, index: int, parent: int, prefix: str, lowest: int) -> bool:
    """A divert program on this hook: the library gives our first handle pref `lowest`
    (30001 - priority) and each later one of the process the next free pref (measured)."""
    try:
        filters = ipr.get_filters(index=index, parent=parent)
    except NetlinkError:
        return False  # no clsact qdisc, or the link is gone
    for f in filters:
        opts = f.get_attr("TCA_OPTIONS")
        name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
        if name and str(name).startswith(prefix) and lowest <= (f["info"] >> 16) < GUARD_PREF:
            return True
    return False


class LinkWatcher:
    """Link events of this namespace as a pollable fd, plus snapshots and tc coverage."""

    def __init__(self, priority: int = 0) -> None:
        self.ipr = IPRoute()  # requests: dumps, tc
        self._events = IPRoute()
        self._events.bind(groups=_RTMGRP_LINK)
        #: The divert library's lowest tc preference for our handle's priority.
        self.pref = 30001 - priority

    def fileno(self) -> int:
        return int(self._events.fileno())

    def drain(self) -> None:
        """Consume pending link events (the snapshot that follows says what they meant)."""
        with contextlib.suppress(OSError, NetlinkError):
            self._events.get()

    def snapshot(self) -> list[Link]:
        return [_link(m) for m in self.ipr.get_links()]

    def coverage(self, indexes: list[int]) -> dict[int, Coverage]:
        return {
            i: Coverage(
                _divert_on(self.ipr, i, INGRESS, _DIVERT_IN, self.pref),
                _divert_on(self.ipr, i, EGRESS, _DIVERT_OUT, self.pref),
            )
            for i in indexes
        }

    def close(self) -> None:
        self._events.close()
        self.ipr.close()


def in_initial_netns(run_netns: str = "/run/netns") -> bool:
    """True unless this is a named namespace (`ip netns`, as `kextless up --netns` runs us):
    the guard must never drop traffic of the machine's own namespace, where unit tests run
    the shell with a fake handle (pid 1's namespace cannot be read in every container)."""
    try:
        mine = os.stat("/proc/self/ns/net")
        for name in os.listdir(run_netns):
            st = os.stat(os.path.join(run_netns, name))
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                return False
    except OSError:
        pass
    return True


class TcGuard(Protocol):
    """What guards a link at TC: guard.py's temporary `Guard`, or the kernel cache's permanent
    chain (shell.py: kextless_pre + kextless_guard, never detached)."""

    def attach(self, index: int, name: str = "") -> None: ...
    def detach(self, index: int) -> bool: ...
    def close(self) -> None: ...


class LinkGuard:
    """The shell's part: watcher + table + TC guard + nft guard. Each method says whether a new
    handle is due.

    `tc_guard`: a permanent guard the caller manages (the kernel cache's programs): attached
    the moment a link appears and left on when the divert programs arrive (it is what drops
    what they let by unexamined), and no stale-guard clean-up at start (the caller adopted or
    replaced its predecessor's). None: guard.py's guard, removed once the link is diverted."""

    def __init__(
        self, priority: int = 0, nft: bool = True, tc_guard: TcGuard | None = None
    ) -> None:
        self.watcher = LinkWatcher(priority)
        self.table = LinkTable()
        self.guard: TcGuard | None = tc_guard
        self.permanent = tc_guard is not None
        #: The namespace-wide guard (nftguard.py); None until start() or when it failed.
        self.nft: NftGuard | None = None
        self._want_nft = nft
        self._logs: list[Log] = []
        if tc_guard is not None:
            return
        try:
            self.guard = Guard.open(self.watcher.ipr)
        except OSError as e:
            log.error(
                "the fail-closed guard cannot be loaded (%s): new links pass UNEXAMINED until "
                "the divert programs are seen on them",
                e,
            )

    def fileno(self) -> int:
        return self.watcher.fileno()

    def take_logs(self) -> list[Log]:
        """Error Logs for Portmaster (refused links) since the last call."""
        out, self._logs = self._logs, []
        return out

    def start(self, now_ns: int) -> bool:
        try:
            if not self.permanent:
                remove_stale(self.watcher.ipr)
        except (OSError, NetlinkError) as e:
            log.error("stale guards not checked: %s", e)
        snap = self.watcher.snapshot()
        cov = self.watcher.coverage([link.index for link in snap])
        need = self._apply(self.table.seed(snap, cov, now_ns), sync=False)
        if self._want_nft:
            self._start_nft()
        return need

    def _start_nft(self) -> None:
        """Create (or replace a killed predecessor's) nft table, admitting the links covered or
        guarded now: links that appear from here on carry no IP until admitted."""
        try:
            self.nft = NftGuard.create(self.table.admitted())
        except NftError as e:
            line = (
                f"the nft guard is not set up ({e}): a link that appears is unguarded until "
                "the capture sees its event"
            )
            log.error("%s", line)
            self._logs.append(Log(Severity.ERROR, f"capture: {line}"))

    def on_event(self, now_ns: int) -> bool:
        self.watcher.drain()
        effects = self.table.on_links(self.watcher.snapshot(), now_ns)
        changed = [
            e.link.index for e in effects if isinstance(e, Seen) and e.event is LinkEvent.CHANGED
        ]
        if changed:
            effects += self.table.on_changed(self.watcher.coverage(changed), now_ns)
        return self._apply(effects)

    def after_swap(self, opened_ns: int | None) -> bool:
        """A handle became active (its open started at `opened_ns`): verify every link."""
        cov = self.watcher.coverage(list(self.table.links))
        return self._apply(self.table.on_coverage(cov, opened_ns))

    def _sync_nft(self) -> None:
        """Admit links now guarded or diverted, withdraw those gone (after their TC guard is on:
        netfilter never lets a link's IP by before TC can see it)."""
        if self.nft is None:
            return
        try:
            self.nft.sync(self.table.admitted())
        except NftError as e:
            log.error("nft guard not updated (retried at the next link change): %s", e)

    def _apply(self, effects: list[Effect], sync: bool = True) -> bool:
        need = self._apply_effects(effects)
        if sync:
            self._sync_nft()
        return need

    def _apply_effects(self, effects: list[Effect]) -> bool:
        need = False
        for e in effects:
            if isinstance(e, Seen):
                log.info(
                    "link %s %s (ifindex %d, %s, %s)",
                    e.link.name,
                    e.event.value,
                    e.link.index,
                    e.link.kind,
                    "up" if e.link.up else "down",
                )
            elif isinstance(e, GuardLink):
                self._attach(e.link)
            elif isinstance(e, UnguardLink):
                if self.guard is not None and not self.permanent:
                    with contextlib.suppress(OSError, NetlinkError):
                        self.guard.detach(e.link.index)
                log.info(
                    "link %s (ifindex %d) diverted on ingress and egress, %.1f ms after it "
                    "was seen (guarded meanwhile%s)",
                    e.link.name,
                    e.link.index,
                    (time.monotonic_ns() - e.since_ns) / 1e6,
                    "; the guard stays" if self.permanent else "",
                )
            elif isinstance(e, NeedHandle):
                need = True
                log.info("new handle for link(s) %s", ", ".join(k.name for k in e.links))
            elif isinstance(e, Refuse):
                held = (
                    "its IP traffic is dropped"
                    if e.link.index in self.table.guarded
                    else ("its traffic passes UNEXAMINED")
                )
                line = (
                    f"link {e.link.name} (ifindex {e.link.index}, kind {e.link.kind}) refused: "
                    f"{e.reason} after a new handle; {held}"
                )
                log.error("%s", line)
                self._logs.append(Log(Severity.ERROR, f"capture: {line}"))
        return need

    def _attach(self, link: Link) -> None:
        if self.guard is None:
            log.error("link %s (ifindex %d) is unguarded until diverted", link.name, link.index)
            return
        try:
            self.guard.attach(link.index, link.name)
            self.table.guard_attached(link.index)
        except (OSError, NetlinkError) as e:
            if errno.ENODEV in (getattr(e, "code", None), getattr(e, "errno", None)):
                # It left again (a veth peer created here and moved out): nothing to guard.
                log.info("link %s (ifindex %d) went before it was guarded", link.name, link.index)
                return
            log.error("guarding link %s (ifindex %d) failed: %s", link.name, link.index, e)

    def close(self) -> None:
        if self.nft is not None:
            try:
                self.nft.close()
            except NftError as e:
                log.warning("removing the nft guard failed: %s", e)
        if self.guard is not None:
            self.guard.close()
        self.watcher.close()
