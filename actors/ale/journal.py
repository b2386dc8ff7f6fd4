"""The ALE's decided connections survive its restart: a journal in the run directory.

Without it a SIGKILLed ALE comes back with an empty connection cache, and an UpdateV4/V6 (or a
connection end) for a connection decided before the kill is ignored: the kernel and the capture
still enforce the old verdict, and nobody can change it any more.

Why a journal and not a rebuild from the capture: the ALE's entry holds the pid and the
direction (for ConnectionEnd events) that the capture does not keep, a journal needs no new
contract message, and it works whichever of the two processes restarted.

Format: JSON lines, `RUN/ale-connections`. The first line names the instance it belongs to
(boot id, supervisord's pid and start time: a journal of an earlier `up`, or of an earlier
boot, describes connections that are gone, and is dropped). Then one record per change:
`["set", flow, verdict, pid, direction, ended_ns]`, `["forget", flow]`, `["clear"]`. Records
of one loop pass are written with one write(2) before that pass's messages leave, so a verdict
the capture enforces is in the journal first (page cache: it survives a process kill; the run
directory does not outlive a boot anyway). A torn last line (a kill mid-write) is ignored. On
start the journal is read and compacted (rewritten with only the live entries), and again
whenever it has grown past twice the live entries plus COMPACT_SLACK records.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import msgspec

from kextless.actors.ale.core import Connection
from kextless.protocol import messages as m
from kextless.protocol.enums import Direction, Verdict

FILE_NAME = "ale-connections"
#: Records appended beyond 2x the live entries before the journal is compacted.
COMPACT_SLACK = 100_000

log = logging.getLogger("ale")


class _Header(msgspec.Struct, frozen=True):
    journal: str
    owner: str


class _Set(msgspec.Struct, tag="set", array_like=True, frozen=True):
    flow: m.Flow
    verdict: Verdict
    pid: int
    direction: Direction
    ended_ns: int


class _Forget(msgspec.Struct, tag="forget", array_like=True, frozen=True):
    flow: m.Flow


class _Clear(msgspec.Struct, tag="clear", array_like=True, frozen=True):
    pass


_encode = msgspec.json.Encoder().encode
_decode_header = msgspec.json.Decoder(_Header).decode
_decode_record = msgspec.json.Decoder(_Set | _Forget | _Clear).decode
_CLEAR_LINE = _encode(_Clear()) + b"\n"


def encode_header(owner: str) -> bytes:
    return _encode(_Header("kextless ale connections", owner)) + b"\n"


def encode_set(flow: m.Flow, conn: Connection) -> bytes:
    rec = _Set(flow, conn.verdict, conn.process_id, conn.direction, conn.ended_ns)
    return _encode(rec) + b"\n"


def encode_changes(cleared: bool, changes: Iterable[tuple[m.Flow, Connection | None]]) -> bytes:
    """The lines for one loop pass's changes (AleCore.take_journal)."""
    lines = [_CLEAR_LINE] if cleared else []
    for flow, conn in changes:
        lines.append(encode_set(flow, conn) if conn else _encode(_Forget(flow)) + b"\n")
    return b"".join(lines)


class Replayed(msgspec.Struct):
    connections: dict[m.Flow, Connection]
    #: Lines that were not records (corrupt, or a torn last line), skipped.
    skipped: int = 0
    #: Why the journal as a whole was not used ("" when it was).
    dropped: str = ""


def replay(data: bytes, owner: str) -> Replayed:
    """The live entries a journal's bytes describe, if it belongs to `owner`. Never raises:
    a damaged line is skipped and counted, a journal of another instance is dropped."""
    lines = data.split(b"\n")
    if data and not data.endswith(b"\n"):
        lines[-1] = b""  # torn by a kill mid-write: that record never counted
    out = Replayed({})
    if not data:
        return out
    try:
        header = _decode_header(lines[0])
    except (msgspec.DecodeError, msgspec.ValidationError):
        out.dropped = "no journal header"
        return out
    if header.owner != owner:
        out.dropped = f"it belongs to another instance ({header.owner}, this is {owner})"
        return out
    conns = out.connections
    for line in lines[1:]:
        if not line:
            continue
        try:
            rec = _decode_record(line)
        except (msgspec.DecodeError, msgspec.ValidationError):
            out.skipped += 1
            continue
        if type(rec) is not _Clear and not _plausible(rec.flow):
            out.skipped += 1
        elif type(rec) is _Set:
            conns[rec.flow] = Connection(rec.verdict, rec.pid, rec.direction, 0, rec.ended_ns)
        elif type(rec) is _Forget:
            conns.pop(rec.flow, None)
        else:
            conns.clear()
    return out


class Journal:
    """The journal file: `load` once at start, then `append` once per loop pass."""

    def __init__(self, path: Path, owner: str) -> None:
        self.path = path
        self.owner = owner
        self._fd = -1
        self._appended = 0
        self._live = 0
        #: Bytes and write calls so far (the cost per decision, for health).
        self.bytes_written = 0
        self.writes = 0

    def load(self) -> dict[m.Flow, Connection]:
        """The previous process's decided connections, then the journal compacted to them."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        replayed = replay(data, self.owner)
        if replayed.dropped:
            log.info("journal %s not used: %s", self.path, replayed.dropped)
        if replayed.skipped:
            log.warning("journal %s: %d damaged line(s) skipped", self.path, replayed.skipped)
        self.compact(replayed.connections)
        return replayed.connections

    def compact(self, live: Mapping[m.Flow, Connection]) -> None:
        """Rewrite the journal with only `live` (atomic replace), and append from there."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        body = [encode_header(self.owner)]
        body += [encode_set(f, c) for f, c in live.items() if c.verdict != Verdict.UNDECIDED]
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, b"".join(body))
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        self.close()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._appended = 0
        self._live = len(body) - 1

    def append(
        self,
        cleared: bool,
        changes: list[tuple[m.Flow, Connection | None]],
        live: Mapping[m.Flow, Connection],
    ) -> None:
        """One loop pass's changes in one write; compacts when the file has grown too long."""
        if not cleared and not changes:
            return
        data = encode_changes(cleared, changes)
        _write_all(self._fd, data)
        self.bytes_written += len(data)
        self.writes += 1
        self._appended += len(changes) + cleared
        if self._appended > 2 * max(self._live, len(live)) + COMPACT_SLACK:
            self.compact(live)

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


def _plausible(flow: m.Flow) -> bool:
    n = len(flow.local_ip)
    return (
        n in (4, 16)
        and len(flow.remote_ip) == n
        and 0 <= flow.local_port <= 0xFFFF
        and 0 <= flow.remote_port <= 0xFFFF
    )


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def instance_owner(ppid: int) -> str:
    """Who this journal belongs to: the boot and the supervisord (the parent: it restarts the
    ALE, a new `up` starts a new one) by pid and start time, so a reused pid is not mistaken
    for it. Unreadable facts make a fresh owner, which drops an old journal: safe."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "?"
    try:
        stat = Path(f"/proc/{ppid}/stat").read_text()
        start = stat.rsplit(")", 1)[1].split()[19]  # field 22, starttime
    except (OSError, IndexError):
        start = f"?{os.getpid()}"
    return f"{boot}/{ppid}/{start}"
