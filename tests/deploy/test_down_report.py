"""`kextless down` says what it keeps (the run directory and its logs) and `purge` removes it,
on a run directory with no running instance (no root needed; the root tests in
test_deploy_process.py stop real ones)."""

from __future__ import annotations

from pathlib import Path

from kextless.base.rundir import RuntimeDir
from kextless.deploy.down import down


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
