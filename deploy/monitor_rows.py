"""The monitor's data side, pure: a policy Snapshot and a wall-clock `now` in, the rows to
show (with their computed fields), sorted and filtered, and the totals out; and the decision
log's lines (bytes in, Decisions out, filtered newest first).

No file, clock or terminal here, so the unit tests build a Snapshot and check every column;
`deploy/monitor.py` (the `--once` output) and `deploy/monitor_app.py` (the live screen) only
read the file, take the time and draw what this returns.
"""

from __future__ import annotations

import enum
import ipaddress
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from kextless.actors.policy.view import ConnectionRow, Decision, Snapshot

#: The policy replaces its snapshot about once a second; older than this, it has stopped.
STALE_AFTER_S = 5.0


class Column(enum.Enum):
    """The screen's columns, in order; each is also a sort key (`--sort NAME`)."""

    PROCESS = "process"
    PID = "pid"
    DIRECTION = "dir"
    PROTOCOL = "proto"
    LOCAL = "local"
    REMOTE = "remote"
    VERDICT = "verdict"
    RULE = "rule"
    SENT = "sent"
    RECEIVED = "recv"
    AGE = "age"
    ENDED = "ended"


class StateFilter(enum.Enum):
    """Which connections to show: every one, only live ones, or only ended ones."""

    ALL = "all"
    LIVE = "live"
    ENDED = "ended"

    def next(self) -> StateFilter:
        members = list(StateFilter)
        return members[(members.index(self) + 1) % len(members)]


class Row(msgspec.Struct, frozen=True, kw_only=True):
    """One connection as shown: the snapshot's fields plus what the monitor computes."""

    id: int
    pid: int
    process: str
    direction: str
    protocol: str
    local_ip: str  # IPv6 in brackets, as the snapshot has it
    local_port: int
    remote_ip: str
    remote_port: int
    verdict: str
    rule: str
    exe: str  # not a column: too wide; in the JSON and matched by the filter
    user: str
    sent: int
    received: int
    started: float
    ended: float | None
    # computed
    live: bool
    local: str  # "ip:port"
    remote: str
    age_s: float  # since the connection was decided
    ended_ago_s: float | None  # since its end event; None while live
    sent_human: str
    received_human: str

    def cells(self) -> tuple[str, ...]:
        """The row's text, one string per Column, in Column order."""
        return (
            self.process or "?",
            str(self.pid) if self.pid else "-",
            _DIRECTION_SHORT.get(self.direction, self.direction),
            self.protocol,
            self.local,
            self.remote,
            self.verdict,
            self.rule,
            self.sent_human,
            self.received_human,
            human_duration(self.age_s),
            "live" if self.ended_ago_s is None else f"{human_duration(self.ended_ago_s)} ago",
        )

    def text(self) -> str:
        """What a filter term is matched against: every cell, the full direction, the state,
        the executable and the user."""
        extra = (
            self.direction,
            "live" if self.live else "ended",
            str(self.id),
            self.exe,
            self.user,
        )
        return " ".join((*self.cells(), *extra)).casefold()


class Totals(msgspec.Struct, frozen=True, kw_only=True):
    """Sums over a list of rows (the shown ones): counts, bytes, and rows per verdict."""

    connections: int
    live: int
    ended: int
    sent: int
    received: int
    verdicts: dict[str, int]

    def line(self) -> str:
        verdicts = "  ".join(f"{v} {n}" for v, n in self.verdicts.items()) or "no verdicts"
        return (
            f"{self.connections} connections ({self.live} live, {self.ended} ended)  "
            f"sent {human_bytes(self.sent)}  received {human_bytes(self.received)}  |  {verdicts}"
        )


class Health(msgspec.Struct, frozen=True, kw_only=True):
    """How current the snapshot is and what the policy last said about its rules."""

    taken: float
    age_s: float
    stale: bool
    rules_file: str
    rules_loaded: float
    rules_error: str
    dropped_rows: int  # rows the policy's bounded table let go early, since it started

    def line(self) -> str:
        """One status line; the stale warning first, since it makes every row doubtful."""
        parts = []
        if self.stale:
            parts.append(
                f"STALE: snapshot {human_duration(self.age_s)} old - "
                "policy not writing (is it running?)"
            )
        else:
            parts.append(f"snapshot {human_duration(self.age_s)} old")
        parts.append(f"rules {self.rules_file or '(built-in)'}")
        if self.rules_error:
            parts.append(f"last reload REFUSED: {self.rules_error}")
        if self.dropped_rows:
            parts.append(f"{self.dropped_rows} rows dropped (policy table full)")
        return "  |  ".join(parts)


class View(msgspec.Struct, frozen=True, kw_only=True):
    """Everything one screen (or one `--once`) shows."""

    health: Health
    rows: list[Row]  # filtered and sorted
    total_rows: int  # before filtering
    totals: Totals  # over `rows`


class ViewOptions(msgspec.Struct, frozen=True, kw_only=True):
    sort: Column = Column.AGE
    reverse: bool = False
    filter: str = ""
    state: StateFilter = StateFilter.ALL


DEFAULT_OPTIONS = ViewOptions()
_DIRECTION_SHORT = {"outbound": "out", "inbound": "in"}
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: int) -> str:
    """1023 B, 1.0 KiB, 12.3 MiB: binary units, three significant digits at most."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in _UNITS[1:]:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    """5s, 3m12s, 2h05m, 3d04h: two units at most, so the column stays narrow."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def to_row(conn: ConnectionRow, now: float) -> Row:
    return Row(
        id=conn.id,
        pid=conn.pid,
        process=conn.process,
        direction=conn.direction,
        protocol=conn.protocol,
        local_ip=conn.local_ip,
        local_port=conn.local_port,
        remote_ip=conn.remote_ip,
        remote_port=conn.remote_port,
        verdict=conn.verdict,
        rule=conn.rule,
        exe=conn.exe,
        user=conn.user,
        sent=conn.sent,
        received=conn.received,
        started=conn.started,
        ended=conn.ended,
        live=conn.ended is None,
        local=f"{conn.local_ip}:{conn.local_port}",
        remote=f"{conn.remote_ip}:{conn.remote_port}",
        age_s=max(0.0, now - conn.started),
        ended_ago_s=None if conn.ended is None else max(0.0, now - conn.ended),
        sent_human=human_bytes(conn.sent),
        received_human=human_bytes(conn.received),
    )


def _ip_key(text: str) -> tuple[int, bytes]:
    """Numeric address order (v4 before v6); a malformed address sorts last, never raises."""
    try:
        ip = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return (9, text.encode())
    return (ip.version, ip.packed)


def sort_key(column: Column, row: Row) -> tuple[Any, ...]:
    """Numbers as numbers, addresses numerically, text case-blind; the id breaks ties."""
    key: tuple[Any, ...]
    match column:
        case Column.PROCESS:
            key = (row.process.casefold(), row.pid)
        case Column.PID:
            key = (row.pid,)
        case Column.DIRECTION:
            key = (row.direction,)
        case Column.PROTOCOL:
            key = (row.protocol,)
        case Column.LOCAL:
            key = (_ip_key(row.local_ip), row.local_port)
        case Column.REMOTE:
            key = (_ip_key(row.remote_ip), row.remote_port)
        case Column.VERDICT:
            key = (row.verdict.casefold(),)
        case Column.RULE:
            key = (row.rule.casefold(),)
        case Column.SENT:
            key = (row.sent,)
        case Column.RECEIVED:
            key = (row.received,)
        case Column.AGE:
            # youngest first: the newest connection is what one is usually looking for
            key = (row.age_s,)
        case Column.ENDED:
            # live ones first, then the most recently ended
            key = (not row.live, row.ended_ago_s or 0.0)
    return (*key, row.id)


def matches(row: Row, terms: Sequence[str], state: StateFilter) -> bool:
    """Every term is a substring of the row's text (case-blind); `!term` must not be."""
    if state is StateFilter.LIVE and not row.live:
        return False
    if state is StateFilter.ENDED and row.live:
        return False
    text = row.text()
    for term in terms:
        if term.startswith("!") and len(term) > 1:
            if term[1:] in text:
                return False
        elif term not in text:
            return False
    return True


def filter_terms(text: str) -> list[str]:
    return text.casefold().split()


def totals(rows: Iterable[Row]) -> Totals:
    rows = list(rows)
    verdicts = Counter(r.verdict for r in rows)
    live = sum(1 for r in rows if r.live)
    return Totals(
        connections=len(rows),
        live=live,
        ended=len(rows) - live,
        sent=sum(r.sent for r in rows),
        received=sum(r.received for r in rows),
        verdicts=dict(sorted(verdicts.items(), key=lambda kv: (-kv[1], kv[0]))),
    )


def health(snapshot: Snapshot, now: float) -> Health:
    age = max(0.0, now - snapshot.taken)
    return Health(
        taken=snapshot.taken,
        age_s=age,
        stale=age > STALE_AFTER_S,
        rules_file=snapshot.rules_file,
        rules_loaded=snapshot.rules_loaded,
        rules_error=snapshot.rules_error,
        dropped_rows=snapshot.dropped_rows,
    )


def build_view(snapshot: Snapshot, now: float, options: ViewOptions = DEFAULT_OPTIONS) -> View:
    """The whole screen from one snapshot: rows filtered, sorted, and their totals."""
    all_rows = [to_row(c, now) for c in snapshot.connections]
    terms = filter_terms(options.filter)
    shown = [r for r in all_rows if matches(r, terms, options.state)]
    shown.sort(key=lambda r: sort_key(options.sort, r), reverse=options.reverse)
    return View(
        health=health(snapshot, now),
        rows=shown,
        total_rows=len(all_rows),
        totals=totals(shown),
    )


HEADERS: tuple[str, ...] = tuple(c.value for c in Column)


def plain_table(view: View) -> str:
    """The `--once` text: a status line, aligned columns, the totals line."""
    lines = [view.health.line()]
    cells = [HEADERS, *(r.cells() for r in view.rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADERS))]
    right = {Column.PID, Column.SENT, Column.RECEIVED, Column.AGE}
    for row in cells:
        lines.append(
            "  ".join(
                cell.rjust(w) if col in right else cell.ljust(w)
                for col, cell, w in zip(Column, row, widths, strict=True)
            ).rstrip()
        )
    if not view.rows:
        lines.append("(no connections)" if not view.total_rows else "(none match the filter)")
    shown = "" if len(view.rows) == view.total_rows else f" of {view.total_rows}"
    lines.append(f"shown {len(view.rows)}{shown}: {view.totals.line()}")
    return "\n".join(lines) + "\n"


def view_json(view: View, run_dir: str, snapshot_path: str) -> bytes:
    """The `--once --json` document: where it came from, health, totals, and the rows."""
    return msgspec.json.encode(
        {
            "run_dir": run_dir,
            "snapshot": snapshot_path,
            **msgspec.to_builtins(view.health),
            "total_connections": view.total_rows,
            "totals": view.totals,
            "connections": view.rows,
        }
    )


# ---- the decision log (decisions.jsonl): every verdict the policy gave, updates included ----

DECISION_HEADERS: tuple[str, ...] = (
    "time",
    "process",
    "pid",
    "dir",
    "proto",
    "local",
    "remote",
    "verdict",
    "rule",
)
_DECODER = msgspec.json.Decoder(Decision)


def parse_decisions(data: bytes, from_start: bool) -> list[Decision]:
    """The decisions in a chunk of decisions.jsonl, oldest first. A chunk taken from the
    middle of the file starts inside a line, which is dropped; a torn or foreign line is
    skipped, never an error (the policy may be appending as we read)."""
    lines = data.split(b"\n")
    if not from_start:
        lines = lines[1:]
    out = []
    for line in lines:
        if line.strip():
            try:
                out.append(_DECODER.decode(line))
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
    return out


def decision_cells(d: Decision) -> tuple[str, ...]:
    """One decision's text, in DECISION_HEADERS order (the time in this machine's zone)."""
    return (
        time.strftime("%H:%M:%S", time.localtime(d.time)),
        d.process or "?",
        str(d.pid) if d.pid else "-",
        _DIRECTION_SHORT.get(d.direction, d.direction),
        d.protocol,
        f"{d.local_ip}:{d.local_port}",
        f"{d.remote_ip}:{d.remote_port}",
        d.verdict,
        d.rule,
    )


def filter_decisions(decisions: Iterable[Decision], text: str) -> list[Decision]:
    """Newest first, those whose text holds every filter word (`!word`: does not)."""
    terms = filter_terms(text)
    out = []
    for d in decisions:
        hay = " ".join(
            (*decision_cells(d), d.direction, d.exe, d.user, str(d.id))
            + (("update",) if d.update else ())
        ).casefold()
        if all((t[1:] not in hay) if t.startswith("!") and len(t) > 1 else t in hay for t in terms):
            out.append(d)
    out.reverse()
    return out


def plain_decisions(decisions: Sequence[Decision]) -> str:
    cells = [DECISION_HEADERS, *(decision_cells(d) for d in decisions)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(DECISION_HEADERS))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    if not decisions:
        lines.append("(no decisions)")
    return "\n".join(lines) + "\n"
