"""The live screen of `kextless monitor`: a textual App, a thin view over monitor_rows.

Every `interval` it re-reads the policy's snapshot and redraws what `build_view` returns; the
keys only change the ViewOptions (sort column, order, filter, live/ended). textual draws with
plain terminal escape sequences, so it works over SSH in any xterm-like terminal.
"""

from __future__ import annotations

import contextlib
import time
from typing import ClassVar

import msgspec
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Footer, Input, Static
from textual.widgets.data_table import RowDoesNotExist

from kextless.actors.policy.view import Decision, Snapshot
from kextless.base.rundir import RuntimeDir
from kextless.deploy.monitor import SnapshotUnavailable, read_current, read_recent_decisions
from kextless.deploy.monitor_rows import (
    DECISION_HEADERS,
    Column,
    View,
    ViewOptions,
    build_view,
    decision_cells,
    filter_decisions,
)

_COLUMNS = list(Column)
#: Rows put in the table per redraw. textual's DataTable costs ~0.4 ms a row to fill, so all of
#: a full policy table (20,000) would take seconds a refresh; the totals still count every
#: matching row, and sorting or filtering brings any other row into the first MAX_DRAWN.
MAX_DRAWN = 500
_RIGHT = {Column.PID, Column.SENT, Column.RECEIVED, Column.AGE}


def _verdict_style(verdict: str) -> str:
    v = verdict.casefold()
    if "accept" in v:
        return "green"
    if "block" in v or "fail" in v or "undetermin" in v:
        return "red"
    if "drop" in v:
        return "yellow"
    if "redirect" in v:
        return "cyan"
    return ""


class MonitorApp(App[None]):
    """Connections table, a status line above it, a filter input and the totals below."""

    TITLE = "kextless monitor"
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    #health { height: 1; padding: 0 1; }
    #health.bad { background: $error; color: $text; }
    #table { height: 1fr; }
    #filter { height: 3; }
    #totals { height: 1; padding: 0 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "quit"),
        Binding("ctrl+c", "quit", "quit", show=False, priority=True),
        Binding("s", "sort(1)", "sort column"),
        Binding("S", "sort(-1)", "sort back", show=False),
        Binding("r", "reverse", "reverse"),
        Binding("slash", "filter", "filter"),
        Binding("l", "state", "live/ended/all"),
        Binding("d", "decisions", "connections/decisions"),
        Binding("escape", "leave_filter", "done", show=False),
    ]

    def __init__(
        self,
        run: RuntimeDir,
        options: ViewOptions,
        interval: float = 1.0,
        decisions: bool = False,
    ) -> None:
        super().__init__()
        self.run_dir = run
        self.options = options
        self.interval = interval
        #: Showing the decision log instead of the connections (key d).
        self.show_decisions = decisions
        self.snapshot: Snapshot | None = None
        self.decisions: list[Decision] = []
        self.problem = ""

    def compose(self) -> ComposeResult:
        yield Static("reading the snapshot...", id="health")
        yield DataTable(id="table", cursor_type="row", zebra_stripes=True)
        yield Input(
            value=self.options.filter,
            placeholder="/ filter: words every row must contain, !word to exclude "
            "(Enter or Esc: back to the table)",
            id="filter",
        )
        yield Static("", id="totals")
        yield Footer()

    def on_mount(self) -> None:
        self.reload()
        self.set_interval(self.interval, self.reload)
        self.query_one(DataTable).focus()

    # ---- data ---------------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the snapshot; an unreadable one leaves a message, never a traceback."""
        try:
            self.snapshot = read_current(self.run_dir)
            self.problem = ""
        except SnapshotUnavailable as exc:
            self.snapshot = None
            self.problem = str(exc)
        if self.show_decisions:
            try:
                self.decisions = read_recent_decisions(self.run_dir)
            except SnapshotUnavailable as exc:
                self.decisions = []
                self.problem = self.problem or str(exc)
        self.redraw()

    def redraw(self) -> None:
        health = self.query_one("#health", Static)
        totals = self.query_one("#totals", Static)
        table: DataTable[Text] = self.query_one(DataTable)
        if self.show_decisions:
            self._fill_decisions(table, totals)
            if self.snapshot is None:
                health.update(self.problem)
                health.set_class(True, "bad")
            else:
                h = build_view(self.snapshot, time.time(), self.options).health
                health.update(h.line())
                health.set_class(h.stale or bool(h.rules_error), "bad")
            return
        if self.snapshot is None:
            health.update(self.problem)
            health.set_class(True, "bad")
            self._fill(table, None)
            totals.update(f"state {self.options.state.value}  sort {self._sort_label()}")
            return
        view = build_view(self.snapshot, time.time(), self.options)
        health.update(view.health.line())
        health.set_class(view.health.stale or bool(view.health.rules_error), "bad")
        self._fill(table, view)
        shown = "" if len(view.rows) == view.total_rows else f" of {view.total_rows}"
        if len(view.rows) > MAX_DRAWN:
            shown += f" (first {MAX_DRAWN} listed: sort or filter for the rest)"
        totals.update(
            f"shown {len(view.rows)}{shown} [{self.options.state.value}, "
            f"sort {self._sort_label()}]: {view.totals.line()}"
        )

    def _sort_label(self) -> str:
        return f"{self.options.sort.value} {'desc' if self.options.reverse else 'asc'}"

    def _fill(self, table: DataTable[Text], view: View | None) -> None:
        """Redraw every row, keeping the cursor on the same connection when it is still shown."""
        keep = None
        if table.row_count and 0 <= table.cursor_row < table.row_count:
            keep = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        table.clear(columns=True)
        for col in _COLUMNS:
            label = col.value
            if col is self.options.sort:
                label += " v" if self.options.reverse else " ^"
            table.add_column(
                Text(label, justify="right" if col in _RIGHT else "left"), key=col.value
            )
        if view is None:
            return
        for row in view.rows[:MAX_DRAWN]:
            cells = []
            for col, cell in zip(_COLUMNS, row.cells(), strict=True):
                style = _verdict_style(cell) if col is Column.VERDICT else ""
                if col is Column.ENDED and not row.live:
                    style = "dim"
                cells.append(Text(cell, style=style, justify="right" if col in _RIGHT else "left"))
            table.add_row(*cells, key=str(row.id))
        if keep is not None:
            with contextlib.suppress(RowDoesNotExist):  # that connection is no longer shown
                table.move_cursor(row=table.get_row_index(keep), animate=False)

    def _fill_decisions(self, table: DataTable[Text], totals: Static) -> None:
        """The decision log, newest first; the cursor stays on the same line when it can."""
        keep = None
        if table.row_count and 0 <= table.cursor_row < table.row_count:
            keep = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        table.clear(columns=True)
        for name in DECISION_HEADERS:
            table.add_column(name, key=name)
        shown = filter_decisions(self.decisions, self.options.filter)
        verdict_at = DECISION_HEADERS.index("verdict")
        seen: set[str] = set()
        for i, d in enumerate(shown[:MAX_DRAWN]):
            cells = [Text(c) for c in decision_cells(d)]
            cells[verdict_at].stylize(_verdict_style(d.verdict))
            if d.update:
                cells[-1].stylize("bold")
            # a connection has a first decision and maybe updates: the id alone repeats
            key = f"{d.id}:{d.time}:{d.verdict}"
            if key in seen:
                key = f"{key}:{i}"
            seen.add(key)
            table.add_row(*cells, key=key)
        if keep is not None:
            with contextlib.suppress(RowDoesNotExist):
                table.move_cursor(row=table.get_row_index(keep), animate=False)
        counts: dict[str, int] = {}
        for d in shown:
            counts[d.verdict] = counts.get(d.verdict, 0) + 1
        updates = sum(1 for d in shown if d.update)
        listed = f" (first {MAX_DRAWN} listed)" if len(shown) > MAX_DRAWN else ""
        verdicts = "  ".join(f"{v} {n}" for v, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        totals.update(
            f"decision log, newest first: {len(shown)} of the last {len(self.decisions)}"
            f"{listed}, {updates} reload update(s)  |  {verdicts or 'no decisions'}"
        )

    # ---- keys ---------------------------------------------------------------------------

    def _set(self, **changes: object) -> None:
        self.options = msgspec.structs.replace(self.options, **changes)
        self.redraw()

    def action_sort(self, step: int) -> None:
        i = _COLUMNS.index(self.options.sort)
        self._set(sort=_COLUMNS[(i + step) % len(_COLUMNS)])

    def action_reverse(self) -> None:
        self._set(reverse=not self.options.reverse)

    def action_state(self) -> None:
        self._set(state=self.options.state.next())

    def action_decisions(self) -> None:
        self.show_decisions = not self.show_decisions
        self.reload()

    def action_filter(self) -> None:
        self.query_one("#filter", Input).focus()

    def action_leave_filter(self) -> None:
        self.query_one(DataTable).focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        self._set(filter=event.value)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.query_one(DataTable).focus()

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        """A click on a header sorts by it; a second click reverses."""
        col = Column(event.column_key.value)
        if col is self.options.sort:
            self._set(reverse=not self.options.reverse)
        else:
            self._set(sort=col, reverse=False)
