"""The broker's session and command core: every decision, no sockets, no clock, no /proc.

The ZMQ shell (broker/server.py) hands it each received multipart message with `now_ns`; every
input method returns the list of effects to carry out, in order (base/cores.py): `ToClient`
(frames for a client DEALER), `ToActor` (frames for an actor DEALER) and `Event` (a line for
the broker's own log). Facts about the process come in as arguments: its pid at construction,
its memory (`Memory`, read by the shell) with the requests that report it (S and
PrintMemoryStats). Its deadlines are a parked read's timeout and the summary of log lines left
out (`next_deadline_ns`, `on_deadline`): every refused or malformed request gets a line in the
broker's log, up to a rate (`LineBudget`), then one summary per second. Keeping all semantics
here lets the tests drive them directly and keeps the shell a thin, fast loop.

Session model (docs/broker-wire.md, "Sessions"):
* NONE  -> O -> OPEN (owned by the opener's routing id; a second opener gets "device busy");
* OPEN  -> W Shutdown -> SHUT: the parked read gets E, undelivered infos are discarded, the
  Shutdown goes to its owners (the ALE resolves pending verdicts as PermanentBlock). Reads get E
  until the owner closes; writes are still tolerated, as Portmaster's tickers may still fire;
* OPEN/SHUT -> C (or the owner disconnects) -> NONE. Without Shutdown the queue is kept for the
  next opener, but a half-delivered info is rewound and sent whole again, and the connection
  infos the session read but never answered go back to the front of the queue, in the order
  they were read (a client killed mid-decision loses nothing; one decided meanwhile by the
  ALE's verdict timeout, `Resolved`, is not asked again).
Any peer may R and W while a session is open (they are the threads sharing the handle); only the
owner opens and closes.

No client (`NoClient`): with WAIT (the kext's way) connection infos queue until a reader comes
or the ALE's verdict timeout decides them; the ALE then sends `Resolved` and their infos leave
the queue, so a later reader never gets an already-decided connection. With DEFAULT, while no
session is open (NONE, or SHUT), a connection info is refused at once (EmitRefused: the ALE
applies its default verdict now), and a session that ends without Shutdown refuses the
connection infos it left queued.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from enum import Enum, StrEnum
from typing import Any

import msgspec

from kextless.base.linebudget import LineBudget
from kextless.broker import wire
from kextless.broker.ioqueue import IOQueue, Item, PushResult
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
    Resolved,
    decode,
    encode,
)

DEFAULT_QUEUE_BYTES = 64 * 1024 * 1024
#: Delivered-but-unanswered connection infos remembered (for the latency measurement, and to
#: queue them again when their session ends unanswered); past it the oldest half is forgotten
#: (they would time out anyway).
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

_VERSION_REPLY = (wire.VERSION, INTERFACE_VERSION)
_CONNECTION_KINDS = frozenset({InfoType.CONNECTION_IPV4, InfoType.CONNECTION_IPV6})
_OK = bytes((wire.Status.OK,))
_W_OK = (wire.WRITE, _OK)
_CMD_NAMES = {t: t.kext_name for t in CommandType}


# ---- effects: what the shell carries out, in order ----------------------------------------------


class ToClient(msgspec.Struct, frozen=True):
    """Send `frames` (a reply: op byte first) to the client DEALER with routing id `peer`."""

    peer: bytes
    frames: tuple[bytes, ...]


class ToActor(msgspec.Struct, frozen=True):
    """Send `frames` (encoded protocol.messages) to the actor DEALER named `actor`."""

    actor: bytes
    frames: tuple[bytes, ...]


class Event(msgspec.Struct, frozen=True):
    """One line for the broker's own log (stderr)."""

    text: str


Effect = ToClient | ToActor | Event


class Memory(msgspec.Struct, frozen=True):
    """The broker process's memory as the shell read it, for S and PrintMemoryStats."""

    rss_kib: int
    peak_kib: int


class NoClient(StrEnum):
    """What a connection info meets while no client session is open (module docstring)."""

    WAIT = "wait"
    DEFAULT = "default"


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


Handler = Callable[[bytes, list[bytes], int, Memory | None], list[Effect]]


class BrokerCore:
    """Sessions, the info queue, command validation and routing, counters."""

    def __init__(
        self,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        pid: int | None = None,
        no_client: NoClient = NoClient.WAIT,
    ) -> None:
        self.queue = IOQueue(queue_bytes)
        self.no_client = no_client
        #: Connection infos refused because no session was open (NoClient.DEFAULT).
        self.no_client_refused = 0
        #: Log lines for refused requests and for no-client refusals: one each up to a rate.
        self._refused_lines = LineBudget()
        self._no_client_lines = LineBudget()
        self.ring = LogRing()
        #: The broker process's id, for S (the shell knows it; None when unknown).
        self.pid = pid
        self.state = SessionState.NONE
        self.owner: bytes | None = None
        self.parked: ParkedRead | None = None
        self.actors: dict[bytes, ActorInfo] = {}
        #: Health relayed by another actor (the capture's, through the ALE), by its `actor` name:
        #: filed apart so it never overwrites the relaying actor's own counters.
        self.relayed: dict[str, ActorInfo] = {}
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
        #: Delivered, unanswered connection infos by id: (when delivered, the info).
        self._delivered_at: dict[int, tuple[int, Item]] = {}
        self._latencies: deque[int] = deque(maxlen=LATENCY_SAMPLES)
        self._warned_episode = 0
        self._handlers: dict[bytes, Handler] = {
            wire.OPEN: self._op_open,
            wire.CLOSE: self._op_close,
            wire.READ: self._op_read,
            wire.WRITE: self._op_write,
            wire.VERSION: self._op_version,
            wire.STATS: self._op_stats,
        }

    # ---- helpers -------------------------------------------------------------------------------

    def log(self, severity: Severity, text: str) -> Event:
        """A line for Portmaster's log stream (fetched with GetLogs); returns it for stderr."""
        line = f"{source_tag(1)} {text}"
        self.ring.add(severity, line)
        return Event(f"{severity.name.lower()}: {line}")

    @staticmethod
    def _error(peer: bytes, message: str) -> ToClient:
        return ToClient(peer, (wire.ERROR, message.encode()))

    # ---- client side ---------------------------------------------------------------------------

    def client_message(
        self, peer: bytes, frames: list[bytes], now_ns: int, memory: Memory | None = None
    ) -> list[Effect]:
        """One request from a client DEALER (frames after the routing id); exactly one reply.

        `memory` is the process's memory, which S and PrintMemoryStats report (the shell reads
        it for those requests only; None shows as unknown)."""
        if not frames:
            self.frame_errors += 1
            return [self._error(peer, "empty message: the first frame must be an op byte")]
        handler = self._handlers.get(frames[0])
        if handler is None:
            self.frame_errors += 1
            op = frames[0][:16]
            out: list[Effect] = [
                self._error(peer, f"unknown op {op!r}: expected one of O C R W V S")
            ]
        else:
            out = handler(peer, frames, now_ns, memory)
        for effect in out:
            if type(effect) is ToClient and effect.frames is not _W_OK and effect.peer == peer:
                reply = effect.frames
                if reply[0] == wire.ERROR or (
                    reply[0] == wire.WRITE and reply[1][:1] != _OK and len(frames) > 1
                ):
                    self._refused_request(peer, frames, reply, now_ns, out)
                    break
        return out

    def _refused_request(
        self,
        peer: bytes,
        frames: list[bytes],
        reply: tuple[bytes, ...],
        now_ns: int,
        out: list[Effect],
    ) -> None:
        """A line in the broker's log for a refused request (rate-limited, then summed up)."""
        summary, own_line = self._refused_lines.note(now_ns)
        if summary:
            out.append(self._refused_summary(summary))
        if not own_line:
            return
        op = frames[0][:1].decode("ascii", "replace") if frames else "?"
        if reply[0] == wire.ERROR:
            why = reply[1].decode("utf-8", "replace") if len(reply) > 1 else ""
            out.append(Event(f"refused: {op} from client {peer.hex()}: {why}"))
            return
        try:
            status = wire.Status(reply[1][0]).name
        except ValueError:
            status = str(reply[1][0])
        raw = frames[1]
        if not raw:
            kind = "empty"
        elif raw[0] in _CMD_NAMES:
            kind = _CMD_NAMES[CommandType(raw[0])]
        else:
            kind = f"type {raw[0]}"
        why = reply[1][1:].decode("utf-8", "replace")
        out.append(
            Event(
                f"refused: command {kind} ({len(raw)} bytes) from client {peer.hex()}: "
                f"{status} {why}"
            )
        )

    @staticmethod
    def _refused_summary(n: int) -> Event:
        return Event(
            f"refused: {n} more request(s) refused within a second (not logged one by one; "
            "counters in `kextless status --verbose`)"
        )

    def _extra_frames(self, peer: bytes, frames: list[bytes]) -> list[Effect] | None:
        """The refusal of an op that takes no frames but got some, else None."""
        if len(frames) != 1:
            self.frame_errors += 1
            why = f"op {frames[0].decode()} takes no frames, got {len(frames) - 1}"
            return [self._error(peer, why)]
        return None

    def _op_version(
        self, peer: bytes, frames: list[bytes], now_ns: int, memory: Memory | None
    ) -> list[Effect]:
        return self._extra_frames(peer, frames) or [ToClient(peer, _VERSION_REPLY)]

    def _op_stats(
        self, peer: bytes, frames: list[bytes], now_ns: int, memory: Memory | None
    ) -> list[Effect]:
        refused = self._extra_frames(peer, frames)
        if refused:
            return refused
        data = json.dumps(self.stats(now_ns, memory)).encode()
        return [ToClient(peer, (wire.STATS, data))]

    def _op_open(
        self, peer: bytes, frames: list[bytes], now_ns: int, memory: Memory | None
    ) -> list[Effect]:
        refused = self._extra_frames(peer, frames)
        if refused:
            return refused
        if self.state is not SessionState.NONE and self.owner != peer:
            self.sessions["busy_refused"] += 1
            return [self._error(peer, "device busy: another client has the session open")]
        out: list[Effect] = []
        if self.state is not SessionState.OPEN:
            self.state = SessionState.OPEN
            self.owner = peer
            self.sessions["opened"] += 1
            self.queue.rewind_partial()
            out.append(Event(f"session opened by {peer.hex()}"))
        out.append(ToClient(peer, (wire.OPEN,)))
        return out

    def _op_close(
        self, peer: bytes, frames: list[bytes], now_ns: int, memory: Memory | None
    ) -> list[Effect]:
        refused = self._extra_frames(peer, frames)
        if refused:
            return refused
        if self.state is SessionState.NONE:
            return [self._error(peer, "no open session")]
        if peer != self.owner:
            why = "not the session owner: only the client that opened it closes it"
            return [self._error(peer, why)]
        out: list[Effect] = []
        self._end_session("closed", out)
        out.append(ToClient(peer, (wire.CLOSE,)))
        return out

    def _end_session(self, why: str, out: list[Effect]) -> None:
        self._answer_parked_eof(out)
        self.state = SessionState.NONE
        self.owner = None
        self.sessions["closed"] += 1
        self.queue.rewind_partial()
        out.append(Event(f"session {why}"))
        self._requeue_unanswered(out)
        self._refuse_queued(out)

    def _requeue_unanswered(self, out: list[Effect]) -> None:
        """The session ended without Shutdown: what it read and did not answer is asked
        again, first and in order, of the next session."""
        unanswered = self._delivered_at
        if not unanswered:
            return
        items = [item for _t, item in unanswered.values()]
        self._delivered_at = {}
        self.queue.requeue(items)
        out.append(
            Event(
                f"{len(items)} connection info(s) read but not answered queued again "
                f"(ids {items[0][2]}..{items[-1][2]})"
            )
        )

    def _answer_parked_eof(self, out: list[Effect]) -> None:
        parked = self.parked
        if parked is not None:
            self.parked = None
            self.reads["eof"] += 1
            out.append(ToClient(parked.peer, (wire.EOF,)))

    def _op_read(
        self, peer: bytes, frames: list[bytes], now_ns: int, memory: Memory | None
    ) -> list[Effect]:
        n = len(frames)
        if n not in (2, 3) or any(len(f) != 4 for f in frames[1:]):
            self.frame_errors += 1
            return [
                self._error(
                    peer,
                    "R takes one u32 LE max_bytes frame and an optional u32 LE "
                    "timeout_ms frame (4 bytes each)",
                )
            ]
        max_bytes = wire.U32.unpack(frames[1])[0]
        if not 1 <= max_bytes <= wire.MAX_READ_BYTES:
            self.frame_errors += 1
            why = f"max_bytes must be 1..{wire.MAX_READ_BYTES}, got {max_bytes}"
            return [self._error(peer, why)]
        timeout_ms = wire.U32.unpack(frames[2])[0] if n == 3 else 0
        state = self.state
        if state is SessionState.NONE:
            return [self._error(peer, "no open session")]
        if state is SessionState.SHUT:
            self.reads["eof"] += 1
            return [ToClient(peer, (wire.EOF,))]
        if self.parked is not None:
            return [self._error(peer, "another read is already waiting")]
        data = self.queue.read(max_bytes)
        if data is not None:
            return [self._delivered(peer, data, now_ns)]
        self.reads["parked"] += 1
        deadline = now_ns + timeout_ms * 1_000_000 if timeout_ms else None
        self.parked = ParkedRead(peer, max_bytes, deadline)
        return []

    def _delivered(self, peer: bytes, data: bytes, now_ns: int) -> ToClient:
        self.reads["answered"] += 1
        items = self.queue.last_delivered
        if items:
            at = self._delivered_at
            for item in items:
                at[item[2]] = (now_ns, item)
            if len(at) > LATENCY_TRACKED_IDS:
                # Forget the oldest half in one go: ids Portmaster never answered (or answered
                # after a Shutdown) must not grow this map, and trimming one by one from the
                # front of a dict is quadratic.
                keep = list(at.items())[len(at) // 2 :]
                self._delivered_at = dict(keep)
        return ToClient(peer, (wire.READ, data))

    def _serve_parked(self, now_ns: int, out: list[Effect]) -> None:
        """Answer the parked read if data arrived or its timeout passed."""
        parked = self.parked
        if parked is None:
            return
        data = self.queue.read(parked.max_bytes)
        if data is not None:
            self.parked = None
            out.append(self._delivered(parked.peer, data, now_ns))
        elif parked.deadline_ns is not None and now_ns >= parked.deadline_ns:
            self.parked = None
            self.reads["timeouts"] += 1
            out.append(ToClient(parked.peer, (wire.TIMEOUT,)))

    def next_deadline_ns(self) -> int | None:
        """The parked read's timeout, or an earlier due summary of log lines left out (None:
        nothing is due; a read may wait forever)."""
        due = None if self.parked is None else self.parked.deadline_ns
        for budget in (self._refused_lines, self._no_client_lines):
            b = budget.due_ns()
            if b is not None:
                due = b if due is None else min(due, b)
        return due

    def on_deadline(self, now_ns: int) -> list[Effect]:
        """Answer the parked read with T once its timeout has passed (or with data, if some
        arrived), and sum up the log lines left out in a second that is over."""
        out: list[Effect] = []
        self._serve_parked(now_ns, out)
        n = self._refused_lines.flush(now_ns)
        if n:
            out.append(self._refused_summary(n))
        n = self._no_client_lines.flush(now_ns)
        if n:
            out.append(self._no_client_summary(n))
        return out

    def read_undeliverable(self, peer: bytes) -> list[Effect]:
        """The shell could not send a read reply (the reader vanished): put the data back."""
        self.reads["undelivered"] += 1
        for item in self.queue.last_delivered:  # back in the queue: not unanswered
            self._delivered_at.pop(item[2], None)
        self.queue.undo_read()
        return [Event(f"read reply to {peer.hex()} undeliverable; infos put back")]

    def peer_gone(self, peer: bytes) -> list[Effect]:
        """A client connection dropped: release its session and forget its parked read."""
        out: list[Effect] = []
        if self.parked is not None and self.parked.peer == peer:
            self.parked = None
        if self.owner == peer and self.state is not SessionState.NONE:
            self.sessions["owner_disconnects"] += 1
            self._end_session(f"closed: owner {peer.hex()} disconnected", out)
        return out

    def stop(self) -> list[Effect]:
        """The broker is stopping: a waiting reader gets EOF."""
        out: list[Effect] = []
        self._answer_parked_eof(out)
        return out

    # ---- commands ------------------------------------------------------------------------------

    def _op_write(
        self, peer: bytes, frames: list[bytes], now_ns: int, memory: Memory | None
    ) -> list[Effect]:
        if len(frames) != 2:
            self.frame_errors += 1
            why = f"W takes exactly one command frame, got {len(frames) - 1}"
            return [self._error(peer, why)]
        if self.state is SessionState.NONE:
            return [self._error(peer, "no open session")]
        raw = frames[1]
        try:
            cmd = decode_command(raw)
        except ProtocolError as exc:
            return self._malformed(peer, raw, str(exc))
        t = cmd.TYPE
        counts = self.commands[_CMD_NAMES[t]]
        out: list[Effect] = []
        if type(cmd) is VerdictCommand:
            sent = self._delivered_at.pop(cmd.id, None)
            if sent is not None:
                self._latencies.append(now_ns - sent[0])
        elif t == CommandType.SHUTDOWN:
            self._shutdown(out)
        elif t == CommandType.GET_LOGS:
            self._flush_logs(now_ns, out)
            counts["ok"] += 1
            out.append(ToClient(peer, _W_OK))
            return out
        elif t == CommandType.PRINT_MEMORY_STATS:
            out.append(self.log(Severity.INFO, self._memory_line(memory)))
            counts["ok"] += 1
            out.append(ToClient(peer, _W_OK))
            return out
        owners = self.owners.get(t)
        if not owners and t not in OPTIONAL_COMMANDS:
            counts["unhandled"] += 1
            status = bytes((wire.Status.UNHANDLED,)) + f"no actor handles {t.kext_name}".encode()
            out.append(ToClient(peer, (wire.WRITE, status)))
            return out
        counts["ok"] += 1
        # The reply leaves before the command goes to its owners, as it always did: it is what
        # the writer waits for.
        out.append(ToClient(peer, _W_OK))
        if owners:
            msg = (encode(Command(t, raw, now_ns)),)
            for o in owners:
                out.append(ToActor(o, msg))
        return out

    def _malformed(self, peer: bytes, raw: bytes, why: str) -> list[Effect]:
        if raw and raw[0] in _CMD_NAMES:
            self.commands[_CMD_NAMES[CommandType(raw[0])]]["malformed"] += 1
        else:
            self.malformed_unknown += 1
        # For GetLogs; the broker's own log gets its (rate-limited) line in client_message.
        self.log(Severity.ERROR, f"Malformed command rejected: {why}")
        return [ToClient(peer, (wire.WRITE, bytes((wire.Status.MALFORMED,)) + why.encode()))]

    def _shutdown(self, out: list[Effect]) -> None:
        self.sessions["shutdowns"] += 1
        self.state = SessionState.SHUT
        self._answer_parked_eof(out)
        n = self.queue.discard()
        self._delivered_at.clear()
        out.append(Event(f"shutdown: session ended, {n} undelivered infos discarded"))

    def _flush_logs(self, now_ns: int, out: list[Effect]) -> None:
        for record in self.ring.flush():
            self._push(None, InfoType.LOG_LINE, record, 0, out)
        if self.queue.readable():
            self._serve_parked(now_ns, out)

    def _memory_line(self, memory: Memory | None) -> str:
        q = self.queue
        rss, peak = ("?", "?") if memory is None else (memory.rss_kib, memory.peak_kib)
        return (
            f"memory: rss {rss} KiB (peak {peak}"
            f" KiB); queue {len(q)} infos / {q.bytes} of {q.max_bytes} bytes "
            f"(priority {q.depth_priority}, bulk {q.depth_bulk}, leftover "
            f"{q.leftover_bytes} B); log ring {len(self.ring)} lines; "
            f"latency ids tracked {len(self._delivered_at)}"
        )

    # ---- actor side ----------------------------------------------------------------------------

    def actor_message(self, actor: bytes, frames: list[bytes], now_ns: int) -> list[Effect]:
        """One multipart message from an actor DEALER; every frame is one contract message.

        Emit/Emits are the hot path (hundreds of thousands of infos per second): an emitter
        batches infos in one Emits, which is one decode and one push loop here.
        """
        out: list[Effect] = []
        info = self.actors.get(actor)
        if info is None:
            info = self._new_actor(actor, out)
        info.last_seen_ns = now_ns
        info.messages += len(frames)
        pushed = False
        for frame in frames:
            try:
                msg = decode(frame)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self._garbage(info, f"undecodable message: {exc}", out)
                continue
            if type(msg) is Emits:
                pushed |= self._push_emits(actor, info, msg.emits, now_ns, out)
            elif type(msg) is Emit:
                pushed |= self._push_emits(actor, info, (msg,), now_ns, out)
            elif type(msg) is Log:
                self.ring.add(msg.severity, msg.line)
            elif type(msg) is Resolved:
                self._withdraw(msg.ids)
            elif type(msg) is Health:
                if msg.actor == info.name:
                    info.counters = msg.counters
                    info.pid = msg.pid
                else:
                    self._relayed_health(msg, now_ns)
            elif type(msg) is Hello:
                self._hello(actor, info, msg, out)
            else:
                self._garbage(info, f"{type(msg).__name__} is not a message for the broker", out)
        if pushed and self.parked is not None:
            self._serve_parked(now_ns, out)
        return out

    def _withdraw(self, ids: tuple[int, ...]) -> None:
        """Connection infos decided without a reader (verdict timeout) leave the queue."""
        self.queue.withdraw(ids)
        at = self._delivered_at
        for i in ids:
            at.pop(i, None)

    def _refuse_no_client(self, actor: bytes, id_: int, now_ns: int, out: list[Effect]) -> None:
        """NoClient.DEFAULT with no session open: the emitter decides this info now."""
        self.no_client_refused += 1
        why = "no client session open, --no-client default"
        out.append(ToActor(actor, (encode(EmitRefused(id_, why)),)))
        summary, own_line = self._no_client_lines.note(now_ns)
        if summary:
            out.append(self._no_client_summary(summary))
        if own_line:
            out.append(Event(f"no client session open: connection info {id_} refused at once"))

    @staticmethod
    def _no_client_summary(n: int) -> Event:
        return Event(
            f"no client session open: {n} more connection info(s) refused within a second "
            "(not logged one by one)"
        )

    def _refuse_queued(self, out: list[Effect]) -> None:
        """NoClient.DEFAULT: a session ended; the connection infos it left go back to their
        emitter (the owner of Verdict), which applies its default verdict now."""
        if self.no_client is not NoClient.DEFAULT:
            return
        ids = self.queue.withdraw_connections()
        emitters = self.owners.get(CommandType.VERDICT, ())
        if not ids or not emitters:
            return
        self.no_client_refused += len(ids)
        why = "the client session ended, --no-client default"
        frames = tuple(encode(EmitRefused(i, why)) for i in ids)
        for emitter in emitters:
            out.append(ToActor(emitter, frames))
        out.append(Event(f"no client session open: {len(ids)} queued connection info(s) refused"))

    def _relayed_health(self, msg: Health, now_ns: int) -> None:
        """File another actor's Health under its name; the table is bounded like `actors`."""
        name = msg.actor[:64]
        if name not in self.relayed and len(self.relayed) >= MAX_ACTORS:
            del self.relayed[min(self.relayed, key=lambda k: self.relayed[k].last_seen_ns)]
        self.relayed[name] = ActorInfo(
            name, msg.pid, counters=msg.counters, last_seen_ns=now_ns, messages=1
        )

    def _push_emits(
        self,
        actor: bytes,
        info: ActorInfo,
        emits: tuple[Emit, ...],
        now_ns: int,
        out: list[Effect],
    ) -> bool:
        """Queue each Emit whose record matches its kind; True if anything was queued."""
        pushed = False
        push = self.queue.push
        unpack = HEADER.unpack_from
        queued = PushResult.QUEUED
        refuse = self.no_client is NoClient.DEFAULT and self.state is not SessionState.OPEN
        for emit in emits:
            record = emit.info
            n = len(record)
            if n >= HEADER_SIZE:
                kind, length = unpack(record)
                if kind == emit.kind and length == n - HEADER_SIZE:
                    if refuse and kind in _CONNECTION_KINDS:
                        self._refuse_no_client(actor, emit.id, now_ns, out)
                        continue
                    result = push(kind, record, emit.id)
                    if result is queued:
                        pushed = True
                    else:
                        pushed |= self._push_outcome(actor, result, emit.id, out)
                    continue
            self._garbage(
                info,
                f"Emit of kind {emit.kind} whose record ({n} bytes, header "
                f"{bytes(record[:HEADER_SIZE]).hex()}) does not match it",
                out,
            )
        return pushed

    def _new_actor(self, actor: bytes, out: list[Effect]) -> ActorInfo:
        """Register a sender. Any local process of our user can connect, so the table is
        bounded: past MAX_ACTORS the least recently seen sender (preferring ones that own no
        command) is forgotten."""
        actors = self.actors
        if len(actors) >= MAX_ACTORS:
            victim = min(actors, key=lambda k: (bool(actors[k].owns), actors[k].last_seen_ns))
            gone = actors.pop(victim)
            if gone.owns:
                self._rebuild_owners()
            out.append(Event(f"actor table full: forgot {gone.name}"))
        info = actors[actor] = ActorInfo(actor.decode("utf-8", "replace")[:64])
        return info

    def _garbage(self, info: ActorInfo, why: str, out: list[Effect]) -> None:
        """Count and log a dropped actor message; the log is thinned out so a babbling peer
        cannot flood stderr."""
        self.actor_garbage += 1
        info.garbage += 1
        n = info.garbage
        if n <= GARBAGE_LOGGED or n % 1000 == 0:
            out.append(Event(f"actor {info.name}: dropped {why[:300]} ({n} dropped so far)"))

    def _push(
        self, actor: bytes | None, kind: int, record: bytes, id_: int, out: list[Effect]
    ) -> bool:
        result = self.queue.push(kind, record, id_)
        return result is PushResult.QUEUED or self._push_outcome(actor, result, id_, out)

    def _push_outcome(
        self, actor: bytes | None, result: PushResult, id_: int, out: list[Effect]
    ) -> bool:
        """Apply the overflow policy's side effects; True if the info was queued."""
        q = self.queue
        if result is PushResult.REFUSED:
            if actor is not None:
                why = f"queue full ({q.bytes} of {q.max_bytes} bytes held by connection infos)"
                out.append(ToActor(actor, (encode(EmitRefused(id_, why)),)))
            return False
        episodes = q.overflow_episodes
        if q.overflowing and episodes != self._warned_episode:
            self._warned_episode = episodes
            out.append(
                self.log(
                    Severity.WARNING,
                    f"info queue full ({q.max_bytes} bytes): dropping the oldest bandwidth "
                    "and log infos; see dropped counters",
                )
            )
        return result is PushResult.QUEUED_AFTER_DROP

    def _hello(self, actor: bytes, info: ActorInfo, msg: Hello, out: list[Effect]) -> None:
        if msg.contract != CONTRACT_VERSION:
            self._garbage(
                info,
                f"Hello with contract {msg.contract}, broker speaks "
                f"{CONTRACT_VERSION}: ignored until it is upgraded",
                out,
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
            out.append(Event(f"actor {msg.actor} (pid {msg.pid}) connected, owns {names}"))

    def actor_gone(self, actor: bytes) -> list[Effect]:
        """A send to the actor failed: it is gone until it says Hello again."""
        info = self.actors.pop(actor, None)
        if info is None:
            return []
        self._rebuild_owners()
        return [Event(f"actor {info.name} unreachable; its commands are unowned")]

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

    def stats(self, now_ns: int, memory: Memory | None = None) -> dict[str, Any]:
        """The S counters (docs/broker-wire.md §6); `memory` as the shell read it."""
        q = self.queue

        def by_type(counts: list[int]) -> dict[str, int]:
            return {t.kext_name: counts[t] for t in InfoType}

        ale = next((a for a in self.actors.values() if a.name == "ale"), None)
        counters = ale.counters if ale else {}
        return {
            "version": ".".join(str(b) for b in INTERFACE_VERSION),
            "pid": self.pid,
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
                "withdrawn": by_type(q.withdrawn),
                "requeued": by_type(q.requeued),
            },
            "no_client": {"mode": self.no_client.value, "refused": self.no_client_refused},
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
                    "counters": a.counters,
                }
                for a in self.actors.values()
            }
            | {
                a.name: {
                    "pid": a.pid,
                    "relayed": True,
                    "counters": a.counters,
                    "last_seen_s_ago": round((now_ns - a.last_seen_ns) / 1e9, 3),
                }
                for a in self.relayed.values()
                if all(a.name != d.name for d in self.actors.values())
            },
            "rss_kib": None if memory is None else memory.rss_kib,
        }
