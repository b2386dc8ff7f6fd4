"""`kextless down` says what it keeps (the run directory and its logs) and `purge` removes it,
removes the supervisor password with the other state, and names each SIGKILLed program once,
on a run directory with no running instance (no root needed; the root tests in
test_deploy_process.py stop real ones)."""

from __future__ import annotations

from pathlib import Path

from kextless.base.rundir import RuntimeDir
from kextless.deploy.down import _sigkilled_since, down
from kextless.deploy.supervisor_rpc import SECRET_FILE, new_password


def _run_dir_with_logs(root: Path) -> RuntimeDir:
    run = RuntimeDir.for_instance(None, root).create()
    run.log_dir.mkdir(exist_ok=True)
    for name in ("broker", "ale"):
        (run.log_dir / f"{name}.log").write_text(f"{name} said something\n")
    return run


def test_down_says_it_keeps_the_run_dir_and_its_logs(tmp_path: Path) -> None:
    run = _run_dir_with_logs(tmp_path)
    lines: list[str] = []
    report = down(None, tmp_path, out=lines.append)
    assert report.problems == [] and report.purged is None
    assert run.path.is_dir() and (run.log_dir / "ale.log").exists()
    assert lines[-1] == (
        f"kept: the run directory {run.path} with each process's log in {run.log_dir}; "
        "`kextless down --purge` removes it"
    )


def test_down_purge_removes_the_run_dir(tmp_path: Path) -> None:
    run = _run_dir_with_logs(tmp_path)
    lines: list[str] = []
    report = down(None, tmp_path, out=lines.append, purge=True)
    assert report.problems == [] and report.kept == []
    assert report.purged == str(run.path) and not run.path.exists()
    assert lines[-1] == f"removed the run directory {run.path} (logs included)"
    assert tmp_path.is_dir()  # only the instance's own directory goes
    again = down(None, tmp_path, out=lines.append, purge=True)  # idempotent
    assert again.problems == [] and again.purged is None


def test_a_symlinked_run_dir_is_never_purged(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious").write_text("x")
    root = tmp_path / "root"
    root.mkdir()
    RuntimeDir.for_instance(None, root).path.symlink_to(target)
    report = down(None, root, out=lambda _line: None, purge=True)
    assert report.purged is None and (target / "precious").exists()


def test_down_removes_the_supervisor_password_with_the_other_state(tmp_path: Path) -> None:
    run = _run_dir_with_logs(tmp_path)
    secret = run.path / SECRET_FILE
    new_password(run)
    (run.path / (SECRET_FILE + ".tmp")).write_text("half-written\n")
    report = down(None, tmp_path, out=lambda _line: None)
    assert report.problems == []
    assert not secret.exists() and not (run.path / (SECRET_FILE + ".tmp")).exists()
    assert (run.log_dir / "broker.log").exists()  # the logs stay


def test_a_kill_supervisord_logged_twice_is_listed_once(tmp_path: Path) -> None:
    log = tmp_path / "supervisord.log"
    log.write_text(
        "2026-12-01 10:00:00,000 INFO before: killing 'old' (7) with SIGKILL\n"
        "2026-12-01 10:00:01,000 WARN killing 'capture' (42) with SIGKILL\n"
        "2026-12-01 10:00:01,001 WARN killing 'capture' (42) with SIGKILL\n"
        "2026-12-01 10:00:01,002 WARN killing 'lifecycle' (43) with SIGKILL\n"
    )
    start = len(log.read_bytes().splitlines(keepends=True)[0])
    assert _sigkilled_since(log, start) == ["capture (pid 42)", "lifecycle (pid 43)"]
    assert _sigkilled_since(tmp_path / "missing.log", 0) == []
