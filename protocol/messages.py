"""The actors' message contract: every message kextless processes send each other.

One tagged msgspec union, encoded as msgpack arrays (small and cheap: docs/measurements.md
M14). Bump CONTRACT_VERSION on any incompatible change; actors announce it in Hello and the
broker refuses a mismatch loudly instead of misreading fields. Addresses are raw network-order
bytes, exactly as on the kext wire, so codecs never re-parse text.

Framing: every ZeroMQ frame holds exactly one encoded message. A sender may put several messages
in one multipart message; the receiver handles the frames in order, as if they had come one by
one. For the broker's streaming rate an emitter batches infos in one `Emits` message (one frame,
one decode), see docs/broker-wire.md §9.
"""

from __future__ import annotations

import enum

import msgspec

from kextless.protocol.enums import CommandType, Direction, InfoType, Severity, Verdict

CONTRACT_VERSION = 1


class Flow(msgspec.Struct, frozen=True, array_like=True):
    """A connection's direction-agnostic key: local side is this host's side."""

    protocol: int
    local_ip: bytes
    local_port: int
    remote_ip: bytes
    remote_port: int

    @property
    def is_v6(self) -> bool:
        return len(self.local_ip) == 16


class _Msg(msgspec.Struct, tag=True, tag_field="msg", array_like=True, frozen=True):
    pass


# ---- every actor <-> broker -------------------------------------------------------------------


class Hello(_Msg, frozen=True):
    """First message an actor sends the broker (and again after a reconnect)."""

    actor: str
    pid: int
    contract: int
    owns: tuple[CommandType, ...] = ()


class Health(_Msg, frozen=True):
    """Periodic liveness and counters; the broker shows them in its status."""

    actor: str
    pid: int
    counters: dict[str, float]


class Log(_Msg, frozen=True):
    """A line for the kext's log ring; Portmaster fetches it with GetLogs."""

    severity: Severity
    line: str


class Emit(_Msg, frozen=True):
    """Queue an encoded info for Portmaster. `id` is the pending id of connection infos."""

    kind: InfoType
    info: bytes
    id: int = 0


class Emits(_Msg, frozen=True):
    """Several Emits in one message, queued in order: one frame and one decode for a batch."""

    emits: tuple[Emit, ...]


class EmitRefused(_Msg, frozen=True):
    """Broker -> emitter: the queue could not take this connection info (apply the default)."""

    id: int
    reason: str


class Resolved(_Msg, frozen=True):
    """Emitter -> broker: these pending ids were decided without a reader (verdict timeout):
    drop their connection infos if still queued, so no later reader is asked about them.
    One message per batch of timeouts. (Added in contract 1: an older broker logs and drops it.)"""

    ids: tuple[int, ...]


class Command(_Msg, frozen=True):
    """Broker -> owning actor: one validated kext command, still in kext wire format."""

    type: CommandType
    raw: bytes
    received_ns: int


# ---- capture <-> ale --------------------------------------------------------------------------


class PacketHeld(_Msg, frozen=True):
    """Capture -> ALE: a packet is held and needs a decision (payload = whole IP packet)."""

    hold_id: int
    flow: Flow
    direction: Direction
    packet: bytes
    seen_ns: int
    process_id: int = 0
    #: The link it was met on (0: unknown), so a restarted capture can hold it again (Rehold).
    ifindex: int = 0


class Rehold(_Msg, frozen=True):
    """ALE -> a restarted capture: a packet its killed predecessor held, still undecided. The
    capture holds it again as if just received; the ALE matches the PacketHeld that follows to
    the pending id it already issued, so the client is not asked twice."""

    packet: bytes
    direction: Direction
    ifindex: int


class Decision(_Msg, frozen=True):
    """ALE -> capture: what to do with held packets `hold_ids`, and the verdict they got."""

    hold_ids: tuple[int, ...]
    verdict: Verdict


class CacheSet(_Msg, frozen=True):
    """ALE -> capture: the connection now has this verdict (also sent for Update commands)."""

    flow: Flow
    verdict: Verdict


class CacheClear(_Msg, frozen=True):
    """ALE -> capture: forget every verdict; every live connection is asked again."""


class CaptureReady(_Msg, frozen=True):
    """Capture -> ALE at start: capture holds nothing from a previous life; resync caches."""

    pid: int


# ---- lifecycle / bandwidth ----------------------------------------------------------------------


class ConnectionEnded(_Msg, frozen=True):
    flow: Flow
    direction: Direction
    process_id: int
    ended_ns: int


class BandwidthDelta(_Msg, frozen=True):
    flow: Flow
    transmitted: int
    received: int


class AttributionKind(enum.IntEnum):
    """What an Attribution says about its flow (which fields of it are meaningful)."""

    #: The lifecycle actor is running and attributing (sent every second, flow all zero):
    #: only then does the ALE hold a connection info back waiting for its pid.
    PRESENT = 0
    #: A process is connecting to (protocol, remote_ip, remote_port); local side unknown yet
    #: (SOCKET CONNECT comes before the kernel picks the local port).
    OPENER = 1
    #: The exact 5-tuple belongs to this process (FLOW ESTABLISHED, or a socket table read).
    FLOW = 2
    #: This process listens on (protocol, local_ip, local_port); local_ip all zero = any.
    LISTENER = 3
    #: That listener is gone.
    UNLISTEN = 4


class Attribution(_Msg, frozen=True):
    """Lifecycle -> ALE: which process owns a flow, so connection infos carry its pid."""

    kind: AttributionKind
    flow: Flow
    process_id: int
    seen_ns: int


class Bundle(_Msg, frozen=True):
    """Several messages to one peer in one frame: under load a loop pass's PacketHelds,
    Decisions or Attributions cost one send, one wakeup and one decode instead of one each
    (each ZeroMQ message was measured at ~20-30 us of send and poll on this VM)."""

    msgs: tuple[Message, ...]


Message = (
    Hello
    | Health
    | Log
    | Emit
    | Emits
    | EmitRefused
    | Resolved
    | Command
    | PacketHeld
    | Rehold
    | Decision
    | CacheSet
    | CacheClear
    | CaptureReady
    | ConnectionEnded
    | BandwidthDelta
    | Attribution
    | Bundle
)

#: The most messages put in one Bundle (a bigger burst leaves as several).
BUNDLE_MAX = 256

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)

encode = _encoder.encode


def decode(data: bytes) -> Message:
    """Decode one message; raises msgspec.ValidationError / DecodeError on garbage.

    msgspec itself raises UnicodeDecodeError for a string that is not UTF-8 and RecursionError
    for Bundles nested a few hundred deep; both are garbage too, so they become a DecodeError,
    the type every receiver catches (uncaught, they ended the ALE's and capture's loops)."""
    try:
        return _decoder.decode(data)
    except UnicodeDecodeError as exc:
        raise msgspec.DecodeError(f"invalid UTF-8 in a string: {exc.reason}") from None
    except RecursionError:
        raise msgspec.DecodeError("message nested too deeply") from None


def unbundle(msg: Message) -> tuple[Message, ...]:
    """The messages a frame carried, in order: a Bundle's contents, or the message itself.

    Iterative, so a deeply nested Bundle that decoded fine cannot overflow the caller's stack
    (recursion here raised RecursionError in the shells, which only catch decode errors)."""
    if not isinstance(msg, Bundle):
        return (msg,)
    if not any(type(x) is Bundle for x in msg.msgs):
        return msg.msgs  # the usual case: one flat Bundle (encode_many never nests)
    out: list[Message] = []
    stack: list[Message] = [msg]
    while stack:
        one = stack.pop()
        if isinstance(one, Bundle):
            stack.extend(reversed(one.msgs))
        else:
            out.append(one)
    return tuple(out)


def encode_many(msgs: list[Message]) -> list[bytes]:
    """Frames for `msgs`, in order: one message alone, several as Bundles of <= BUNDLE_MAX."""
    if len(msgs) == 1:
        return [encode(msgs[0])]
    return [
        encode(Bundle(tuple(msgs[i : i + BUNDLE_MAX]))) for i in range(0, len(msgs), BUNDLE_MAX)
    ]
