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
    rule: str  # e.g. "rule 3 (line 14)", "default", or "update rule 2 (line 9)"
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


def write_snapshot(path: Path, snapshot: Snapshot) -> None:
    """Replace `path` atomically, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(msgspec.json.encode(snapshot))
    tmp.replace(path)


def read_snapshot(path: Path) -> Snapshot:
    return msgspec.json.decode(path.read_bytes(), type=Snapshot)
