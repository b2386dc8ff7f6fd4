"""The supervisord config `kextless up` renders from the actor table, and the option and
value checks that refuse bad input before anything starts (no root needed).

The rendered file is checked twice: with configparser (it is a valid ini file) and with
supervisor's own loader (supervisord would accept it and run exactly these argvs).
"""

from __future__ import annotations

import configparser
import os
import pwd
import shlex
import sys
from pathlib import Path

import pytest
from supervisor.datatypes import RestartUnconditionally
from supervisor.options import ServerOptions

from kextless.deploy.config import program_env, render_config
from kextless.deploy.errors import UsageError
from kextless.deploy.options import UpOptions, parse_endpoint, validate
from kextless.deploy.programs import (
    ACTORS,
    ActorSpec,
    Program,
    check_actor_args,
    kextless_command,
    programs_for,
)
from kextless.deploy.supervisor_rpc import password_digest

PASSWORD = "Zq3-secret_for_TESTS_only"


def _render(opts: UpOptions, programs: list[Program] | None = None) -> str:
    progs = programs if programs is not None else programs_for(opts)
    env = program_env(opts, opts.client_endpoint())
    return render_config(opts.run_dir, progs, env, password=PASSWORD)


def _supervisor_view(tmp_path: Path, text: str) -> ServerOptions:
    """Load the text the way supervisord does (expansions, quoting, section checks)."""
    ini = configparser.RawConfigParser(inline_comment_prefixes=(";", "#"), strict=True)
    ini.read_string(text)
    for key in ("directory", "childlogdir"):  # `up` creates these before starting supervisord
        Path(ini["supervisord"][key].replace("%%", "%")).mkdir(parents=True, exist_ok=True)
    conf = tmp_path / "check.conf"
    conf.write_text(text)
    opts = ServerOptions()
    opts.realize(args=["-c", str(conf)])
    return opts


def _argvs(tmp_path: Path, text: str) -> dict[str, list[str]]:
    opts = _supervisor_view(tmp_path, text)
    return {g.name: shlex.split(g.process_configs[0].command) for g in opts.process_group_configs}


def _tail(argv: list[str], name: str) -> list[str]:
    """The part of an argv after `kextless`: 'run NAME ...'."""
    i = argv.index("run")
    assert argv[i + 1] == name
    return argv[i:]


def test_default_config_parses_and_runs_every_actor_in_order(tmp_path: Path) -> None:
    opts = UpOptions(run_root=tmp_path)
    text = _render(opts)
    ini = configparser.RawConfigParser(inline_comment_prefixes=(";", "#"), strict=True)
    ini.read_string(text)
    run = str(opts.run_dir.path)
    assert ini["unix_http_server"]["file"] == f"{run}/supervisor.sock"
    assert ini["unix_http_server"]["chmod"] == "0700"
    # supervisord's CRIT lines: an unauthenticated socket, and root without `user =`.
    assert ini["unix_http_server"]["username"] == "kextless"
    assert ini["unix_http_server"]["password"] == password_digest(PASSWORD)
    assert ini["supervisorctl"]["password"] == PASSWORD
    assert ini["supervisord"]["user"] == pwd.getpwuid(os.geteuid()).pw_name
    assert ini["supervisord"]["pidfile"] == f"{run}/supervisord.pid"
    assert ini["supervisord"]["nodaemon"] == "false"
    assert "rpcinterface:supervisor" in ini

    sup = _supervisor_view(tmp_path, text)
    groups = sorted(sup.process_group_configs, key=lambda g: g.priority)
    assert [g.name for g in groups] == [
        "broker",
        "ale",
        "lifecycle",
        "capture",
        "bandwidth",
        "policy",
        "watchdog",
    ]
    for g in groups:
        pc = g.process_configs[0]
        assert pc.autorestart is RestartUnconditionally
        assert pc.startsecs == 1
        assert pc.stopsignal == 15
        assert pc.stopwaitsecs >= 5
        assert pc.redirect_stderr is True
        assert pc.stdout_logfile == f"{run}/logs/{g.name}.log"
        assert pc.environment["PYTHONUNBUFFERED"] == "1"  # event lines reach the log at once
        argv = shlex.split(pc.command)
        assert _tail(argv, g.name) == ["run", g.name, "--run-dir", run]
        assert Path(argv[0]).is_absolute()  # works from a venv without PATH


def test_netns_wraps_only_capture_in_ip_netns_exec(tmp_path: Path) -> None:
    opts = UpOptions(netns="klt-x", run_root=tmp_path)
    argvs = _argvs(tmp_path, _render(opts))
    run = str(tmp_path / "netns-klt-x")
    assert argvs["capture"][1:4] == ["netns", "exec", "klt-x"]
    assert Path(argvs["capture"][0]).name == "ip"
    assert _tail(argvs["capture"], "capture") == ["run", "capture", "--run-dir", run]
    for name in ("broker", "ale", "policy"):
        assert "netns" not in argvs[name], name
        assert _tail(argvs[name], name) == ["run", name, "--run-dir", run]


def test_no_policy_leaves_the_decision_maker_out(tmp_path: Path) -> None:
    opts = UpOptions(netns="n1", policy=False, run_root=tmp_path)
    assert sorted(_argvs(tmp_path, _render(opts))) == [
        "ale",
        "bandwidth",
        "broker",
        "capture",
        "lifecycle",
        "watchdog",
    ]


def test_no_lifecycle_leaves_the_lifecycle_actor_out(tmp_path: Path) -> None:
    opts = UpOptions(netns="n1", lifecycle=False, run_root=tmp_path)
    assert sorted(_argvs(tmp_path, _render(opts))) == [
        "ale",
        "bandwidth",
        "broker",
        "capture",
        "policy",
        "watchdog",
    ]


def test_no_bandwidth_leaves_the_bandwidth_actor_out(tmp_path: Path) -> None:
    opts = UpOptions(netns="n1", bandwidth=False, run_root=tmp_path)
    names = sorted(_argvs(tmp_path, _render(opts)))
    assert names == ["ale", "broker", "capture", "lifecycle", "policy", "watchdog"]
    argv = _argvs(tmp_path, _render(UpOptions(netns="n1", run_root=tmp_path)))["bandwidth"]
    assert argv[1:4] == ["netns", "exec", "n1"]


def test_lifecycle_enters_only_the_namespaces_network(tmp_path: Path) -> None:
    argv = _argvs(tmp_path, _render(UpOptions(netns="n1", run_root=tmp_path)))["lifecycle"]
    assert Path(argv[0]).name == "nsenter"
    assert "--net=/var/run/netns/n1" in argv


def test_tcp_endpoint_passes_curve_to_broker_and_excludes_the_port_from_capture(
    tmp_path: Path,
) -> None:
    secret, clients = tmp_path / "server.key_secret", tmp_path / "clients"
    opts = UpOptions(
        netns="n1",
        endpoint="tcp://127.0.0.1:7717",
        run_root=tmp_path,
        curve_server_secret=secret,
        curve_clients=clients,
    )
    argvs = _argvs(tmp_path, _render(opts))
    run = str(tmp_path / "netns-n1")
    assert _tail(argvs["broker"], "broker") == [
        "run",
        "broker",
        "--run-dir",
        run,
        "--endpoint",
        "tcp://127.0.0.1:7717",
        "--curve-server-secret",
        str(secret),
        "--curve-clients",
        str(clients),
    ]
    assert _tail(argvs["capture"], "capture") == [
        "run",
        "capture",
        "--run-dir",
        run,
        "--exclude-port",
        "7717",
    ]
    assert "--exclude-port" not in argvs["ale"]


def test_custom_ipc_endpoint_reaches_broker_and_policy_not_capture(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    opts = UpOptions(
        endpoint="ipc:///tmp/klt-elsewhere.sock", run_root=tmp_path, policy_rules=rules
    )
    argvs = _argvs(tmp_path, _render(opts))
    assert argvs["broker"][-2:] == ["--endpoint", "ipc:///tmp/klt-elsewhere.sock"]
    assert argvs["policy"][-4:] == [
        "--endpoint",
        "ipc:///tmp/klt-elsewhere.sock",
        "--rules",
        str(rules),
    ]
    assert "--endpoint" not in argvs["capture"] and "--exclude-port" not in argvs["capture"]


def test_spaces_and_quotes_in_paths_survive_supervisor_parsing(tmp_path: Path) -> None:
    root = tmp_path / "odd 100 dir's"
    opts = UpOptions(netns="n1", run_root=root)
    argvs = _argvs(tmp_path, _render(opts))
    assert _tail(argvs["ale"], "ale") == ["run", "ale", "--run-dir", str(root / "netns-n1")]
    sup = _supervisor_view(tmp_path, _render(opts))
    assert sup.pidfile == str(root / "netns-n1" / "supervisord.pid")


def test_ale_options_and_actor_args_reach_their_actor_only(tmp_path: Path) -> None:
    opts = UpOptions(
        netns="n1",
        run_root=tmp_path,
        verdict_timeout=3,
        default_verdict="Drop",
        actor_args=(("capture", "--tunnel-port=7717"), ("ale", "--log-level"), ("ale", "DEBUG")),
    )
    argvs = _argvs(tmp_path, _render(opts))
    assert argvs["ale"][-6:] == [
        "--verdict-timeout",
        "3",
        "--default-verdict",
        "Drop",
        "--log-level",
        "DEBUG",
    ]
    assert argvs["capture"][-1] == "--tunnel-port=7717"
    assert "--verdict-timeout" not in argvs["capture"] + argvs["broker"] + argvs["policy"]


def test_a_new_actor_is_one_table_entry(tmp_path: Path) -> None:
    actors = (
        *ACTORS,
        ActorSpec("monitor", 360, in_netns=True),
        ActorSpec("other", 370, enabled=lambda o: o.netns is None),
    )
    opts = UpOptions(netns="n1", run_root=tmp_path)
    progs = programs_for(opts, actors)
    assert [p.name for p in sorted(progs, key=lambda p: p.priority)] == [
        "broker",
        "ale",
        "lifecycle",
        "capture",
        "bandwidth",
        "monitor",
        "policy",
        "watchdog",
    ]
    argvs = _argvs(tmp_path, _render(opts, progs))
    assert argvs["monitor"][1:4] == ["netns", "exec", "n1"]


def test_values_supervisord_would_mangle_are_refused(tmp_path: Path) -> None:
    opts = UpOptions(run_root=tmp_path)
    bad = [Program("a", ("/bin/true", "x ;comment"), 1)]
    with pytest.raises(UsageError, match="inline comments"):
        _render(opts, bad)
    with pytest.raises(UsageError, match="unique"):
        _render(opts, [Program("a", ("/bin/true",), 1), Program("a", ("/bin/true",), 2)])
    with pytest.raises(UsageError, match="not usable"):
        _render(opts, [Program("a b", ("/bin/true",), 1)])


def test_percent_in_the_run_dir_is_refused(tmp_path: Path) -> None:
    # supervisord expands logfile paths twice, so no escaping of '%' is reliable there.
    with pytest.raises(UsageError, match="%"):
        _render(UpOptions(run_root=tmp_path / "100%(here)s"))


def test_run_root_too_long_for_supervisords_socket_is_refused(tmp_path: Path) -> None:
    # supervisord binds "<socket>.<pid>" first: a path that fits sun_path exactly still fails.
    root = tmp_path / ("r" * (100 - len(str(tmp_path)) - len("/host/supervisor.sock")))
    assert len(str(root / "host" / "supervisor.sock")) <= 107
    with pytest.raises(UsageError, match="shorter --run-root"):
        validate(UpOptions(run_root=root))


def test_endpoint_parsing() -> None:
    assert parse_endpoint("tcp://*:5555").connect_url == "tcp://127.0.0.1:5555"
    assert parse_endpoint("tcp://[::1]:5555").port == 5555
    assert parse_endpoint("ipc:///run/x.sock").path == Path("/run/x.sock")
    for bad, why in (
        ("tcp://host", "fixed port"),
        ("tcp://host:*", "fixed port"),
        ("tcp://:80", "fixed port"),
        ("tcp://h:70000", "fixed port"),
        ("ipc://rel.sock", "absolute"),
        ("inproc://x", "only ipc"),
        ("ipc:///" + "x" * 200, "longer"),
    ):
        with pytest.raises(UsageError, match=why):
            parse_endpoint(bad)


def test_actor_args_must_name_a_running_actor() -> None:
    check_actor_args(UpOptions(actor_args=(("policy", "--x"),)))
    with pytest.raises(
        UsageError,
        match=r"no such actor in this instance "
        r"\(running: ale, bandwidth, broker, capture, lifecycle, watchdog\)",
    ):
        check_actor_args(UpOptions(policy=False, actor_args=(("policy", "--x"),)))


def test_command_uses_this_interpreter() -> None:
    cmd = kextless_command()
    assert Path(cmd[0]).parent == Path(sys.executable).parent


def test_fail_open_reaches_only_the_capture(tmp_path: Path) -> None:
    argvs = _argvs(tmp_path, _render(UpOptions(netns="n1", fail_open=True, run_root=tmp_path)))
    assert "--fail-open" in argvs["capture"]
    assert all("--fail-open" not in argv for name, argv in argvs.items() if name != "capture")
    plain = _argvs(tmp_path, _render(UpOptions(netns="n1", run_root=tmp_path)))
    assert "--fail-open" not in plain["capture"]
