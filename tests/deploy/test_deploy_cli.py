"""`kextless up|down|status` as a command line: one clear line and exit status 2 for bad input,
the status text, and a dispatcher that imports only what the command needs (no root needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kextless.deploy import cli
from kextless.deploy.status import format_status
from tests.entry import KEXTLESS


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--netns", "../etc"], "not a valid namespace name"),
        (["--netns", "klt-surely-missing-ns-4711"], "no such network namespace"),
        (["--no-policy", "--endpoint", "tcp://127.0.0.1:7000"], "needs CURVE"),
        (
            [
                "--endpoint",
                "tcp://127.0.0.1:7000",
                "--curve-server-secret",
                "/etc/hostname",
                "--curve-clients",
                "/tmp",
            ],
            "--no-policy",
        ),
        (["--endpoint", "udp://1.2.3.4:5"], "only ipc"),
        (["--curve-clients", "/tmp"], "only apply to a tcp"),
        (
            [
                "--no-policy",
                "--endpoint",
                "tcp://127.0.0.1:7000",
                "--curve-server-secret",
                "/no/k",
                "--curve-clients",
                "/tmp",
            ],
            "no such file",
        ),
        (["--no-policy", "--policy-rules", "/etc/hostname"], "--no-policy"),
        (["--policy-rules", "/nonexistent.toml"], "no such file"),
        (["--timeout", "0"], "positive"),
        (["--verdict-timeout", "-1"], "verdict-timeout"),
        (["--default-verdict", "Maybe"], "PermanentAccept"),
        (["--no-policy", "--actor-arg", "policy=--x"], "no such actor"),
        (["--actor-arg", "capture"], "ACTOR=ARG"),
    ],
)
def test_up_refuses_bad_input_with_one_clear_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["up", *argv, "--run-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert "kextless up: error: " in err and message in err.splitlines()[-1]
    assert not (tmp_path / "host").exists() and not any(tmp_path.iterdir())


def test_unknown_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["down", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_down_and_status_with_nothing_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["down", "--run-root", str(tmp_path)]) == 0
    assert "not running" in capsys.readouterr().out
    assert cli.main(["status", "--run-root", str(tmp_path), "--json"]) == 3
    report = json.loads(capsys.readouterr().out)
    assert report["running"] is False and report["programs"] == []


def test_status_text_flattens_broker_counters() -> None:
    report = {
        "netns": "n1",
        "run_dir": "/r",
        "running": True,
        "endpoint": "ipc:///r/kext.sock",
        "programs": [
            {"name": "broker", "state": "RUNNING", "pid": 42, "uptime_s": 3725, "description": ""},
            {"name": "ale", "state": "BACKOFF", "pid": None, "uptime_s": None, "description": ""},
        ],
        "broker": {"pid": 42, "queue": {"depth": 3, "bytes": 10}, "actors": {}},
        "broker_error": None,
    }
    text = format_status(report).splitlines()
    assert text[1].split() == ["broker", "RUNNING", "pid", "42", "uptime", "1:02:05"]
    assert text[2].split() == ["ale", "BACKOFF", "-"]
    assert "  queue.depth: 3" in text and "  queue.bytes: 10" in text and "  actors: {}" in text
    report["broker"], report["broker_error"] = None, "no answer"
    assert format_status(report).splitlines()[-1] == "broker: DOWN (no answer)"


def test_help_of_each_command_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("up", "down", "status"):
        assert cli.main([name, "--help"]) == 0
        assert f"usage: kextless {name}" in capsys.readouterr().out
    assert cli.main(["status", "--netns", "bad/name"]) == 2
    assert "not a valid namespace name" in capsys.readouterr().err


def test_the_dispatcher_imports_a_command_only_when_it_runs() -> None:
    # `kextless decode` and every actor start through cli.py: they must not pay for
    # supervisor, zmq or the deploy machinery, and `status` not for `up`.
    code = """
import sys
from kextless.deploy import cli
heavy = ("supervisor", "zmq", "msgspec", "kextless.deploy.up", "kextless.deploy.status")
loaded = lambda: sorted(m for m in sys.modules if m.split(".")[0] in heavy[:3] or m in heavy)
assert loaded() == [], loaded()
assert cli.main(["status", "--run-root", sys.argv[1]]) == 3
assert "kextless.deploy.status" in sys.modules and "kextless.deploy.up" not in sys.modules
"""
    r = subprocess.run(
        [sys.executable, "-c", code, "/nonexistent-klt-run-root"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "not running" in r.stdout


def test_the_installed_command_reports_usage_errors(tmp_path: Path) -> None:
    r = subprocess.run(
        [*KEXTLESS, "up", "--run-root", str(tmp_path), "--timeout", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == "kextless up: error: --timeout must be positive"
    assert cli.main(["bogus"]) == 2
