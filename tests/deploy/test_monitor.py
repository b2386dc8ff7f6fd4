"""`kextless monitor`'s data side (rows, sort, filter, totals, health) from Snapshots built
here, and `--once [--json]` against a snapshot file written with view.write_snapshot in a temp
run dir (no root, no running system; test_monitor_system.py reads a real one)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from kextless.actors.policy.view import (
    DECISIONS_FILE,
    SNAPSHOT_FILE,
    ConnectionRow,
    Decision,
    Snapshot,
    write_snapshot,
)
from kextless.base.rundir import RuntimeDir
from kextless.deploy.monitor_rows import (
    DECISION_HEADERS,
    STALE_AFTER_S,
    Column,
    StateFilter,
    ViewOptions,
    build_view,
    decision_cells,
    filter_decisions,
    human_bytes,
    human_duration,
    parse_decisions,
    plain_decisions,
    plain_table,
)

NOW = 1_800_000_000.0
MONITOR = [sys.executable, "-m", "kextless.deploy.monitor"]


def conn(id: int, **over: object) -> ConnectionRow:
    fields: dict[str, object] = {
        "id": id,
        "pid": 100 + id,
        "process": f"proc{id}",
        "direction": "outbound",
        "protocol": "tcp",
        "local_ip": "10.0.0.1",
        "local_port": 40000 + id,
        "remote_ip": "10.0.0.2",
        "remote_port": 80,
        "verdict": "PermanentAccept",
        "rule": "default",
        "started": NOW - 10 * id,
    }
    return ConnectionRow(**(fields | over))  # type: ignore[arg-type]


def snap(*conns: ConnectionRow, taken: float = NOW, **over: object) -> Snapshot:
    fields: dict[str, object] = {
        "taken": taken,
        "rules_file": "/etc/kextless/rules.toml",
        "rules_loaded": NOW - 60,
        "connections": list(conns),
    }
    return Snapshot(**(fields | over))  # type: ignore[arg-type]


SAMPLE = snap(
    conn(1, process="curl", sent=1500, received=2_500_000, rule="rule 1 (line 4)"),
    conn(
        2,
        process="Dig",
        direction="inbound",
        protocol="udp",
        local_ip="[fd00::1]",
        local_port=53,
        remote_ip="[fd00::2]",
        remote_port=5353,
        verdict="PermanentBlock",
        ended=NOW - 3,
    ),
    conn(3, process="ssh", remote_ip="9.9.9.9", remote_port=22, verdict="Drop", sent=10),
    conn(4, pid=0, process="", remote_ip="10.0.0.10", verdict="PermanentBlock", ended=NOW - 30),
)


def ids(options: ViewOptions, snapshot: Snapshot = SAMPLE) -> list[int]:
    return [r.id for r in build_view(snapshot, NOW, options).rows]


# ---- units --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (2_500_000, "2.4 MiB"),
        (150 * 1024**2, "150 MiB"),
        (5 * 1024**3, "5.0 GiB"),
        (3 * 1024**6, "3072 PiB"),
    ],
)
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text


@pytest.mark.parametrize(
    ("s", "text"),
    [(-1, "0s"), (0.9, "0s"), (59, "59s"), (61, "1m01s"), (3723, "1h02m"), (90000, "1d01h")],
)
def test_human_duration(s: float, text: str) -> None:
    assert human_duration(s) == text


# ---- rows ---------------------------------------------------------------------------------------


def test_rows_carry_the_snapshot_fields_and_the_computed_ones() -> None:
    rows = {r.id: r for r in build_view(SAMPLE, NOW).rows}
    curl = rows[1]
    assert (curl.live, curl.local, curl.remote) == (True, "10.0.0.1:40001", "10.0.0.2:80")
    assert (curl.age_s, curl.ended_ago_s) == (10.0, None)
    assert (curl.sent_human, curl.received_human) == ("1.5 KiB", "2.4 MiB")
    assert curl.cells() == (
        "curl",
        "101",
        "out",
        "tcp",
        "10.0.0.1:40001",
        "10.0.0.2:80",
        "PermanentAccept",
        "rule 1 (line 4)",
        "1.5 KiB",
        "2.4 MiB",
        "10s",
        "live",
    )
    dig = rows[2]
    assert (dig.live, dig.local, dig.remote) == (False, "[fd00::1]:53", "[fd00::2]:5353")
    assert dig.ended_ago_s == 3.0
    assert dig.cells()[2] == "in" and dig.cells()[-1] == "3s ago"
    unknown = rows[4]
    assert unknown.cells()[:2] == ("?", "-")


def test_a_clock_behind_the_snapshot_gives_no_negative_ages() -> None:
    row = build_view(snap(conn(1, started=NOW + 5)), NOW).rows[0]
    assert row.age_s == 0.0


# ---- sort ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("column", "order"),
    [
        (Column.AGE, [1, 2, 3, 4]),  # youngest first
        (Column.PROCESS, [4, 1, 2, 3]),  # "" < curl < Dig (case-blind) < ssh
        (Column.PID, [4, 1, 2, 3]),
        (Column.DIRECTION, [2, 1, 3, 4]),
        (Column.PROTOCOL, [1, 3, 4, 2]),
        (Column.LOCAL, [1, 3, 4, 2]),  # v4 by port, then v6
        (Column.REMOTE, [3, 1, 4, 2]),  # 9.9.9.9 < 10.0.0.2 < 10.0.0.10 (numeric) < v6
        (Column.VERDICT, [3, 1, 2, 4]),
        (Column.RULE, [2, 3, 4, 1]),
        (Column.SENT, [2, 4, 3, 1]),
        (Column.RECEIVED, [2, 3, 4, 1]),
        (Column.ENDED, [1, 3, 2, 4]),  # live first, then the most recently ended
    ],
)
def test_sort_by_each_column_and_reversed(column: Column, order: list[int]) -> None:
    assert ids(ViewOptions(sort=column)) == order
    assert ids(ViewOptions(sort=column, reverse=True)) == order[::-1]


def test_a_malformed_address_sorts_last_instead_of_raising() -> None:
    s = snap(conn(1, remote_ip="not-an-ip"), conn(2, remote_ip="[::1]"), conn(3))
    assert ids(ViewOptions(sort=Column.REMOTE), s) == [3, 2, 1]


# ---- filter -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("", [1, 2, 3, 4]),
        ("CURL", [1]),  # case-blind
        ("dig", [2]),
        ("fd00::2", [2]),
        (":22", [3]),  # substring of a remote "9.9.9.9:22"
        ("block", [2, 4]),
        ("block inbound", [2]),  # every word must match
        ("block !udp", [4]),  # !word must not
        ("ended", [2, 4]),  # the state is part of the row's text
        ("live tcp", [1, 3]),
        ("rule 1", [1]),
        ("nothing-like-this", []),
    ],
)
def test_filter_words(text: str, expect: list[int]) -> None:
    assert ids(ViewOptions(filter=text)) == expect


@pytest.mark.parametrize(
    ("state", "expect"),
    [(StateFilter.ALL, [1, 2, 3, 4]), (StateFilter.LIVE, [1, 3]), (StateFilter.ENDED, [2, 4])],
)
def test_state_filter(state: StateFilter, expect: list[int]) -> None:
    assert ids(ViewOptions(state=state)) == expect


def test_state_cycles_all_live_ended() -> None:
    assert StateFilter.ALL.next() is StateFilter.LIVE
    assert StateFilter.LIVE.next() is StateFilter.ENDED
    assert StateFilter.ENDED.next() is StateFilter.ALL


# ---- totals and health --------------------------------------------------------------------------


def test_totals_over_the_shown_rows() -> None:
    view = build_view(SAMPLE, NOW)
    t = view.totals
    assert (t.connections, t.live, t.ended) == (4, 2, 2)
    assert (t.sent, t.received) == (1510, 2_500_000)
    assert t.verdicts == {"PermanentBlock": 2, "Drop": 1, "PermanentAccept": 1}
    assert list(t.verdicts) == ["PermanentBlock", "Drop", "PermanentAccept"]  # most first
    only = build_view(SAMPLE, NOW, ViewOptions(filter="block"))
    assert (only.total_rows, only.totals.connections) == (4, 2)
    assert only.totals.verdicts == {"PermanentBlock": 2}


def test_an_empty_snapshot_has_zero_totals() -> None:
    view = build_view(snap(), NOW)
    assert view.rows == [] and view.totals.connections == 0 and view.totals.verdicts == {}
    assert "(no connections)" in plain_table(view)


def test_health_says_when_the_policy_stopped_writing() -> None:
    fresh = build_view(snap(taken=NOW - STALE_AFTER_S), NOW).health
    assert not fresh.stale and "STALE" not in fresh.line()
    old = build_view(snap(taken=NOW - STALE_AFTER_S - 0.5), NOW).health
    assert old.stale
    assert "policy not writing (is it running?)" in old.line()


def test_health_shows_a_refused_reload() -> None:
    h = build_view(snap(rules_error="line 3: unknown verdict 'Allow'"), NOW).health
    assert "REFUSED: line 3: unknown verdict 'Allow'" in h.line()


def test_health_counts_rows_the_policy_dropped() -> None:
    assert "rows dropped" not in build_view(snap(), NOW).health.line()
    h = build_view(snap(dropped_rows=12), NOW).health
    assert h.dropped_rows == 12 and "12 rows dropped (policy table full)" in h.line()


def test_the_filter_also_matches_executable_and_user() -> None:
    s = snap(conn(1, exe="/usr/bin/curl", user="alice"), conn(2, exe="/usr/bin/wget", user="bob"))
    assert ids(ViewOptions(filter="/usr/bin/curl"), s) == [1]
    assert ids(ViewOptions(filter="bob"), s) == [2]
    assert build_view(s, NOW).rows[0].exe == "/usr/bin/curl"


def test_plain_table_aligns_columns_and_ends_with_totals() -> None:
    text = plain_table(build_view(SAMPLE, NOW))
    lines = text.splitlines()
    assert lines[1].split() == [c.value for c in Column]
    assert lines[-1].startswith("shown 4: 4 connections (2 live, 2 ended)")
    starts = {line.index("10.0.0.") for line in lines[2:6] if "10.0.0." in line}
    assert len(starts) == 1  # the local column starts at the same place on every row
    filtered = plain_table(build_view(SAMPLE, NOW, ViewOptions(filter="zzz")))
    assert "(none match the filter)" in filtered and "shown 0 of 4" in filtered


# ---- --once against a snapshot file -------------------------------------------------------------


def monitor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MONITOR, *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def run_root(tmp_path: Path) -> Path:
    run = RuntimeDir.for_instance("kxp3-demo", tmp_path).create()
    now = time.time()
    conns = [conn(i, started=now - 10 * i, ended=now - 1 if i == 2 else None) for i in (1, 2)]
    write_snapshot(run.path / SNAPSHOT_FILE, snap(*conns, taken=now))
    return tmp_path


def test_once_json_prints_rows_and_totals(run_root: Path) -> None:
    res = monitor("--netns", "kxp3-demo", "--run-root", str(run_root), "--once", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["run_dir"] == str(run_root / "netns-kxp3-demo")
    assert doc["stale"] is False and doc["total_connections"] == 2
    assert doc["totals"] == {
        "connections": 2,
        "live": 1,
        "ended": 1,
        "sent": 0,
        "received": 0,
        "verdicts": {"PermanentAccept": 2},
    }
    first = doc["connections"][0]
    assert (first["id"], first["process"], first["live"]) == (1, "proc1", True)
    assert first["remote"] == "10.0.0.2:80" and first["sent_human"] == "0 B"
    assert 9 < first["age_s"] < 20
    assert doc["connections"][1]["live"] is False


def test_once_json_applies_sort_filter_and_state(run_root: Path) -> None:
    base = ["--netns", "kxp3-demo", "--run-root", str(run_root), "--once", "--json"]
    by_age_desc = json.loads(monitor(*base, "--sort", "age", "--reverse").stdout)
    assert [c["id"] for c in by_age_desc["connections"]] == [2, 1]
    ended = json.loads(monitor(*base, "--state", "ended").stdout)
    assert [c["id"] for c in ended["connections"]] == [2]
    assert ended["totals"]["connections"] == 1 and ended["total_connections"] == 2
    found = json.loads(monitor(*base, "--filter", "proc1").stdout)
    assert [c["id"] for c in found["connections"]] == [1]


def test_once_plain_table(run_root: Path) -> None:
    res = monitor("--netns", "kxp3-demo", "--run-root", str(run_root), "--once")
    assert res.returncode == 0, res.stderr
    assert "proc1" in res.stdout and "proc2" in res.stdout
    assert "shown 2: 2 connections (1 live, 1 ended)" in res.stdout


def test_once_reads_the_instance_from_the_config_file(run_root: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "kextless.toml"
    cfg.write_text(f'[instance]\nnetns = "kxp3-demo"\nrun_root = "{run_root}"\n')
    res = monitor("--config", str(cfg), "--once", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["total_connections"] == 2


def test_a_stale_snapshot_is_shown_with_a_warning(tmp_path: Path) -> None:
    run = RuntimeDir.for_instance("kxp3-old", tmp_path).create()
    write_snapshot(run.path / SNAPSHOT_FILE, snap(conn(1), taken=time.time() - 60))
    res = monitor("--netns", "kxp3-old", "--run-root", str(tmp_path), "--once", "--json")
    assert res.returncode == 0
    assert json.loads(res.stdout)["stale"] is True
    assert "policy not writing (is it running?)" in res.stderr


def test_no_snapshot_exits_1_with_a_message(tmp_path: Path) -> None:
    res = monitor("--netns", "kxp3-none", "--run-root", str(tmp_path), "--once", "--json")
    assert (res.returncode, res.stdout) == (1, "")
    assert "no kextless instance at" in res.stderr and "Traceback" not in res.stderr
    RuntimeDir.for_instance("kxp3-none", tmp_path).create()
    res = monitor("--netns", "kxp3-none", "--run-root", str(tmp_path), "--once", "--json")
    assert res.returncode == 1
    assert "no snapshot at" in res.stderr and "--no-policy" in res.stderr


def test_a_corrupt_snapshot_exits_1_with_a_message(tmp_path: Path) -> None:
    run = RuntimeDir.for_instance("kxp3-bad", tmp_path).create()
    (run.path / SNAPSHOT_FILE).write_text('{"taken": "yesterday"}')
    res = monitor("--netns", "kxp3-bad", "--run-root", str(tmp_path), "--once")
    assert res.returncode == 1
    assert "is not a policy snapshot" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--json"], "--json needs --once"),
        (["--once", "--netns", "bad/name"], "not a valid namespace name"),
        (["--once", "--interval", "0"], "--interval 0"),
        (["--once", "--sort", "colour"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    res = monitor("--run-root", str(tmp_path), *args)
    assert res.returncode == 2 and message in res.stderr, res.stderr


def test_a_bad_config_file_exits_2_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "kextless.toml"
    cfg.write_text("[instance]\nnetns = 5\n")
    res = monitor("--config", str(cfg), "--once")
    assert res.returncode == 2 and "instance.netns" in res.stderr, res.stderr


def test_the_live_view_without_a_terminal_says_so(run_root: Path) -> None:
    res = monitor("--netns", "kxp3-demo", "--run-root", str(run_root))
    assert res.returncode == 1 and "needs a terminal" in res.stderr


def test_the_live_view_without_textual_says_what_to_install(
    run_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kextless.deploy import monitor

    monkeypatch.setitem(sys.modules, "textual", None)  # import textual -> ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "kextless.deploy.monitor_app", raising=False)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert monitor.monitor_main(["--netns", "kxp3-demo", "--run-root", str(run_root)]) == 1
    err = capsys.readouterr().err
    assert "needs the textual package" in err and "--once" in err


# ---- the decision log ---------------------------------------------------------------------------


def decision(id: int, **over: object) -> Decision:
    fields: dict[str, object] = {
        "time": NOW + id,
        "id": id,
        "pid": 200 + id,
        "process": f"app{id}",
        "exe": f"/usr/bin/app{id}",
        "user": "alice",
        "direction": "outbound",
        "protocol": "tcp",
        "local_ip": "10.0.0.1",
        "local_port": 50000 + id,
        "remote_ip": "[fd00::9]",
        "remote_port": 443,
        "rule": "default",
        "verdict": "PermanentAccept",
    }
    return Decision(**(fields | over))  # type: ignore[arg-type]


def jsonl(*ds: Decision) -> bytes:
    return b"".join(msgspec.json.encode(d) + b"\n" for d in ds)


def test_parse_decisions_skips_a_partial_first_line_and_torn_lines() -> None:
    data = jsonl(decision(1), decision(2), decision(3))
    assert [d.id for d in parse_decisions(data, from_start=True)] == [1, 2, 3]
    assert [d.id for d in parse_decisions(data[5:], from_start=False)] == [2, 3]
    torn = data + b'{"time": 1, "id"'  # the policy is mid-append
    assert [d.id for d in parse_decisions(torn, from_start=True)] == [1, 2, 3]
    assert parse_decisions(b"not json\n\n", from_start=True) == []


def test_decisions_newest_first_filtered_with_their_cells() -> None:
    ds = [
        decision(1),
        decision(2, verdict="PermanentBlock", rule="rule 2 (line 9)", user="bob"),
        decision(1, time=NOW + 5, verdict="PermanentBlock", rule="update rule 2", update=True),
    ]
    assert [(d.id, d.update) for d in filter_decisions(ds, "")] == [
        (1, True),
        (2, False),
        (1, False),
    ]
    assert [d.id for d in filter_decisions(ds, "update")] == [1]
    assert [d.id for d in filter_decisions(ds, "bob")] == [2]
    assert [d.id for d in filter_decisions(ds, "block !update")] == [2]
    cells = decision_cells(ds[0])
    assert cells[0] == time.strftime("%H:%M:%S", time.localtime(NOW + 1))
    assert cells[1:] == (
        "app1",
        "201",
        "out",
        "tcp",
        "10.0.0.1:50001",
        "[fd00::9]:443",
        "PermanentAccept",
        "default",
    )
    assert len(cells) == len(DECISION_HEADERS)
    assert "(no decisions)" in plain_decisions([])


def test_once_decisions_reads_the_end_of_the_log(run_root: Path) -> None:
    run = RuntimeDir.for_instance("kxp3-demo", run_root)
    run.log_dir.mkdir()
    (run.log_dir / DECISIONS_FILE).write_bytes(
        jsonl(*(decision(i) for i in range(1, 6)), decision(6, verdict="Drop"))
    )
    base = ["--netns", "kxp3-demo", "--run-root", str(run_root), "--once", "--decisions"]
    res = monitor(*base, "--json")
    assert res.returncode == 0, res.stderr
    assert [d["id"] for d in json.loads(res.stdout)] == [6, 5, 4, 3, 2, 1]
    assert [d["id"] for d in json.loads(monitor(*base, "--json", "--filter", "drop").stdout)] == [6]
    text = monitor(*base).stdout
    assert text.splitlines()[0].split() == list(DECISION_HEADERS) and "app6" in text


def test_recent_decisions_reads_only_the_tail(tmp_path: Path) -> None:
    from kextless.deploy.monitor import read_recent_decisions

    run = RuntimeDir.for_instance("kxp3-tail", tmp_path).create()
    assert read_recent_decisions(run) == []  # no log yet: nothing, not an error
    run.log_dir.mkdir()
    data = jsonl(*(decision(i) for i in range(1, 101)))
    (run.log_dir / DECISIONS_FILE).write_bytes(data)
    tail = read_recent_decisions(run, max_bytes=len(data) // 10)
    assert 5 <= len(tail) <= 10 and tail[-1].id == 100
    assert [d.id for d in tail] == list(range(101 - len(tail), 101))


def test_once_decisions_without_an_instance_exits_1(tmp_path: Path) -> None:
    res = monitor("--netns", "kxp3-none", "--run-root", str(tmp_path), "--once", "--decisions")
    assert res.returncode == 1 and "no kextless instance at" in res.stderr
