"""The event queue and the kext's read algorithm, as a pure core (no sockets, no clocks).

Two FIFOs replace the kext's single unbounded KQUEUE (kext-contract C3, C15-2):
* priority: connection infos and connection-end infos, so verdict requests never wait behind a
  backlog of bandwidth tables or log lines;
* bulk: bandwidth and log infos.
Both share one byte budget. Connection infos are never dropped: when they cannot fit even after
evicting every bulk info, the push is *refused* and the emitter applies its default verdict.
Connection-end infos that do not fit are dropped and counted (Portmaster ignores them). Bulk
infos are dropped oldest-first; each overflow *episode* is counted once so the owner can log one
warning instead of thousands.

Items are `(type, record_bytes, id)` tuples: records are already encoded by the emitter, the
queue never re-parses them. The id lets a connection info be *withdrawn* while it still waits
(its packet got the default verdict at the timeout): a later reader is never asked about a
connection that was already decided.
"""

from __future__ import annotations

import builtins
from collections import deque
from collections.abc import Iterable
from enum import IntEnum

from kextless.protocol.enums import InfoType

#: The kext keeps packing while strictly more than this many bytes of the buffer are free.
PACK_MIN_FREE = 5

_PRIORITY_TYPES = frozenset(
    {
        InfoType.CONNECTION_IPV4,
        InfoType.CONNECTION_IPV6,
        InfoType.CONNECTION_END_EVENT_V4,
        InfoType.CONNECTION_END_EVENT_V6,
    }
)
_CONNECTION_TYPES = frozenset({InfoType.CONNECTION_IPV4, InfoType.CONNECTION_IPV6})
_N_TYPES = len(InfoType)

Item = tuple[int, bytes, int]


class PushResult(IntEnum):
    QUEUED = 0
    #: Queued, after evicting older bulk infos to make room.
    QUEUED_AFTER_DROP = 1
    #: A bulk or connection-end info that did not fit; it was dropped and counted.
    DROPPED = 2
    #: A connection info that does not fit; the emitter must be told (EmitRefused).
    REFUSED = 3


class IOQueue:
    """Bounded two-class info queue with the kext's leftover slot and read packing."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError("queue capacity must be at least 1 byte")
        self.max_bytes = max_bytes
        self._prio: deque[Item] = deque()
        self._bulk: deque[Item] = deque()
        # Bytes in each FIFO (the leftover slot is counted separately: at most one info).
        self.prio_bytes = 0
        self.bulk_bytes = 0
        #: The info being delivered in pieces, and how many of its bytes went out already.
        self._leftover: Item | None = None
        self._leftover_off = 0
        self.overflowing = False
        self.overflow_episodes = 0
        self.queued = [0] * _N_TYPES
        self.delivered = [0] * _N_TYPES
        self.dropped = [0] * _N_TYPES
        self.refused = [0] * _N_TYPES
        self.discarded = [0] * _N_TYPES
        self.withdrawn = [0] * _N_TYPES
        #: Connection infos whose last byte went out in the latest read (for latency, and to
        #: queue them again if their session ends unanswered).
        self.last_delivered: list[Item] = []
        self.requeued = [0] * _N_TYPES
        # What the latest read took, so a reply that could not be sent can be put back.
        self._undo: tuple[Item | None, int, list[Item]] | None = None

    # ---- state ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._prio) + len(self._bulk)

    # Below this property, `bytes` in the class body names it: annotations say builtins.bytes.
    @property
    def bytes(self) -> int:
        return self.prio_bytes + self.bulk_bytes

    @property
    def last_delivered_ids(self) -> list[int]:
        return [item[2] for item in self.last_delivered]

    @property
    def depth_priority(self) -> int:
        return len(self._prio)

    @property
    def depth_bulk(self) -> int:
        return len(self._bulk)

    @property
    def leftover_bytes(self) -> int:
        lo = self._leftover
        return 0 if lo is None else len(lo[1]) - self._leftover_off

    @property
    def partial(self) -> bool:
        """True when part of an info already went out and its tail waits in the leftover slot."""
        return self._leftover is not None and self._leftover_off > 0

    def readable(self) -> bool:
        """Whether a read would return data now (the kext would not block)."""
        return self._leftover is not None or bool(self._prio) or bool(self._bulk)

    # ---- push ----------------------------------------------------------------------------------

    def push(self, kind: int, record: builtins.bytes, id_: int = 0) -> PushResult:
        """Queue one encoded info, applying the overflow policy of the module docstring."""
        size = len(record)
        prio = kind in _PRIORITY_TYPES
        if self.prio_bytes + self.bulk_bytes + size <= self.max_bytes:
            self._append(kind, record, id_, prio)
            return PushResult.QUEUED
        # Over budget. Only bulk infos may be evicted, and never for a bulk info that would not
        # fit even in an empty bulk FIFO.
        if self.prio_bytes + size > self.max_bytes:
            if kind in _CONNECTION_TYPES:
                self.refused[kind] += 1
                return PushResult.REFUSED
            self.dropped[kind] += 1
            self._start_episode()
            return PushResult.DROPPED
        self._evict_bulk(size)
        self._append(kind, record, id_, prio)
        return PushResult.QUEUED_AFTER_DROP

    def _append(self, kind: int, record: builtins.bytes, id_: int, prio: bool) -> None:
        if prio:
            self._prio.append((kind, record, id_))
            self.prio_bytes += len(record)
        else:
            self._bulk.append((kind, record, id_))
            self.bulk_bytes += len(record)
        self.queued[kind] += 1

    def _start_episode(self) -> None:
        if not self.overflowing:
            self.overflowing = True
            self.overflow_episodes += 1

    def _evict_bulk(self, need: int) -> None:
        """Drop the oldest bulk infos until `need` more bytes fit."""
        bulk = self._bulk
        while self.prio_bytes + self.bulk_bytes + need > self.max_bytes and bulk:
            k, rec, _ = bulk.popleft()
            self.bulk_bytes -= len(rec)
            self.dropped[k] += 1
        self._start_episode()

    # ---- read ----------------------------------------------------------------------------------

    def read(self, max_bytes: int) -> builtins.bytes | None:
        """One kext read into a buffer of `max_bytes` (>= 1); None means the reader must wait.

        1. A leftover goes first, as much as fits, without waiting.
        2. Otherwise at least one info must be queued (else None: wait).
        3. Then keep packing while more than PACK_MIN_FREE bytes are free; an info that does not
           fit is split and its tail becomes the leftover, so at most one info is partial.
        """
        if max_bytes < 1:
            raise ValueError("a read needs a buffer of at least 1 byte")
        prio, bulk = self._prio, self._bulk
        lo = self._leftover
        if lo is None and not prio and not bulk:
            return None
        undo_popped: list[Item] = []
        self._undo = (lo, self._leftover_off, undo_popped)
        ids: list[Item] = []
        self.last_delivered = ids
        parts: list[builtins.bytes] = []
        free = max_bytes
        if lo is not None:
            rec = lo[1]
            off = self._leftover_off
            rest = len(rec) - off
            if rest > free:
                parts.append(rec[off : off + free])
                self._leftover_off = off + free
                return parts[0]
            parts.append(rec[off:] if off else rec)
            free -= rest
            self._leftover = None
            self._leftover_off = 0
            self._finished(lo, ids)
            if free <= PACK_MIN_FREE:
                return b"".join(parts)
        first = lo is None
        delivered = self.delivered
        while first or free > PACK_MIN_FREE:
            first = False
            if prio:
                item = prio.popleft()
                rec = item[1]
                n = len(rec)
                self.prio_bytes -= n
            elif bulk:
                item = bulk.popleft()
                rec = item[1]
                n = len(rec)
                self.bulk_bytes -= n
            else:
                break
            undo_popped.append(item)
            if n <= free:
                parts.append(rec)
                free -= n
                kind = item[0]
                delivered[kind] += 1
                if kind in _CONNECTION_TYPES:
                    ids.append(item)
            else:
                parts.append(rec[:free])
                self._leftover = item
                self._leftover_off = free
                free = 0
                break
        if self.overflowing and self.prio_bytes + self.bulk_bytes <= self.max_bytes // 2:
            self.overflowing = False
        return b"".join(parts)

    def _finished(self, item: Item, ids: list[Item]) -> None:
        kind = item[0]
        self.delivered[kind] += 1
        if kind in _CONNECTION_TYPES:
            ids.append(item)

    def undo_read(self) -> None:
        """Put back what the latest read took (its reply could not be delivered)."""
        if self._undo is None:
            return
        lo, off, popped = self._undo
        self._undo = None
        cur = self._leftover
        # Every popped item, and a finished leftover, counted as delivered unless it is the
        # current (partial) leftover.
        for item in popped:
            if item is not cur:
                self.delivered[item[0]] -= 1
        if lo is not None and lo is not cur:
            self.delivered[lo[0]] -= 1
        for item in reversed(popped):
            if item[0] in _PRIORITY_TYPES:
                self._prio.appendleft(item)
                self.prio_bytes += len(item[1])
            else:
                self._bulk.appendleft(item)
                self.bulk_bytes += len(item[1])
        self._leftover = lo
        self._leftover_off = off
        self.last_delivered = []

    # ---- withdrawing ----------------------------------------------------------------------------

    def withdraw(self, ids: Iterable[int]) -> int:
        """Drop the still-queued connection infos with these ids (decided without a reader);
        returns how many. One whose first bytes a reader already has stays: its tail must
        follow, or the stream would be cut mid-info. Ids are issued in order and the oldest
        time out first, so they are found near the front and deleted cheaply."""
        wanted = set(ids)
        wanted.discard(0)
        if not wanted:
            return 0
        n = 0
        lo = self._leftover
        if (
            lo is not None
            and self._leftover_off == 0
            and lo[2] in wanted
            and lo[0] in _CONNECTION_TYPES
        ):
            self._leftover = None
            self.withdrawn[lo[0]] += 1
            wanted.discard(lo[2])
            n += 1
        prio = self._prio
        found: list[int] = []
        for i, item in enumerate(prio):
            if item[2] in wanted and item[0] in _CONNECTION_TYPES:
                found.append(i)
                wanted.discard(item[2])
                if not wanted:
                    break
        for i in reversed(found):
            item = prio[i]
            del prio[i]
            self.prio_bytes -= len(item[1])
            self.withdrawn[item[0]] += 1
        n += len(found)
        if n:
            self._undo = None  # (a read's undo follows its send at once, never a withdraw)
        return n

    def withdraw_connections(self) -> list[int]:
        """Withdraw every queued connection info no reader has begun (nobody will answer
        them); returns their ids in queue order."""
        ids = [item[2] for item in self._prio if item[0] in _CONNECTION_TYPES]
        lo = self._leftover
        if lo is not None and self._leftover_off == 0 and lo[0] in _CONNECTION_TYPES:
            ids.insert(0, lo[2])
        self.withdraw(ids)
        return ids

    # ---- session changes -----------------------------------------------------------------------

    def requeue(self, items: list[Item]) -> None:
        """Connection infos a reader got whose session ended unanswered go first again, in the
        order given, ahead of an info waiting whole in the leftover slot (it came after them).
        They held their bytes before, so they are taken even beyond the byte budget."""
        if not items:
            return
        lo = self._leftover
        if lo is not None and self._leftover_off == 0:
            self._leftover = None
            if lo[0] in _PRIORITY_TYPES:
                self._prio.appendleft(lo)
                self.prio_bytes += len(lo[1])
            else:
                self._bulk.appendleft(lo)
                self.bulk_bytes += len(lo[1])
        prio = self._prio
        for item in reversed(items):
            prio.appendleft(item)
            self.prio_bytes += len(item[1])
            self.requeued[item[0]] += 1
        self._undo = None

    def rewind_partial(self) -> None:
        """A new reader must never start mid-info: deliver a partial info again from its start."""
        self._leftover_off = 0
        self._undo = None

    def discard(self) -> int:
        """Shutdown: drop every undelivered info (the leftover included); returns how many."""
        n = 0
        for q in (self._prio, self._bulk):
            for k, _, _ in q:
                self.discarded[k] += 1
                n += 1
            q.clear()
        if self._leftover is not None:
            self.discarded[self._leftover[0]] += 1
            n += 1
        self._leftover = None
        self._leftover_off = 0
        self.prio_bytes = self.bulk_bytes = 0
        self.overflowing = False
        self._undo = None
        return n
