"""The main job end to end: `kextless up --netns` with the built-in policy and a rules file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kextless.base.rundir import RuntimeDir
from tests import apps
from tests.entry import KEXTLESS
from tests.netns import NetnsPair

pytestmark = [pytest.mark.root, pytest.mark.slow]

RULES = """
default = "PermanentAccept"

[[rule]]
protocol = "tcp"
remote_port = 22001
verdict = "PermanentBlock"

[[rule]]
protocol = "udp"
remote_port = [22002, 22003]
verdict = "PermanentDrop"
"""


@pytest.fixture(scope="module")
def policy_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NetnsPair, Path]]:
    root = tmp_path_factory.mktemp("run")
    rules = root / "rules.toml"
    rules.write_text(RULES)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    with NetnsPair("p") as pair:
        up = subprocess.run(
            [
                *KEXTLESS,
                "up",
                "--netns",
                pair.a,
                "--run-root",
                str(root),
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
            assert "policy" in up.stdout
            yield pair, root
        finally:
            down = subprocess.run(
                [*KEXTLESS, "down", "--netns", pair.a, "--run-root", str(root)],
                capture_output=True,
                text=True,
                timeout=90,
            )
            assert down.returncode == 0, down.stdout + down.stderr


def test_rules_decide_real_connections(policy_system: tuple[NetnsPair, Path]) -> None:
    pair, root = policy_system
    for port in (22001, 22002, 22004):
        apps.start(pair, pair.b, apps.ECHO_SERVER, port)
    blocked = apps.run(pair, pair.a, apps.TCP_CLIENT, pair.ip4_b, 22001, 3)
    assert blocked["result"] == "refused", blocked
    accepted = apps.run(pair, pair.a, apps.TCP_CLIENT, pair.ip4_b, 22004, 3)
    assert accepted["result"] == "ok", accepted
    dropped = apps.run(pair, pair.a, apps.UDP_CLIENT, pair.ip4_b, 22002, 1)
    assert dropped["result"] == "timeout", dropped
    assert apps.run(pair, pair.a, apps.UDP_CLIENT, pair.ip4_b, 22004, 2)["result"] == "ok"
    log = (RuntimeDir.for_instance(pair.a, root=root).log_dir / "policy.log").read_text()
    assert f":{accepted['local'][1]} -> {pair.ip4_b}:22004 verdict=PermanentAccept" in log
    assert f" -> {pair.ip4_b}:22001 verdict=PermanentBlock" in log


def test_bad_rules_file_fails_up_with_the_reason() -> None:
    # A short run root: unix socket paths are limited to 107 bytes.
    tmp_path = Path(tempfile.mkdtemp(prefix="klp"))
    rules = tmp_path / "rules.toml"
    rules.write_text("default = 'Allow'\n")
    with NetnsPair("q") as pair:
        up = subprocess.run(
            [
                *KEXTLESS,
                "up",
                "--netns",
                pair.a,
                "--run-root",
                str(tmp_path / "run"),
                "--policy-rules",
                str(rules),
            ],
            capture_output=True,
            text=True,
            timeout=90,
        )
        try:
            assert up.returncode != 0
            assert "unknown verdict 'Allow'" in up.stdout + up.stderr
        finally:
            subprocess.run(
                [*KEXTLESS, "down", "--netns", pair.a, "--run-root", str(tmp_path / "run")],
                capture_output=True,
                timeout=90,
            )
            shutil.rmtree(tmp_path, ignore_errors=True)
