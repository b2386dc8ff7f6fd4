"""The broker's session and command core: every decision, no sockets, no clock of its own.

The ZMQ shell (broker/server.py) hands it each received multipart message with `now_ns` and sends
whatever it leaves in `to_clients` / `to_actors`. Keeping all semantics here lets the tests drive
them directly and keeps the shell a thin, fast loop.

Session model (docs/broker-wire.md, "Sessions"):
* NONE  -> O -> OPEN (owned by the opener's routing id; a second opener gets "device busy");
* OPEN  -> W Shutdown -> SHUT: the parked read gets E, undelivered infos are discarded, the
  Shutdown goes to its owners (the ALE resolves pending verdicts as PermanentBlock). Reads get E
  until the owner closes; writes are still tolerated, as Portmaster's tickers may still fire;
* OPEN/SHUT -> C (or the owner disconnects) -> NONE. Without Shutdown the queue is kept for the
  next opener, but a half-delivered info is rewound and sent whole again.
Any peer may R and W while a session is open (they are the threads sharing the handle); only the
owner opens and closes.
"""

from __future__ import annotations

import json
import os
import resource
from collections import deque
from enum import Enum
from typing import Any

import msgspec

from kextless.broker import wire
from kextless.broker.ioqueue import IOQueue, PushResult
from kextless.broker.logring import LogRing
from kextless.protocol.commands import VerdictCommand, decode_command
from kextless.protocol.enums import INTERFACE_VERSION, CommandType, InfoType, Severity
from kextless.protocol.errors import ProtocolError
from kextless.protocol.infos import HEADER, HEADER_SIZE
from kextless.protocol.logtag import source_tag
from kextless.protocol.messages import (
    CONTRACT_VERSION,
    Command,
    Emit,
    EmitRefused,
    Emits,
    Health,
    Hello,
    Log,
    decode,
    encode,
)

DEFAULT_QUEUE_BYTES = 64 * 1024 * 1024
#: Delivered-but-unanswered connection ids remembered for the latency measurement.
LATENCY_TRACKED_IDS = 65536
#: Latency samples kept for the quantiles.
LATENCY_SAMPLES = 8192

#: Distinct actor identities remembered (see BrokerCore._new_actor).
MAX_ACTORS = 64
#: Dropped messages logged per actor before only every 1000th is.
GARBAGE_LOGGED = 20

#: Commands that no actor may claim: the broker answers them itself.
BROKER_COMMANDS = frozenset({CommandType.GET_LOGS, CommandType.PRINT_MEMORY_STATS})
#: Commands that succeed with nothing to do when no actor owns them: with no bandwidth or
#: connection state kept anywhere there is nothing to report or clean, which is what the kext
#: does with empty maps. Everything else unowned is rejected (Status.UNHANDLED).
OPTIONAL_COMMANDS = frozenset(
    {CommandType.SHUTDOWN, CommandType.GET_BANDWIDTH_STATS, CommandType.CLEAN_ENDED_CONNECTIONS}
)

_VERSION_REPLY = [wire.VERSION, INTERFACE_VERSION]
_OK = bytes((wire.Status.OK,))
_CMD_NAMES = {t: t.kext_name for t in CommandType}


class SessionState(Enum):
    NONE = "none"
    OPEN = "open"
    SHUT = "shut"


class ActorInfo(msgspec.Struct):
    name: str
    pid: int = 0
    owns: tuple[CommandType, ...] = ()
    counters: dict[str, float] = {}
    last_seen_ns: int = 0
    messages: int = 0
    garbage: int = 0


class ParkedRead(msgspec.Struct):
    peer: bytes
    max_bytes: int
    deadline_ns: int | None


class BrokerCore:
    """Sessions, the info queue, command validation and routing, counters."""

    def __init__(self, queue_bytes: int = DEFAULT_QUEUE_BYTES) -> None:
        self.queue = IOQueue(queue_bytes)
        self.ring = LogRing()
        self.state = SessionState.NONE
        self.owner: bytes | None = None
        self.parked: ParkedRead | None = None
        #: Outgoing multipart messages, routing id first. The shell sends and clears them.
        self.to_clients: list[list[bytes]] = []
        self.to_actors: list[list[bytes]] = []
        #: Human-readable events for the shell's stderr log (one line each).
        self.events: list[str] = []
        self.actors: dict[bytes, ActorInfo] = {}
        self.owners: dict[CommandType, tuple[bytes, ...]] = {}
        self.sessions = {
            "opened": 0,
            "closed": 0,
            "shutdowns": 0,
            "busy_refused": 0,
            "owner_disconnects": 0,
        }
        self.commands: dict[str, dict[str, int]] = {
            n: {"ok": 0, "malformed": 0, "unhandled": 0} for n in _CMD_NAMES.values()
        }
        self.malformed_unknown = 0  # malformed commands whose type byte is unknown/absent
        self.frame_errors = 0
        self.actor_garbage = 0
        self.reads = {"answered": 0, "parked": 0, "timeouts": 0, "eof": 0, "undelivered": 0}
        self._delivered_at: dict[int, int] = {}
        self._latencies: deque[int] = deque(maxlen=LATENCY_SAMPLES)
        self._warned_episode = 0
        self._handlers = {
            wire.OPEN: self._op_open,
            wire.CLOSE: self._op_close,
            wire.READ: self._op_read,
            wire.WRITE: self._op_write,
            wire.VERSION: self._op_version,
            wire.STATS: self._op_stats,
        }

    # ---- helpers -------------------------------------------------------------------------------

    def log(self, severity: Severity, text: str) -> None:
        """A line for Portmaster's log stream (fetched with GetLogs) and for stderr."""
        line = f"{source_tag(1)} {text}"
        self.ring.add(severity, line)
        self.events.append(f"{severity.name.lower()}: {line}")

    def _error(self, peer: bytes, message: str) -> None:
        self.to_clients.append([peer, wire.ERROR, message.encode()])

    # ---- client side ---------------------------------------------------------------------------

    def client_message(self, peer: bytes, frames: list[bytes], now_ns: int) -> None:
        """One request from a client DEALER (frames after the routing id); exactly one reply."""
        if not frames:
            self.frame_errors += 1
            self._error(peer, "empty message: the first frame must be an op byte")
            return
        handler = self._handlers.get(frames[0])
        if handler is None:
            self.frame_errors += 1
            op = frames[0][:16]
            self._error(peer, f"unknown op {op!r}: expected one of O C R W V S")
            return
        handler(peer, frames, now_ns)

    def _no_extra(self, peer: bytes, frames: list[bytes]) -> bool:
        if len(frames) != 1:
            self.frame_errors += 1
            self._error(peer, f"op {frames[0].decode()} takes no frames, got {len(frames) - 1}")
            return False
        return True

    def _op_version(self, peer: bytes, frames: list[bytes], now_ns: int) -> None:
        if self._no_extra(peer, frames):
            self.to_clients.append([peer, *_VERSION_REPLY])

    def _op_stats(self, peer: bytes, frames: list[bytes], now_ns: int) -> None:
        if self._no_extra(peer, frames):
            self.to_clients.append([peer, wire.STATS, json.dumps(self.stats(now_ns)).encode()])

    def _op_open(self, peer: bytes, frames: list[bytes], now_ns: int) -> None:
        if not self._no_extra(peer, frames):
            return
        if self.state is not SessionState.NONE and self.owner != peer:
            self.sessions["busy_refused"] += 1
            self._error(peer, "device busy: another client has the session open")
            return
        if self.state is not SessionState.OPEN:
            self.state = SessionState.OPEN
            self.owner = peer
            self.sessions["opened"] += 1
            self.queue.rewind_partial()
            self.events.append(f"session opened by {peer.hex()}")
        self.to_clients.append([peer, wire.OPEN])

    def _op_close(self, peer: bytes, frames: list[bytes], now_ns: int) -> None:
        if not self._no_extra(peer, frames):
            return
        if self.state is SessionState.NONE:
            self._error(peer, "no open session")
            return
        if peer != self.owner:
            self._error(peer, "not the session owner: only the client that opened it closes it")
            return
        self._end_session("closed")
        self.to_clients.append([peer, wire.CLOSE])

    def _end_session(self, why: str) -> None:
        self._answer_parked_eof()
        self.state = SessionState.NONE
        self.owner = None
        self.sessions["closed"] += 1
        self.queue.rewind_partial()
        self.events.append(f"session {why}")

    def _answer_parked_eof(self) -> None:
        parked = self.parked
        if parked is not None:
            self.parked = None
            self.reads["eof"] += 1
            self.to_clients.append([parked.peer, wire.EOF])

    def _op_read(self, peer: bytes, frames: list[bytes], now_ns: int) -> None:
        n = len(frames)
        if n not in (2, 3) or any(len(f) != 4 for f in frames[1:]):
            self.frame_errors += 1
            self._error(
                peer,
                "R takes one u32 LE max_bytes frame and an optional u32 LE "
                "timeout_ms frame (4 bytes each)",
            )
            return
        max_bytes = wire.U32.unpack(frames[1])[0]
        if not 1 <= max_bytes <= wire.MAX_READ_BYTES:
            self.frame_errors += 1
            self._error(peer, f"max_bytes must be 1..{wire.MAX_READ_BYTES}, got {max_bytes}")
            return
        timeout_ms = wire.U32.unpack(frames[2])[0] if n == 3 else 0
        state = self.state
        if state is SessionState.NONE:
            self._error(peer, "no open session")
            return
        if state is SessionState.SHUT:
            self.reads["eof"] += 1
            self.to_clients.append([peer, wire.EOF])
            return
        if self.parked is not None:
            self._error(peer, "another read is already waiting")
            return
        data = self.queue.read(max_bytes)
        if data is not None:
            self._delivered(peer, data, now_ns)
            return
        self.reads["parked"] += 1
        deadline = now_ns + timeout_ms * 1_000_000 if timeout_ms else None
        self.parked = ParkedRead(peer, max_bytes, deadline)

    def _delivered(self, peer: bytes, data: bytes, now_ns: int) -> None:
        self.reads["answered"] += 1
        self.to_clients.append([peer, wire.READ, data])
        ids = self.queue.last_delivered_ids
        if ids:
            at = self._delivered_at
            for i in ids:
                at[i] = now_ns
            if len(at) > LATENCY_TRACKED_IDS:
                # Forget the oldest half in one go: ids Portmaster never answered (or answered
                # after a Shutdown) must not grow this map, and trimming one by one from the
                # front of a dict is quadratic.
                keep = list(at.items())[len(at) // 2 :]
                self._delivered_at = dict(keep)

    def service(self, now_ns: int) -> None:
        """Answer the parked read if data arrived or its timeout passed."""
        parked = self.parked
        if parked is None:
            return
        data = self.queue.read(parked.max_bytes)
        if data is not None:
            self.parked = None
            self._delivered(parked.peer, data, now_ns)
        elif parked.deadline_ns is not None and now_ns >= parked.deadline_ns:
            self.parked = None
            self.reads["timeouts"] += 1
            self.to_clients.append([parked.peer, wire.TIMEOUT])

    @property
    def next_deadline_ns(self) -> int | None:
        return None if self.parked is None else self.parked.deadline_ns

    def read_undeliverable(self, peer: bytes) -> None:
        """The shell could not send a read reply (the reader vanished): put the data back."""
        self.reads["undelivered"] += 1
        self.queue.undo_read()
        self.events.append(f"read reply to {peer.hex()} undeliverable; infos put back")

    def peer_gone(self, peer: bytes) -> None:
        """A client connection dropped: release its session and forget its parked read."""
        if self.parked is not None and self.parked.peer == peer:
            self.parked = None
        if self.owner == peer and self.state is not SessionState.NONE:
            self.sessions["owner_disconnects"] += 1
            self._end_session(f"closed: owner {peer.hex()} disconnected")

    def stop(self) -> None:
        """The broker is stopping: a waiting reader gets EOF."""
        self._answer_parked_eof()

    # ---- commands ------------------------------------------------------------------------------

    def _op_write(self, peer: bytes, frames: list[bytes], now_ns: int) -> None:
        if len(frames) != 2:
            self.frame_errors += 1
            self._error(peer, f"W takes exactly one command frame, got {len(frames) - 1}")
            return
        if self.state is SessionState.NONE:
            self._error(peer, "no open session")
            return
        raw = frames[1]
        try:
            cmd = decode_command(raw)
        except ProtocolError as exc:
            self._malformed(peer, raw, str(exc))
            return
        t = cmd.TYPE
        counts = self.commands[_CMD_NAMES[t]]
        if type(cmd) is VerdictCommand:
            sent = self._delivered_at.pop(cmd.id, None)
            if sent is not None:
                self._latencies.append(now_ns - sent)
        elif t == CommandType.SHUTDOWN:
            self._shutdown(now_ns)
        elif t == CommandType.GET_LOGS:
            self._flush_logs(now_ns)
            counts["ok"] += 1
            self.to_clients.append([peer, wire.WRITE, _OK])
            return
        elif t == CommandType.PRINT_MEMORY_STATS:
            self.log(Severity.INFO, self._memory_line())
            counts["ok"] += 1
            self.to_clients.append([peer, wire.WRITE, _OK])
            return
        owners = self.owners.get(t)
        if owners:
            msg = encode(Command(t, raw, now_ns))
            for o in owners:
                self.to_actors.append([o, msg])
        elif t not in OPTIONAL_COMMANDS:
            counts["unhandled"] += 1
            self.to_clients.append(
                [
                    peer,
                    wire.WRITE,
                    bytes((wire.Status.UNHANDLED,)) + f"no actor handles {t.kext_name}".encode(),
                ]
            )
            return
        counts["ok"] += 1
        self.to_clients.append([peer, wire.WRITE, _OK])

    def _malformed(self, peer: bytes, raw: bytes, why: str) -> None:
        if raw and raw[0] in _CMD_NAMES:
            self.commands[_CMD_NAMES[CommandType(raw[0])]]["malformed"] += 1
        else:
            self.malformed_unknown += 1
        self.log(Severity.ERROR, f"Malformed command rejected: {why}")
        self.to_clients.append([peer, wire.WRITE, bytes((wire.Status.MALFORMED,)) + why.encode()])

    def _shutdown(self, now_ns: int) -> None:
        self.sessions["shutdowns"] += 1
        self.state = SessionState.SHUT
        self._answer_parked_eof()
        n = self.queue.discard()
        self._delivered_at.clear()
        self.events.append(f"shutdown: session ended, {n} undelivered infos discarded")

    def _flush_logs(self, now_ns: int) -> None:
        q = self.queue
        for record in self.ring.flush():
            self._push(None, InfoType.LOG_LINE, record, 0)
        if q.readable():
            self.service(now_ns)

    def _memory_line(self) -> str:
        q = self.queue
        rss = _rss_kib()
        return (
            f"memory: rss {rss} KiB (peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}"
            f" KiB); queue {len(q)} infos / {q.bytes} of {q.max_bytes} bytes "
            f"(priority {q.depth_priority}, bulk {q.depth_bulk}, leftover "
            f"{q.leftover_bytes} B); log ring {len(self.ring)} lines; "
            f"latency ids tracked {len(self._delivered_at)}"
        )

    # ---- actor side ----------------------------------------------------------------------------

    def actor_message(self, actor: bytes, frames: list[bytes], now_ns: int) -> None:
        """One multipart message from an actor DEALER; every frame is one contract message.

        Emit/Emits are the hot path (hundreds of thousands of infos per second): an emitter
        batches infos in one Emits, which is one decode and one push loop here.
        """
        info = self.actors.get(actor)
        if info is None:
            info = self._new_actor(actor)
        info.last_seen_ns = now_ns
        info.messages += len(frames)
        pushed = False
        for frame in frames:
            try:
                msg = decode(frame)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self._garbage(info, f"undecodable message: {exc}")
                continue
            kind = type(msg)
            if kind is Emits:
                pushed |= self._push_emits(actor, info, msg.emits)
            elif kind is Emit:
                pushed |= self._push_emits(actor, info, (msg,))
            elif kind is Log:
                self.ring.add(msg.severity, msg.line)
            elif kind is Health:
                info.counters = msg.counters
                info.pid = msg.pid
            elif kind is Hello:
                self._hello(actor, info, msg)
            else:
                self._garbage(info, f"{kind.__name__} is not a message for the broker")
        if pushed and self.parked is not None:
            self.service(now_ns)

    def _push_emits(self, actor: bytes, info: ActorInfo, emits: tuple[Emit, ...]) -> bool:
        """Queue each Emit whose record matches its kind; True if anything was queued."""
        pushed = False
        push = self.queue.push
        unpack = HEADER.unpack_from
        queued = PushResult.QUEUED
        for emit in emits:
            record = emit.info
            n = len(record)
            if n >= HEADER_SIZE:
                kind, length = unpack(record)
                if kind == emit.kind and length == n - HEADER_SIZE:
                    result = push(kind, record, emit.id)
                    if result is queued:
                        pushed = True
                    else:
                        pushed |= self._push_outcome(actor, result, emit.id)
                    continue
            self._garbage(
                info,
                f"Emit of kind {emit.kind} whose record ({n} bytes, header "
                f"{bytes(record[:HEADER_SIZE]).hex()}) does not match it",
            )
        return pushed

    def _new_actor(self, actor: bytes) -> ActorInfo:
        """Register a sender. Any local process of our user can connect, so the table is
        bounded: past MAX_ACTORS the least recently seen sender (preferring ones that own no
        command) is forgotten."""
        actors = self.actors
        if len(actors) >= MAX_ACTORS:
            victim = min(actors, key=lambda k: (bool(actors[k].owns), actors[k].last_seen_ns))
            gone = actors.pop(victim)
            if gone.owns:
                self._rebuild_owners()
            self.events.append(f"actor table full: forgot {gone.name}")
        info = actors[actor] = ActorInfo(actor.decode("utf-8", "replace")[:64])
        return info

    def _garbage(self, info: ActorInfo, why: str) -> None:
        """Count and log a dropped actor message; the log is thinned out so a babbling peer
        cannot flood stderr."""
        self.actor_garbage += 1
        info.garbage += 1
        n = info.garbage
        if n <= GARBAGE_LOGGED or n % 1000 == 0:
            self.events.append(f"actor {info.name}: dropped {why[:300]} ({n} dropped so far)")

    def _push(self, actor: bytes | None, kind: int, record: bytes, id_: int) -> bool:
        result = self.queue.push(kind, record, id_)
        return result is PushResult.QUEUED or self._push_outcome(actor, result, id_)

    def _push_outcome(self, actor: bytes | None, result: PushResult, id_: int) -> bool:
        """Apply the overflow policy's side effects; True if the info was queued."""
        q = self.queue
        if result is PushResult.REFUSED:
            if actor is not None:
                self.to_actors.append(
                    [
                        actor,
                        encode(
                            EmitRefused(
                                id_,
                                f"queue full ({q.bytes} of {q.max_bytes} bytes held by connection "
                                "infos)",
                            )
                        ),
                    ]
                )
            return False
        episodes = q.overflow_episodes
        if q.overflowing and episodes != self._warned_episode:
            self._warned_episode = episodes
            self.log(
                Severity.WARNING,
                f"info queue full ({q.max_bytes} bytes): dropping the oldest bandwidth "
                "and log infos; see dropped counters",
            )
        return result is PushResult.QUEUED_AFTER_DROP

    def _hello(self, actor: bytes, info: ActorInfo, msg: Hello) -> None:
        if msg.contract != CONTRACT_VERSION:
            self._garbage(
                info,
                f"Hello with contract {msg.contract}, broker speaks "
                f"{CONTRACT_VERSION}: ignored until it is upgraded",
            )
            return
        claimed = tuple(t for t in msg.owns if t not in BROKER_COMMANDS)
        # Actors repeat Hello as a keepalive; only a change is worth a log line.
        changed = (info.name, info.pid, info.owns) != (msg.actor, msg.pid, claimed)
        info.name = msg.actor
        info.pid = msg.pid
        info.owns = claimed
        self._rebuild_owners()
        if changed:
            names = ",".join(t.kext_name for t in claimed) or "nothing"
            self.events.append(f"actor {msg.actor} (pid {msg.pid}) connected, owns {names}")

    def actor_gone(self, actor: bytes) -> None:
        """A send to the actor failed: it is gone until it says Hello again."""
        info = self.actors.pop(actor, None)
        if info is not None:
            self._rebuild_owners()
            self.events.append(f"actor {info.name} unreachable; its commands are unowned")

    def _rebuild_owners(self) -> None:
        owners: dict[CommandType, list[bytes]] = {}
        for ident, a in self.actors.items():
            for t in a.owns:
                owners.setdefault(t, []).append(ident)
        self.owners = {t: tuple(v) for t, v in owners.items()}

    # ---- counters ------------------------------------------------------------------------------

    def latency_quantiles_us(self) -> dict[str, float | int]:
        samples = sorted(self._latencies)
        n = len(samples)
        out: dict[str, float | int] = {"samples": n}
        if n:
            for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
                out[name] = round(samples[min(n - 1, int(q * n))] / 1000, 1)
            out["max"] = round(samples[-1] / 1000, 1)
        return out

    def stats(self, now_ns: int) -> dict[str, Any]:
        q = self.queue

        def by_type(counts: list[int]) -> dict[str, int]:
            return {t.kext_name: counts[t] for t in InfoType}

        ale = next((a for a in self.actors.values() if a.name == "ale"), None)
        counters = ale.counters if ale else {}
        return {
            "version": ".".join(str(b) for b in INTERFACE_VERSION),
            "pid": os.getpid(),
            "queue": {
                "depth": len(q),
                "bytes": q.bytes,
                "capacity_bytes": q.max_bytes,
                "priority_depth": q.depth_priority,
                "bulk_depth": q.depth_bulk,
                "leftover_bytes": q.leftover_bytes,
                "overflowing": q.overflowing,
                "overflow_episodes": q.overflow_episodes,
            },
            "session": {
                "state": self.state.value,
                "reader_waiting": self.parked is not None,
                **self.sessions,
            },
            "infos": {
                "queued": by_type(q.queued),
                "delivered": by_type(q.delivered),
                "dropped": by_type(q.dropped),
                "refused": by_type(q.refused),
                "discarded": by_type(q.discarded),
            },
            "commands": self.commands,
            "malformed_unknown_type": self.malformed_unknown,
            "reads": self.reads,
            "frame_errors": self.frame_errors,
            "actor_garbage": self.actor_garbage,
            "pending_verdicts": counters.get("pending"),
            "connections_tracked": counters.get("connections"),
            "verdict_rtt_us": self.latency_quantiles_us(),
            "log_ring": {"lines": len(self.ring), "overwritten": self.ring.total_overwritten},
            "actors": {
                a.name: {
                    "pid": a.pid,
                    "owns": [t.kext_name for t in a.owns],
                    "messages": a.messages,
                    "dropped": a.garbage,
                    "last_seen_s_ago": round((now_ns - a.last_seen_ns) / 1e9, 3),
                }
                for a in self.actors.values()
            },
            "rss_kib": _rss_kib(),
        }


def _rss_kib() -> int:
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
