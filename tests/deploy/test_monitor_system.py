"""`kextless monitor` against a real running system: `kextless up --netns kxp3-...` with the
built-in policy and a rules file, real connections driven from the guarded namespace, and
`monitor --once --json` (then the decision log and the live screen under tmux) waited on until
they show with their process, verdict, rule, bytes and end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import apps
from tests.deploy.test_monitor_screen import Screen, table_lines
from tests.entry import KEXTLESS
from tests.netns import NetnsPair

pytestmark = [pytest.mark.root, pytest.mark.slow]

MONITOR = [sys.executable, "-m", "kextless.deploy.monitor"]
RULES = """
default = "PermanentAccept"

[[rule]]
name = "no 22001"
protocol = "tcp"
remote_port = 22001
verdict = "PermanentBlock"
"""


@pytest.fixture(scope="module")
def system() -> Iterator[tuple[NetnsPair, Path]]:
    # A short run root: unix socket paths are limited to 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="kxp3"))
    rules = root / "rules.toml"
    rules.write_text(RULES)
    pair = NetnsPair()
    pair.a, pair.b = f"kxp3-{os.getpid()}-a", f"kxp3-{os.getpid()}-b"  # this helper's prefix
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    run_root = root / "run"
    with pair:
        up = subprocess.run(
            [
                *KEXTLESS,
                "up",
                "--netns",
                pair.a,
                "--run-root",
                str(run_root),
                "--policy-rules",
                str(rules),
            ],
            capture_output=True,
            text=True,
            timeout=90,
            env=env,
        )
        try:
            assert up.returncode == 0, up.stdout + up.stderr
            yield pair, run_root
        finally:
            down = subprocess.run(
                [*KEXTLESS, "down", "--netns", pair.a, "--run-root", str(run_root)],
                capture_output=True,
                text=True,
                timeout=90,
            )
            shutil.rmtree(root, ignore_errors=True)
            assert down.returncode == 0, down.stdout + down.stderr


def once(pair: NetnsPair, run_root: Path) -> dict[str, Any] | None:
    """The monitor's JSON, or None while the policy has written no snapshot yet."""
    res = subprocess.run(
        [*MONITOR, "--netns", pair.a, "--run-root", str(run_root), "--once", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if res.returncode == 1 and "no snapshot at" in res.stderr:
        return None
    assert res.returncode == 0, res.stderr
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def wait_for(
    pair: NetnsPair,
    run_root: Path,
    pred: Callable[[dict[str, Any]], bool],
    what: str,
    timeout: float = 15.0,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        doc = once(pair, run_root)
        if doc is not None and pred(doc):
            return doc
        if time.monotonic() > deadline:
            logs = "\n".join(
                f"==> {f.name}\n{f.read_text(errors='replace')[-3000:]}"
                for f in sorted((run_root / f"netns-{pair.a}" / "logs").glob("*.log"))
            )
            raise AssertionError(
                f"timed out waiting for {what}:\n{json.dumps(doc, indent=1)}\n{logs}"
            )
        time.sleep(0.5)


def by_remote(doc: dict[str, Any], remote: str) -> list[dict[str, Any]]:
    return [c for c in doc["connections"] if c["remote"] == remote]


def test_once_json_shows_real_connections(system: tuple[NetnsPair, Path]) -> None:
    pair, run_root = system
    # The policy writes its snapshot each second, session or not.
    first = wait_for(pair, run_root, lambda d: not d["stale"], "a fresh snapshot")
    assert first["rules_file"].endswith("rules.toml") and first["rules_error"] == ""
    # `up` returns when every program is RUNNING, which is before the lifecycle actor has its
    # handles open (~2 s later): a connection that ends before then never gets an end event.
    lifecycle_log = run_root / f"netns-{pair.a}" / "logs" / "lifecycle.log"
    deadline = time.monotonic() + 20
    while "running in netns" not in lifecycle_log.read_text(errors="replace"):
        assert time.monotonic() < deadline, lifecycle_log.read_text(errors="replace")
        time.sleep(0.2)

    for port in (22001, 22004):
        apps.start(pair, pair.b, apps.ECHO_SERVER, port)
    accepted = apps.run(pair, pair.a, apps.TCP_CLIENT, pair.ip4_b, 22004, 5)
    assert accepted["result"] == "ok", accepted
    blocked = apps.run(pair, pair.a, apps.TCP_CLIENT, pair.ip4_b, 22001, 5)
    assert blocked["result"] == "refused", blocked

    ok_remote, no_remote = f"{pair.ip4_b}:22004", f"{pair.ip4_b}:22001"
    local = f"{accepted['local'][0]}:{accepted['local'][1]}"

    def shown(d: dict[str, Any]) -> bool:
        ok = [c for c in by_remote(d, ok_remote) if c["local"] == local]
        # The client closed its socket: the accepted one ends; the echo's greeting is counted.
        return bool(ok and by_remote(d, no_remote)) and not ok[0]["live"] and ok[0]["received"]

    doc = wait_for(pair, run_root, shown, "both connections, the accepted one ended")
    ok = next(c for c in by_remote(doc, ok_remote) if c["local"] == local)
    assert (ok["direction"], ok["protocol"], ok["verdict"]) == (
        "outbound",
        "tcp",
        "PermanentAccept",
    )
    assert ok["rule"] == "default", ok
    assert ok["pid"] > 0 and ok["process"], ok  # the lifecycle actor named its process
    assert ok["received"] == len(accepted["data"]) and ok["sent"] == 0, ok
    assert ok["ended"] is not None and ok["ended_ago_s"] is not None
    no = by_remote(doc, no_remote)[0]
    assert no["verdict"] == "PermanentBlock" and "no 22001" in no["rule"], no
    assert doc["totals"]["verdicts"].get("PermanentBlock", 0) >= 1
    assert doc["totals"]["connections"] == len(doc["connections"]) == doc["total_connections"]

    # The decision log has both, with the rule that decided each, newest first.
    res = subprocess.run(
        [
            *MONITOR,
            "--netns",
            pair.a,
            "--run-root",
            str(run_root),
            "--once",
            "--json",
            "--decisions",
            "--filter",
            pair.ip4_b,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    logged = [(d["remote_port"], d["verdict"], d["rule"]) for d in json.loads(res.stdout)]
    assert logged[:2] == [
        (22001, "PermanentBlock", no["rule"]),
        (22004, "PermanentAccept", "default"),
    ]

    # The same connections on the live screen, filtered to the accepted one.
    tmp = Path(tempfile.mkdtemp(prefix="kxp3s"))
    screen = Screen(tmp, run_root, "--filter", "22004", netns=pair.a)
    try:
        s = screen.wait(lambda s: len(table_lines(s, ok_remote)) == 1, "the row")
        line = table_lines(s, ok_remote)[0]
        assert "PermanentAccept" in line and "default" in line and local in line
        screen.keys("q")
        assert screen.exit_code() == 0
    finally:
        screen.close()
        shutil.rmtree(tmp, ignore_errors=True)
