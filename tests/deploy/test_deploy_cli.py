"""`kextless up|down|status` as a command line: one clear line and exit status 2 for bad input,
the status text, and a dispatcher that imports only what the command needs (no root needed)."""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import json
import subprocess
import sys
import types
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from kextless.actors.policy.rules import DEFAULT_RULES_FILE
from kextless.base.settings import Settings, load_settings, parse_settings
from kextless.deploy import cli
from kextless.deploy import up as up_module
from kextless.deploy.errors import UsageError
from kextless.deploy.options import UpOptions, check_host
from kextless.deploy.programs import ACTORS, actor_flags
from kextless.deploy.status import format_status
from kextless.deploy.up import check_rules, rules_file
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
    text = format_status(report, verbose=True).splitlines()  # `status --verbose`
    assert text[1].split() == ["broker", "RUNNING", "pid", "42", "uptime", "1:02:05"]
    assert text[2].split() == ["ale", "BACKOFF", "-"]
    assert "  queue.depth: 3" in text and "  queue.bytes: 10" in text and "  actors: {}" in text
    assert "  queue.depth: 3" not in format_status(report).splitlines()  # short by default
    report["broker"], report["broker_error"] = None, "no answer"
    assert "broker: DOWN (no answer)" in format_status(report).splitlines()


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


# ---- the configuration file, --version, run, reload ---------------------------------------------


class _Parsed(Exception):
    def __init__(self, ns: argparse.Namespace) -> None:
        self.ns = ns


def actor_parse(monkeypatch: pytest.MonkeyPatch, name: str, argv: list[str]) -> argparse.Namespace:
    """The actor's own argparse result for `argv`, without running the actor: its parser
    is the judge of whether the flags `up` maps from the file exist and take those values."""
    module = importlib.import_module(cli._ACTORS[name])
    parse = argparse.ArgumentParser.parse_args

    def grab(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        raise _Parsed(parse(self, args, namespace))

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", grab)
        with pytest.raises(_Parsed) as e:
            module.main(argv)
    return e.value.ns


#: Every actor-facing setting away from its default (the instance part stays ipc, so the
#: policy may run).
CONFIG = """
[instance]
netns = "kxp2-cfg"
run_root = "run"

[verdicts]
timeout = 2.5
default = "PermanentDrop"
no_client = "default"
max_pending = 100

[queues]
max_bytes = 1048576

[redirect]
nameserver_v4 = "10.9.0.53"
nameserver_v6 = "fd00::53"
nameserver_port = 5353
tunnel_port = 7717
split_tunnel_port = 7719

[capture]
existing_connections = "accept"
fail_open = true

[lifecycle]
udp_idle_timeout = 30

[bandwidth]
poll_interval = 0.5

[log]
level = "DEBUG"

[policy]
rules = "rules.toml"
watch = false
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "kextless.toml"
    path.write_text(CONFIG)
    (tmp_path / "rules.toml").write_text('default = "Accept"\n')
    return path


def _opts(config: Path) -> UpOptions:
    return UpOptions.from_settings(load_settings(config), config)


def test_the_settings_defaults_are_the_actors_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """A default is left out of an argv, so each must be what the actor assumes anyway."""
    d = Settings()
    broker = actor_parse(monkeypatch, "broker", [])
    assert broker.queue_bytes == d.queues.max_bytes
    assert str(getattr(broker, "no_client", "wait")) == d.verdicts.no_client
    ale = actor_parse(monkeypatch, "ale", [])
    assert (ale.verdict_timeout, ale.default_verdict.kext_name) == (
        d.verdicts.timeout,
        d.verdicts.default,
    )
    cap = actor_parse(monkeypatch, "capture", [])
    r = d.redirect
    assert cap.nameserver_v4 == ipaddress.IPv4Address(r.nameserver_v4).packed
    assert cap.nameserver_v6 == ipaddress.IPv6Address(r.nameserver_v6).packed
    assert (cap.nameserver_port, cap.tunnel_port, cap.split_tunnel_port) == (
        r.nameserver_port,
        r.tunnel_port,
        r.split_tunnel_port,
    )
    assert (cap.existing_connections, cap.fail_open) == (
        d.capture.existing_connections,
        d.capture.fail_open,
    )
    assert actor_parse(monkeypatch, "lifecycle", []).udp_idle_timeout == (
        d.lifecycle.udp_idle_timeout
    )
    assert actor_parse(monkeypatch, "bandwidth", []).poll_interval == d.bandwidth.poll_interval
    assert actor_parse(monkeypatch, "policy", []).no_watch is (not d.policy.watch)
    for name in cli._ACTORS:
        assert actor_parse(monkeypatch, name, []).log_level in (None, d.log.level), name


def test_every_setting_reaches_its_actor_and_the_actor_takes_it(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opts = _opts(config)
    endpoint = opts.client_endpoint()
    flags = {a.name: actor_flags(a, opts, endpoint) for a in ACTORS}
    run_dir = str(config.parent.resolve() / "run" / "netns-kxp2-cfg")
    for name, argv in flags.items():
        assert argv[:2] == ["--run-dir", run_dir], name
        assert argv[-2:] == ["--log-level", "DEBUG"], name
    broker = actor_parse(monkeypatch, "broker", flags["broker"])
    assert broker.queue_bytes == 1 << 20 and str(broker.no_client) == "default"
    ale = actor_parse(monkeypatch, "ale", flags["ale"])
    assert (ale.verdict_timeout, ale.default_verdict.kext_name) == (2.5, "PermanentDrop")
    assert ale.max_pending == 100
    cap = actor_parse(monkeypatch, "capture", flags["capture"])
    assert cap.nameserver_v4 == bytes([10, 9, 0, 53])
    assert cap.nameserver_v6 == ipaddress.IPv6Address("fd00::53").packed
    assert (cap.nameserver_port, cap.tunnel_port, cap.split_tunnel_port) == (5353, 7717, 7719)
    assert cap.existing_connections == "accept" and cap.fail_open
    assert actor_parse(monkeypatch, "lifecycle", flags["lifecycle"]).udp_idle_timeout == 30
    assert actor_parse(monkeypatch, "bandwidth", flags["bandwidth"]).poll_interval == 0.5
    policy = actor_parse(monkeypatch, "policy", flags["policy"])
    assert policy.config == config and policy.no_watch
    assert policy.rules == config.parent.resolve() / "rules.toml"
    # and each actor gets only its own
    assert "--verdict-timeout" not in flags["broker"] + flags["capture"] + flags["policy"]
    assert "--queue-bytes" not in flags["ale"] + flags["capture"]
    assert "--max-pending" not in flags["broker"] + flags["capture"] + flags["policy"]


def test_defaults_leave_every_argv_bare(tmp_path: Path) -> None:
    opts = UpOptions(netns="n1", run_root=tmp_path)
    for actor in ACTORS:
        flags = actor_flags(actor, opts, opts.client_endpoint())
        assert flags == ["--run-dir", str(opts.run_dir.path)], actor.name


def test_run_actor_with_config_is_up_s_flags_then_the_users(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[str]] = []
    ale = importlib.import_module(cli._ACTORS["ale"])
    monkeypatch.setattr(ale, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["run", "ale", "--config", str(config), "--verdict-timeout", "7"]) == 0
    opts = _opts(config.resolve())
    (spec,) = [a for a in ACTORS if a.name == "ale"]
    assert seen == [[*actor_flags(spec, opts, opts.client_endpoint()), "--verdict-timeout", "7"]]
    monkeypatch.undo()
    assert actor_parse(monkeypatch, "ale", seen[0]).verdict_timeout == 7  # the user's wins


def test_run_actor_with_a_bad_config_starts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[lifecycle]\nudp_idle_timeout = 0\n")
    lifecycle = importlib.import_module(cli._ACTORS["lifecycle"])
    monkeypatch.setattr(lifecycle, "main", lambda argv: pytest.fail("the actor ran"))
    assert cli.main(["run", "lifecycle", f"--config={bad}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"kextless run lifecycle: error: {bad}: lifecycle.udp_idle_timeout: Expected `float` > 0.0"
    )


def test_up_flags_override_the_file(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[UpOptions] = []
    monkeypatch.setattr(up_module, "up", seen.append)
    argv = ["up", "--config", str(config), "--netns", "other", "--verdict-timeout", "3"]
    assert cli.main([*argv, "--log-level", "WARNING", "--existing-connections", "ask"]) == 0
    (opts,) = seen
    assert (opts.netns, opts.host, opts.verdict_timeout) == ("other", False, 3)
    assert opts.default_verdict == "PermanentDrop"  # not overridden: the file's
    assert opts.existing_connections.value == "ask" and opts.fail_open
    assert opts.settings.log.level == "WARNING" and opts.settings.queues.max_bytes == 1 << 20
    assert opts.config == config.resolve()
    assert opts.policy_rules == config.parent.resolve() / "rules.toml"
    assert opts.run_root == config.parent.resolve() / "run"
    # --no-policy drops the file's rules rather than contradicting them
    assert cli.main(["up", "--config", str(config), "--no-policy"]) == 0
    assert seen[1].policy is False and seen[1].policy_rules is None
    assert seen[1].netns == "kxp2-cfg"  # the file's


def test_up_with_a_bad_config_says_file_and_key_and_starts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(up_module, "up", lambda opts: pytest.fail("up ran"))
    bad = tmp_path / "bad.toml"
    for text, key in (
        ("[verdicts]\ntimeuot = 3\n", "verdicts.timeuot: unknown key"),
        ('[redirect]\nnameserver_v6 = "10.0.0.1"\n', "redirect.nameserver_v6:"),
        ("[queues]\nmax_bytes = -1\n", "queues.max_bytes:"),
    ):
        bad.write_text(text)
        assert cli.main(["up", "--config", str(bad), "--run-root", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"kextless up: error: {bad}: {key}")
    assert not (tmp_path / "r").exists()
    assert cli.main(["up", "--config", str(tmp_path / "none.toml")]) == 2
    assert "none.toml: cannot read" in capsys.readouterr().err


def test_up_refuses_the_host_unless_told(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Only the refusal is tested: up --host would guard this machine.
    assert cli.main(["up", "--run-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no --netns given" in err and "--host" in err
    assert not any(tmp_path.iterdir())
    assert cli.main(["up", "--host", "--netns", "n1", "--run-root", str(tmp_path)]) == 2
    assert "choose one" in capsys.readouterr().err
    with pytest.raises(UsageError, match="no --netns given"):
        check_host(UpOptions())
    check_host(UpOptions(host=True))  # what instance.host = true / --host say
    check_host(UpOptions(netns="n1"))
    assert UpOptions.from_settings(parse_settings("[instance]\nhost = true")).host


def test_up_checks_the_rules_and_the_default_rules(tmp_path: Path) -> None:
    assert rules_file(UpOptions(netns="n1")) == DEFAULT_RULES_FILE
    check_rules(UpOptions(netns="n1"))  # the shipped default loads
    assert rules_file(UpOptions(netns="n1", policy=False)) is None
    bad = tmp_path / "rules.toml"
    bad.write_text('default = "Accept"\n\n[[rule]]\nverdict = "Sometimes"\n')
    with pytest.raises(UsageError) as e:
        check_rules(UpOptions(netns="n1", policy_rules=bad))
    message = str(e.value)
    assert message.startswith(f"policy rules: {bad}:3") and "Sometimes" in message
    assert "\n" not in message


def test_version_is_the_installed_distribution(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"kextless {metadata.version('kextless')}"


def test_run_lists_the_actors(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kextless run ACTOR")
    for name in ("broker", "ale", "capture", "lifecycle", "bandwidth", "policy"):
        assert f"\n  {name} " in out
    assert cli.main(["run"]) == 2
    assert "usage: kextless run ACTOR" in capsys.readouterr().err
    assert cli.main(["run", "bogus"]) == 2
    assert "no actor 'bogus'; choose one of: broker, ale" in capsys.readouterr().err


def test_monitor_and_demo_are_dispatched_and_a_missing_one_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[list[str]] = []
    for name in ("monitor", "demo"):
        module = types.ModuleType(f"kextless.deploy.{name}")
        setattr(module, f"{name}_main", lambda argv: seen.append(argv) or 5)
        monkeypatch.setitem(sys.modules, f"kextless.deploy.{name}", module)
        assert cli.main([name, "--x", "y"]) == 5
    assert seen == [["--x", "y"], ["--x", "y"]]
    monkeypatch.setitem(sys.modules, "kextless.deploy.demo", None)
    assert cli.main(["demo"]) == 1
    assert "kextless demo: not available in this build" in capsys.readouterr().err


def test_commands_find_the_instance_through_the_file(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["status", "--config", str(config), "--json"]) == 3
    report = json.loads(capsys.readouterr().out)
    assert report["netns"] == "kxp2-cfg"
    assert report["run_dir"] == str(config.parent.resolve() / "run" / "netns-kxp2-cfg")
    assert cli.main(["down", "--config", str(config)]) == 0
    assert "not running for netns kxp2-cfg" in capsys.readouterr().out
    assert cli.main(["reload", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    run = config.parent.resolve() / "run" / "netns-kxp2-cfg"
    assert err.strip() == f"kextless reload: kextless is not running for netns kxp2-cfg ({run})"
    assert cli.main(["reload", "--config", str(config), "--netns", "x/y"]) == 2


def test_down_purge_and_status_verbose_reach_their_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "netns-kxp2-gone"
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "ale.log").write_text("old\n")
    assert cli.main(["down", "--netns", "kxp2-gone", "--run-root", str(tmp_path)]) == 0
    assert run.is_dir() and "--purge" in capsys.readouterr().out  # kept, and says how
    assert cli.main(["down", "--netns", "kxp2-gone", "--run-root", str(tmp_path), "--purge"]) == 0
    assert not run.exists()
    assert cli.main(["status", "--run-root", str(tmp_path), "--verbose"]) == 3
    assert "not running" in capsys.readouterr().out
