"""What the policy writes for the monitor and reads from /proc: decisions.jsonl (every line
kept, capped by rotation), the snapshot, and the process facts of a pid."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from kextless.actors.policy.main import PolicyRunner
from kextless.actors.policy.procfacts import FactsCache, read_facts
from kextless.actors.policy.rules import parse
from kextless.actors.policy.view import (
    DECISIONS_FILE,
    Decision,
    DecisionFile,
    ProcessFacts,
    read_decisions,
    read_snapshot,
    write_snapshot,
)


def _decision(i: int) -> Decision:
    return Decision(
        time=1.5,
        id=i,
        pid=1,
        process="p",
        exe="/p",
        user="root",
        direction="outbound",
        protocol="tcp",
        local_ip="[fd00::1]",
        local_port=1,
        remote_ip="10.0.0.2",
        remote_port=2,
        rule="default",
        verdict="Accept",
    )


def test_decisions_append_one_json_line_each_and_rotate_at_the_cap(tmp_path: Path) -> None:
    path = tmp_path / DECISIONS_FILE
    line = len(msgspec.json.encode(_decision(1))) + 1
    f = DecisionFile(path, max_bytes=line * 10 + 5)
    f.write([_decision(i) for i in range(1, 9)])
    f.write([])
    f.write([_decision(9), _decision(10)])
    assert [d.id for d in read_decisions(path)] == list(range(1, 11))
    f.write([_decision(11)])  # over the cap: the old file moves to .1
    assert [d.id for d in read_decisions(path)] == [11]
    assert [d.id for d in read_decisions(path.with_name(DECISIONS_FILE + ".1"))] == list(
        range(1, 11)
    )
    f.close()
    again = DecisionFile(path, max_bytes=line * 10 + 5)  # a restart appends
    again.write([_decision(12)])
    again.close()
    assert [d.id for d in read_decisions(path)] == [11, 12]
    path.write_bytes(path.read_bytes() + b'{"time": 1')  # a torn last line is skipped
    assert [d.id for d in read_decisions(path)] == [11, 12]


def test_snapshot_of_a_runner_names_the_rules_and_is_replaced_atomically(tmp_path: Path) -> None:
    runner = PolicyRunner("ipc:///nonexistent", parse(""), rules_file=tmp_path / "r.toml")
    snap = runner.snapshot()
    assert snap.rules_file == str(tmp_path / "r.toml") and snap.rules_error == ""
    write_snapshot(tmp_path / "c.json", snap)
    assert read_snapshot(tmp_path / "c.json") == snap
    assert not (tmp_path / "c.json.tmp").exists()


def test_a_refused_reload_keeps_the_rules_and_says_why(tmp_path: Path) -> None:
    rules = tmp_path / "r.toml"
    rules.write_text("default = 'PermanentBlock'\n")
    runner = PolicyRunner("ipc:///nonexistent", parse(""), rules_file=rules, run_dir=tmp_path)
    assert runner.reload("test") and runner.policy.default.kext_name == "PermanentBlock"
    good = runner.policy
    rules.write_text("default = 'PermanentBlock'\n[[rule]]\nverdict = 'Maybe'\n")
    assert not runner.reload("test")
    assert runner.policy is good
    assert runner.snapshot().rules_error.startswith(f"{rules}:2: rule 1: unknown verdict 'Maybe'")
    rules.write_text("default = 'Drop'\n")
    assert runner.reload("test") and runner.snapshot().rules_error == ""


def test_facts_of_a_live_process_a_gone_one_and_pid_0() -> None:
    me = read_facts(os.getpid())
    assert me.pid == os.getpid()
    assert me.exe == os.path.realpath(sys.executable) or me.exe.startswith("/")
    assert me.name == Path(f"/proc/{os.getpid()}/comm").read_text().strip()
    assert me.uid == os.getuid() and me.user == pwd.getpwuid(os.getuid()).pw_name
    assert read_facts(0) == ProcessFacts()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    gone = read_facts(child.pid)  # reaped: nothing to read, but the pid stays known
    assert gone == ProcessFacts(pid=child.pid)
    cache = FactsCache(ttl_s=60)
    assert cache.get(os.getpid()) is cache.get(os.getpid())
    assert cache.get(0) == ProcessFacts()


def test_facts_from_a_proc_tree_with_an_unknown_uid(tmp_path: Path) -> None:
    base = tmp_path / "4242"
    base.mkdir()
    (base / "comm").write_text("nginx\n")
    (base / "status").write_text("Name:\tnginx\nUid:\t64999\t64999\t64999\t64999\n")
    os.symlink("/usr/sbin/nginx", base / "exe")
    facts = read_facts(4242, tmp_path)
    assert facts == ProcessFacts(
        pid=4242, name="nginx", exe="/usr/sbin/nginx", user="64999", uid=64999
    )


def test_run_policy_refuses_a_bad_config_or_rules_file_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kextless.actors.policy.main import main

    config = tmp_path / "kextless.toml"
    config.write_text("[policy]\nwatch = 'sometimes'\n")
    assert main(["--config", str(config), "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{config}: policy.watch" in err[0], err
    rules = tmp_path / "rules.toml"
    rules.write_text("[[rule]]\nverdict = 'Accept'\nremote_port = 'http'\n")
    config.write_text(f"[policy]\nrules = '{rules.name}'\n")  # relative to the config file
    assert main(["--config", str(config), "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{rules}:1: rule 1: remote_port is a port" in err[0], err
    # a --rules flag overrides the file's
    other = tmp_path / "other.toml"
    other.write_text("default = 'Maybe'\n")
    assert main(["--config", str(config), "--rules", str(other), "--run-dir", str(tmp_path)]) == 2
    assert f"{other}:1: default: unknown verdict 'Maybe'" in capsys.readouterr().err
