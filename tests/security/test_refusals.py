"""Files that steer the firewall (configuration, rules, CURVE keys, the run directory) are
refused where each is used, when another user could change them: by the settings loader, the
rules loader (and so a policy reload, which keeps the last good rules), the client's
certificate loader, the run directory, `up`'s checks, and `kextless run policy`."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq.auth

from kextless.actors.policy.main import PolicyRunner
from kextless.actors.policy.rules import RulesError, load
from kextless.base.rundir import RuntimeDir
from kextless.base.security import UnsafePath
from kextless.base.settings import SettingsError, load_settings
from kextless.broker.client import KextClient, load_curve_certs
from kextless.deploy.errors import UsageError
from kextless.deploy.options import UpOptions, validate
from kextless.deploy.programs import actor_flags, actor_spec
from kextless.protocol.enums import Verdict
from tests.entry import KEXTLESS

NOBODY = 65534
RULES_ACCEPT = 'default = "PermanentAccept"\n'
RULES_BLOCK = 'default = "PermanentBlock"\n'


@pytest.fixture
def d(tmp_path: Path) -> Path:
    out = tmp_path / "conf"
    out.mkdir(mode=0o700)
    return out


def _write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_configuration_file_others_can_write_is_refused(d: Path) -> None:
    cfg = _write(d / "kextless.toml", "[verdicts]\ntimeout = 3\n")
    assert load_settings(cfg).verdicts.timeout == 3
    cfg.chmod(0o602)
    with pytest.raises(SettingsError, match=rf"configuration file {cfg} is writable by every"):
        load_settings(cfg)


def test_a_rules_file_others_can_write_is_refused(d: Path) -> None:
    rules = _write(d / "rules.toml", RULES_BLOCK, 0o666)
    with pytest.raises(RulesError, match=rf"rules file {rules} is writable by every user"):
        load(rules)


def test_a_reload_of_a_rules_file_made_writable_keeps_the_last_good_rules(d: Path) -> None:
    rules = _write(d / "rules.toml", RULES_ACCEPT)
    runner = PolicyRunner("ipc:///nonexistent", load(rules), rules_file=rules)
    _write(rules, RULES_BLOCK, 0o646)  # someone else could have written this verdict
    assert runner.reload("test") is False
    assert runner.policy.default is Verdict.PERMANENT_ACCEPT  # the last good rules stay
    assert "is writable by every user" in runner.rules_error
    rules.chmod(0o644)
    assert runner.reload("test") is True
    assert runner.policy.default is Verdict.PERMANENT_BLOCK


@pytest.fixture
def certs(d: Path) -> tuple[Path, Path, Path]:
    """(server secret, client secret, clients dir holding the client's public key)."""
    clients = d / "clients"
    clients.mkdir(mode=0o700)
    _, server = zmq.auth.create_certificates(d, "server")
    public, client = zmq.auth.create_certificates(d, "client")
    shutil.copy(public, clients)
    for f in (server, client):
        os.chmod(f, 0o600)
    return Path(server), Path(client), clients


def test_curve_certificates_others_can_write_are_refused(certs: tuple[Path, Path, Path]) -> None:
    server, client, _ = certs
    load_curve_certs(server, client)
    for f in (server, client):
        f.chmod(0o606)
        with pytest.raises(ValueError, match=f"CURVE (server|client) certificate {f} is"):
            load_curve_certs(server, client)
        with pytest.raises(ValueError, match="is writable by"):
            KextClient("tcp://127.0.0.1:1", curve_server_cert=server, curve_client_cert=client)
        f.chmod(0o600)


def test_a_run_directory_that_is_not_private_is_refused(tmp_path: Path) -> None:
    run = RuntimeDir(tmp_path / "root" / "netns-x").create()
    run.path.chmod(0o755)
    with pytest.raises(UnsafePath, match=r"run directory .* is mode 0755, not 0700"):
        run.check()
    run.create()  # ours: tightened again, then checked
    link = RuntimeDir(tmp_path / "root" / "netns-link")
    link.path.symlink_to(run.path)
    with pytest.raises(UnsafePath, match="is a symlink"):
        link.create()
    (tmp_path / "root").chmod(0o777)  # anyone could swap the run directory
    with pytest.raises(UnsafePath, match="which is writable by every user"):
        run.create()


@pytest.mark.root
def test_a_run_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    run = RuntimeDir(tmp_path / "netns-y").create()
    os.chown(run.path, NOBODY, NOBODY)
    with pytest.raises(UnsafePath, match=r"is owned by uid 65534, not by uid 0"):
        run.create()
    assert run.path.stat().st_mode & 0o777 == 0o700  # and create() did not chmod theirs


def _opts(d: Path, certs: tuple[Path, Path, Path], **kw: object) -> UpOptions:
    server, client, clients = certs
    base: dict[str, object] = dict(
        run_root=d / "run",
        endpoint="tcp://127.0.0.1:23999",
        curve_server_secret=server,
        curve_clients=clients,
        policy_curve_secret=client,
    )
    return UpOptions(**{**base, **kw})  # type: ignore[arg-type]


def test_up_checks_every_key_file_and_the_run_dir_before_starting(
    d: Path, certs: tuple[Path, Path, Path]
) -> None:
    server, client, clients = certs
    validate(_opts(d, certs))  # all private: accepted
    cases = [
        (server, 0o606, "CURVE server secret"),
        (client, 0o660, None),  # group root, only root in it: fine
        (client, 0o602, "policy CURVE secret"),
        (clients, 0o777, "CURVE clients directory"),
        (clients / "client.key", 0o646, "CURVE clients directory: certificate"),
    ]
    for path, mode, what in cases:
        old = path.stat().st_mode & 0o7777
        path.chmod(mode)
        try:
            if what is None:
                validate(_opts(d, certs))
            else:
                with pytest.raises(UsageError, match=f"^{what} {path} is writable by"):
                    validate(_opts(d, certs))
        finally:
            path.chmod(old)
    (d / "run").mkdir(mode=0o700)
    (d / "run").chmod(0o757)
    with pytest.raises(UsageError, match=r"^run directory's parent .* is writable by every"):
        validate(_opts(d, certs))


def test_up_refuses_a_policy_without_an_authorized_curve_key(
    d: Path, certs: tuple[Path, Path, Path]
) -> None:
    with pytest.raises(UsageError, match="policy needs its own CURVE certificate"):
        validate(_opts(d, certs, policy_curve_secret=None))
    validate(_opts(d, certs, policy_curve_secret=None, policy=False))  # --no-policy: fine
    _, stranger = zmq.auth.create_certificates(d, "stranger")
    with pytest.raises(UsageError, match="its public key is not in --curve-clients"):
        validate(_opts(d, certs, policy_curve_secret=Path(stranger)))
    with pytest.raises(UsageError, match="holds no secret key"):
        validate(_opts(d, certs, policy_curve_secret=d / "client.key"))


def test_the_policy_gets_its_curve_keys_and_the_connect_address(
    d: Path, certs: tuple[Path, Path, Path]
) -> None:
    server, client, _ = certs
    opts = _opts(d, certs, endpoint="tcp://0.0.0.0:23999")
    flags = actor_flags(actor_spec("policy"), opts, validate(opts))
    assert flags[flags.index("--endpoint") + 1] == "tcp://127.0.0.1:23999"
    assert flags[flags.index("--curve-server-public") + 1] == str(server)
    assert flags[flags.index("--curve-client-secret") + 1] == str(client)


def _run_policy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KEXTLESS, "run", "policy", *args], capture_output=True, text=True, timeout=30
    )


def test_run_policy_refuses_unsafe_files_with_one_line(
    d: Path, certs: tuple[Path, Path, Path]
) -> None:
    server, client, _ = certs
    run = d / "run"
    cfg = _write(d / "kextless.toml", "[log]\nlevel = 'INFO'\n", 0o666)
    r = _run_policy("--config", str(cfg), "--run-dir", str(run))
    assert r.returncode == 2
    assert f"configuration file {cfg} is writable by every user" in r.stderr
    rules = _write(d / "rules.toml", RULES_BLOCK, 0o666)
    r = _run_policy("--rules", str(rules), "--run-dir", str(run))
    assert r.returncode == 2 and f"rules file {rules} is writable" in r.stderr
    rules.chmod(0o600)
    client.chmod(0o666)
    r = _run_policy(
        "--rules",
        str(rules),
        "--run-dir",
        str(run),
        "--endpoint",
        "tcp://127.0.0.1:23999",
        "--curve-server-public",
        str(server),
        "--curve-client-secret",
        str(client),
    )
    assert r.returncode == 2 and f"CURVE client certificate {client} is writable" in r.stderr
    r = _run_policy("--rules", str(rules), "--run-dir", str(run), "--endpoint", "tcp://[::1]:9")
    assert r.returncode == 2 and "a tcp endpoint needs CURVE" in r.stderr


@pytest.fixture
def empty_netns() -> Iterator[str]:
    """An empty namespace (`up` checks that it exists); nothing in it is ever guarded here."""
    name = f"kxs-{os.getpid()}-up"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], timeout=10)


@pytest.mark.root
def test_up_refuses_each_unsafe_file_in_one_line_and_starts_nothing(
    empty_netns: str, certs: tuple[Path, Path, Path]
) -> None:
    server, _, clients = certs
    top = Path(tempfile.mkdtemp(prefix="kxs-", dir="/tmp"))
    try:
        root = top / "run"
        rules = _write(top / "rules.toml", RULES_BLOCK)
        cfg = _write(top / "kextless.toml", "[verdicts]\ntimeout = 3\n")
        tcp = ["--endpoint", "tcp://127.0.0.1:23999", "--curve-server-secret", str(server),
               "--curve-clients", str(clients), "--no-policy"]  # fmt: skip
        cases: list[tuple[Path, int, list[str], str]] = [
            (cfg, 0o666, ["--config", str(cfg)], f"configuration file {cfg} is writable"),
            (rules, 0o646, ["--policy-rules", str(rules)], f"rules file {rules} is writable"),
            (server, 0o606, tcp, f"CURVE server secret {server} is writable"),
            (clients, 0o777, tcp, f"CURVE clients directory {clients} is writable"),
            (top, 0o777, [], f"run directory's parent {top} is writable"),
        ]
        for path, mode, args, message in cases:
            old = path.stat().st_mode & 0o7777
            path.chmod(mode)
            try:
                r = subprocess.run(
                    [*KEXTLESS, "up", "--netns", empty_netns, "--run-root", str(root), *args],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
            finally:
                path.chmod(old)
            assert r.returncode == 2, r.stdout + r.stderr
            assert r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr
            assert message in r.stderr
            assert not root.exists()  # nothing was made, so nothing was started
        root.mkdir(mode=0o700)
        os.chown(root, NOBODY, NOBODY)  # someone else's run root: they could swap our sockets
        r = subprocess.run(
            [*KEXTLESS, "up", "--netns", empty_netns, "--run-root", str(root)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2 and "is owned by nobody (uid 65534)" in r.stderr, r.stderr
        assert list(root.iterdir()) == []
    finally:
        shutil.rmtree(top, ignore_errors=True)
