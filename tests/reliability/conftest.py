"""The fault table: every reliability test records one row (fault -> what happened -> time until
whole -> what was lost); the session ends by printing the table and writing it as JSON to
$KEXTLESS_RELIABILITY_JSON (default /tmp/kextless-reliability.json) for the README."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

JSON_ENV = "KEXTLESS_RELIABILITY_JSON"
DEFAULT_JSON = "/tmp/kextless-reliability.json"

ROWS: list[dict[str, Any]] = []


class Recorder:
    """Handed to a test: `record(fault, happened, whole_s, lost, details)` adds its row; the
    row's verdict (pass / xfail / FAIL) is filled in from the test's outcome."""

    def __init__(self, nodeid: str) -> None:
        self.nodeid = nodeid

    def __call__(
        self,
        fault: str,
        happened: str,
        whole_s: float | None,
        lost: str,
        details: dict[str, Any] | None = None,
    ) -> None:
        ROWS.append(
            {
                "test": self.nodeid,
                "fault": fault,
                "happened": happened,
                "whole_s": whole_s,
                "lost": lost,
                "details": details or {},
                "outcome": "?",
            }
        )


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Recorder:
    return Recorder(request.node.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    rep = outcome.get_result()
    if rep.when != "call":
        return
    verdict = "xfail" if hasattr(rep, "wasxfail") and rep.skipped else rep.outcome
    if hasattr(rep, "wasxfail") and rep.passed:
        verdict = "XPASS"
    for row in ROWS:
        if row["test"] == item.nodeid and row["outcome"] == "?":
            row["outcome"] = {"passed": "ok", "failed": "FAIL"}.get(verdict, verdict)


def _fmt_whole(w: float | None) -> str:
    return "never" if w is None else f"{w:.2f} s"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not ROWS:
        return
    tr = terminalreporter
    tr.section("kextless fault table (issue 12)")
    head = ("fault", "outcome", "what happened", "until whole", "what was lost")
    rows = [
        (r["fault"], r["outcome"], r["happened"], _fmt_whole(r["whole_s"]), r["lost"]) for r in ROWS
    ]
    tr.write_line("| " + " | ".join(head) + " |")
    tr.write_line("|" + "---|" * len(head))
    for row in rows:
        tr.write_line("| " + " | ".join(row) + " |")
    path = Path(os.environ.get(JSON_ENV, DEFAULT_JSON))
    try:
        path.write_text(
            json.dumps(
                {"written": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "rows": ROWS},
                indent=1,
                default=str,
            )
        )
        tr.write_line(f"(also written to {path}; set {JSON_ENV} to change)")
    except OSError as e:
        tr.write_line(f"could not write {path}: {e}")
