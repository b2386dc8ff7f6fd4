"""What the built-in policy tells the outside: one JSON line per decision and a snapshot of
its connection table, both in the run directory, both read by `kextless monitor`.

The policy is the one client of the broker (one session at a time), so it is the only place
that sees every connection info, end event and bandwidth delta; it writes what it saw here
instead of the monitor opening a second session.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import msgspec

#: Beside the other logs (run_dir/logs), appended one line per decision.
DECISIONS_FILE = "decisions.jsonl"
#: In the run dir, replaced atomically (write + rename) about once a second.
SNAPSHOT_FILE = "connections.json"


def bracketed(ip: str) -> str:
    """An address as it appears before `:port`: IPv6 in brackets, IPv4 as is."""
    return f"[{ip}]" if ipaddress.ip_address(ip).version == 6 else ip


class ProcessFacts(msgspec.Struct, frozen=True, kw_only=True):
    """Who owns a connection, as the policy read it when the info arrived (pid 0: unknown)."""

    pid: int = 0
    name: str = ""  # /proc/PID/comm
    exe: str = ""  # /proc/PID/exe's target
    user: str = ""  # the owner's user name (uid as text when it has none)
    uid: int = -1  # the owner's real uid (-1: unknown), for `user = 1000` rules


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """One line of decisions.jsonl."""

    time: float  # wall clock, seconds since the epoch
    id: int
    pid: int
    process: str
    exe: str
    user: str
    direction: str  # "outbound" | "inbound"
    protocol: str  # "tcp" | "udp" | "icmp" | "icmpv6" | the number as text
    local_ip: str  # IPv6 in brackets
    local_port: int
    remote_ip: str  # IPv6 in brackets
    remote_port: int
    rule: str  # "rule 3 (line 14)" (L: its [[rule]] header), the rule's `name`, or "default"
    verdict: str  # the kext's verdict name
    #: True when this line is a re-decision of a live connection after a rules reload.
    update: bool = False


class ConnectionRow(msgspec.Struct, kw_only=True):
    """One connection in the snapshot; bytes are totals since it was first seen."""

    id: int
    pid: int
    process: str
    direction: str
    protocol: str
    local_ip: str  # IPv6 in brackets
    local_port: int
    remote_ip: str
    remote_port: int
    verdict: str
    rule: str
    exe: str = ""
    user: str = ""
    sent: int = 0
    received: int = 0
    started: float  # wall clock of the decision
    ended: float | None = None  # wall clock of its end event, None while live


class Snapshot(msgspec.Struct, kw_only=True):
    taken: float  # wall clock
    rules_file: str
    rules_loaded: float  # wall clock of the last good load
    rules_error: str = ""  # the last refused reload's message, "" when the last one was good
    connections: list[ConnectionRow] = []
    #: Rows the bounded table let go before they expired (oldest ended first), since start.
    dropped_rows: int = 0


class DecisionFile:
    """decisions.jsonl, appended a batch of lines per write; at `max_bytes` it is renamed to
    decisions.jsonl.1 (replacing the previous one) and a new file starts, so the two together
    never hold more than about 2 * max_bytes. A reader that follows the file reopens it when
    its inode changes."""

    def __init__(self, path: Path, max_bytes: int = 16 * 1024 * 1024) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._encoder = msgspec.json.Encoder()
        self._file = open(path, "ab")  # noqa: SIM115 - held open for the process's life
        self._size = self._file.tell()

    def write(self, decisions: list[Decision]) -> None:
        if not decisions:
            return
        buf = bytearray()
        for d in decisions:
            self._encoder.encode_into(d, buf, len(buf))
            buf += b"\n"
        if self._size + len(buf) > self.max_bytes and self._size:
            self._rotate()
        self._file.write(buf)
        self._file.flush()
        self._size += len(buf)

    def _rotate(self) -> None:
        self._file.close()
        self.path.replace(self.path.with_name(self.path.name + ".1"))
        self._file = open(self.path, "ab")  # noqa: SIM115
        self._size = 0

    def close(self) -> None:
        self._file.close()


def read_decisions(path: Path) -> list[Decision]:
    """Every decision in a decisions.jsonl (a torn last line is skipped)."""
    decoder = msgspec.json.Decoder(Decision)
    out = []
    for line in path.read_bytes().splitlines():
        try:
            out.append(decoder.decode(line))
        except msgspec.DecodeError:
            continue
    return out


def write_snapshot(path: Path, snapshot: Snapshot) -> None:
    """Replace `path` atomically, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(msgspec.json.encode(snapshot))
    tmp.replace(path)


def read_snapshot(path: Path) -> Snapshot:
    return msgspec.json.decode(path.read_bytes(), type=Snapshot)
