"""The instance file: what `up` records for `status` and `down`, typed, and a broken or foreign
file counting as none (so it never crashes `down`, which must always be able to clean up)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kextless.base.rundir import RuntimeDir
from kextless.deploy import cli
from kextless.deploy.down import down
from kextless.deploy.instance import (
    INSTANCE_FILE,
    Instance,
    ProgramRecord,
    read_instance,
    write_instance,
)


def _instance(run: RuntimeDir) -> Instance:
    return Instance(
        netns="n1",
        run_dir=str(run.path),
        endpoint="tcp://*:7717",
        connect="tcp://127.0.0.1:7717",
        curve_server_secret="/keys/server.key_secret",
        programs={
            "broker": ProgramRecord(argv=["kextless", "run", "broker"], priority=100, pid=41),
            "ale": ProgramRecord(argv=["kextless", "run", "ale"], priority=200),
        },
        supervisord_pid=40,
        started=1700000000.5,
    )


def test_round_trip_keeps_start_order_and_is_owner_only(tmp_path: Path) -> None:
    run = RuntimeDir(tmp_path).create()
    write_instance(run, _instance(run))
    path = tmp_path / INSTANCE_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / (INSTANCE_FILE + ".tmp")).exists()
    back = read_instance(run)
    assert back == _instance(run)
    assert back is not None and list(back.programs) == ["broker", "ale"]
    assert back.client_url == "tcp://127.0.0.1:7717"
    # Plain JSON with the field names the file always had, readable by anyone's tools.
    data = json.loads(path.read_text())
    broker = {"argv": ["kextless", "run", "broker"], "priority": 100, "pid": 41}
    assert data["programs"]["broker"] == broker


def test_a_file_written_by_the_untyped_version_still_reads(tmp_path: Path) -> None:
    # An instance started before the file was typed must still be found by `down`.
    run = RuntimeDir(tmp_path)
    old = {
        "netns": None,
        "run_dir": str(tmp_path),
        "endpoint": f"ipc://{tmp_path}/kext.sock",
        "connect": f"ipc://{tmp_path}/kext.sock",
        "curve_server_secret": None,
        "programs": {"broker": {"argv": ["k", "run", "broker"], "priority": 100, "pid": 0}},
        "supervisord_pid": 0,
        "started": 1700000000,
    }
    (tmp_path / INSTANCE_FILE).write_text(json.dumps(old, indent=2))
    inst = read_instance(run)
    assert inst is not None
    assert inst.programs["broker"] == ProgramRecord(argv=["k", "run", "broker"], priority=100)
    assert inst.started == 1700000000.0


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{not json",
        "[1, 2]",
        '{"netns": null}',  # fields missing
        '{"netns": 3, "run_dir": "/r", "endpoint": "ipc:///r/k"}',  # wrong type
        '{"netns": null, "run_dir": "/r", "endpoint": "e", "programs": {"b": {"argv": "x"}}}',
    ],
)
def test_a_broken_or_foreign_file_counts_as_none_and_down_cleans_it_up(
    text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = RuntimeDir.for_instance(None, tmp_path).create()
    (run.path / INSTANCE_FILE).write_text(text)
    assert read_instance(run) is None
    assert cli.main(["status", "--run-root", str(tmp_path)]) == 3
    assert "not running" in capsys.readouterr().out
    report = down(None, tmp_path, out=lambda _line: None)
    assert report.problems == [] and not report.was_running
    assert not (run.path / INSTANCE_FILE).exists()


def test_no_file_is_none(tmp_path: Path) -> None:
    assert read_instance(RuntimeDir(tmp_path / "missing")) is None
