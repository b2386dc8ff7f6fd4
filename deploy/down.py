"""`kextless down`: stop an instance and prove that nothing of it is left behind.

Stopping supervisord stops every program; what survives it (orphans of a killed supervisord,
sockets, divert filters in the namespace) is ended or removed, and reported, so a non-empty
report always means something needed cleaning up. Divert programs and the nft guard tables a
killed capture left in the namespace are removed inside it and listed as REMOVED (the namespace
is clean afterwards, so they do not fail `down`); one that cannot be removed is a LEFTOVER
problem.

The run directory stays, with every process's log (RUN/logs/NAME.log) for the post-mortem, and
the report says so; `purge=True` (`kextless down --purge`) removes it too, once nothing of the
instance is left running.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kextless.actors.capture import orphans
from kextless.base.rundir import RuntimeDir
from kextless.deploy.config import PIDFILE, SUPERVISORD_LOG
from kextless.deploy.errors import DeployError
from kextless.deploy.filters import remove_divert_filters
from kextless.deploy.instance import INSTANCE_FILE, Instance, instance_name, read_instance
from kextless.deploy.options import NETNS_DIR, check_netns_name
from kextless.deploy.processes import (
    argv_of,
    instance_processes,
    pid_alive,
    pid_is_ours,
    program_of,
    wait_gone,
)
from kextless.deploy.programs import STOPWAITSECS
from kextless.deploy.supervisor_rpc import RPC_ERRORS, SECRET_FILE, rpc, supervisord_alive


@dataclass
class DownReport:
    """What `down` found: `stopped` is informational, any `problems` mean something was left."""

    was_running: bool = False
    stopped: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: Programs that ignored SIGTERM for stopwaitsecs and were killed (a bug in that program:
    #: a killed capture cannot detach its divert filters).
    killed: list[str] = field(default_factory=list)
    #: Divert programs left in the namespace (a SIGKILLed capture's) that `down` removed.
    removed: list[str] = field(default_factory=list)
    #: The kernel flow cache and fail-closed guard (kextless_pre / kextless_guard) that `down`
    #: removed: a capture leaves them attached on purpose (its successor adopts them, and the
    #: guard keeps the namespace fail closed while no capture runs), so they are no leftover.
    cache_removed: list[str] = field(default_factory=list)
    #: What `down` keeps on purpose: the run directory and its logs (empty after a purge).
    kept: list[str] = field(default_factory=list)
    #: The run directory `down --purge` removed (None: nothing was purged).
    purged: str | None = None
    #: Pids of the instance still alive after `down` (supervisord or a program): no purge then.
    alive: list[int] = field(default_factory=list)


def down(
    netns: str | None = None,
    run_root: Path | None = None,
    out: Callable[[str], None] = print,
    purge: bool = False,
) -> DownReport:
    """Stop the instance if any; idempotent. The report lists anything that was left behind,
    and what is kept (the run directory and logs), or removes that too with `purge`."""
    check_netns_name(netns)
    run = RuntimeDir.for_instance(netns, run_root)
    inst = read_instance(run)
    report = teardown(run, inst, netns, check_filters=netns is not None)
    _keep_or_purge(run, report, purge)
    if not report.was_running and inst is None:
        out(f"kextless is not running for {instance_name(netns)}")
    else:
        out(
            f"kextless stopped for {instance_name(netns)}: "
            + (", ".join(report.stopped) or "no programs were running")
        )
    for name in report.killed:
        out(f"WARNING: {name} ignored SIGTERM for its stopwaitsecs and was SIGKILLed")
    if report.cache_removed:
        links = sorted({what.split()[0] for what in report.cache_removed})
        out(f"removed the kernel flow cache and fail-closed guard from: {', '.join(links)}")
    for what in report.removed:
        table = what.removeprefix("nft table ")
        if table != what:
            out(f"REMOVED: nft table left in netns {netns}: {table}")
        else:
            out(f"REMOVED: divert program left in netns {netns}: {what}")
    for problem in report.problems:
        out(f"LEFTOVER: {problem}")
    if report.purged:
        out(f"removed the run directory {report.purged} (logs included)")
    for what in report.kept:
        out(f"kept: {what}")
    return report


def _keep_or_purge(run: RuntimeDir, report: DownReport, purge: bool) -> None:
    """Remove the run directory (purge, and nothing left running), or say what it keeps."""
    path = run.path
    if not path.is_dir() or path.is_symlink():
        return
    if purge and not report.alive:
        try:
            shutil.rmtree(path)
        except OSError as e:
            report.problems.append(f"could not remove the run directory {path}: {e}")
        else:
            report.purged = str(path)
            return
    where = f"the run directory {path}"
    if run.log_dir.is_dir() and any(run.log_dir.glob("*.log")):
        where += f" with each process's log in {run.log_dir}"
    if purge:
        report.kept.append(f"{where}: not purged, a process of the instance is still running")
    else:
        report.kept.append(f"{where}; `kextless down --purge` removes it")


def teardown(
    run: RuntimeDir, inst: Instance | None, netns: str | None, check_filters: bool
) -> DownReport:
    """Stop supervisord (and so every program), then prove nothing is left behind. Also what a
    failed `up` runs, so a half-started instance is cleaned up the same way."""
    report = DownReport()
    records = inst.programs if inst is not None else {}
    pids = {name: rec.pid for name, rec in records.items()}
    sup_pid = inst.supervisord_pid if inst is not None else 0
    stopwait = STOPWAITSECS * max(1, len(pids)) + 10
    log = run.path / SUPERVISORD_LOG
    log_start = log.stat().st_size if log.exists() else 0
    if supervisord_alive(run):
        report.was_running = True
        proxy = rpc(run)
        with contextlib.suppress(*RPC_ERRORS):
            sup_pid = int(proxy.supervisor.getPID())
            for info in proxy.supervisor.getAllProcessInfo():
                if info["pid"]:
                    pids[info["name"]] = info["pid"]
        try:
            proxy.supervisor.shutdown()
        except RPC_ERRORS as e:
            report.problems.append(f"supervisor.shutdown failed: {e}")
    else:
        sup_pid = sup_pid or _read_pidfile(run)
        if sup_pid and pid_is_ours(sup_pid, run):
            # It lives but does not answer: SIGTERM makes supervisord stop its programs too.
            report.was_running = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(sup_pid, signal.SIGTERM)
    if sup_pid and pid_alive(sup_pid):
        report.was_running = True
        if wait_gone([sup_pid], stopwait):
            report.alive.append(sup_pid)
            report.problems.append(f"supervisord pid {sup_pid} did not exit in {stopwait} s")
    names = {pid: name for name, pid in pids.items() if pid}
    argvs = {name: rec.argv for name, rec in records.items()}
    left = instance_processes(run) if run.path.is_dir() else []
    for pid in left:
        report.was_running = True
        name = names.get(pid) or program_of(pid, argvs)
        what = f"program {name}" if name else f"process ({shlex.join(argv_of(pid))[:200]})"
        report.problems.append(f"{what} pid {pid} outlived supervisord; killed")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in wait_gone(left, 5):
        report.alive.append(pid)
        report.problems.append(f"pid {pid} survives SIGKILL")
    report.stopped += [f"{name} (pid {pid})" for pid, name in names.items() if pid not in left]
    report.killed = _sigkilled_since(log, log_start)
    report.problems += remove_state(run, inst)
    if check_filters and netns is not None and (NETNS_DIR / netns).exists():
        try:
            removed, errors = remove_divert_filters(netns)
        except (DeployError, OSError) as e:
            report.problems.append(f"could not check divert filters: {e}")
        else:
            for what in removed:
                ours = what.endswith((" kextless_pre", " kextless_guard"))
                (report.cache_removed if ours else report.removed).append(what)
            report.problems += [f"divert filter left in netns {netns}: {e}" for e in errors]
        # A killed capture's nft guard (nftguard.py) still drops IP on every later link.
        removed, errors = orphans.remove_nft_tables(netns)
        report.removed += removed
        report.problems += [f"nft table left in netns {netns}: {e}" for e in errors]
    return report


def remove_state(run: RuntimeDir, inst: Instance | None) -> list[str]:
    """Remove sockets, config, pidfile, instance file and the supervisor socket's password;
    keep logs for the post-mortem."""
    problems = []
    paths = [
        run.supervisor_conf,
        run.path / PIDFILE,
        run.path / INSTANCE_FILE,
        run.path / SECRET_FILE,
        run.path / (SECRET_FILE + ".tmp"),
    ]
    if run.path.is_dir():
        paths += [p for p in run.path.iterdir() if p.is_socket()]
    endpoint = inst.endpoint if inst is not None else ""
    if endpoint.startswith("ipc://"):
        ep = Path(endpoint[len("ipc://") :])
        if ep.is_socket():
            paths.append(ep)
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            problems.append(f"could not remove {path}: {e}")
    return problems


def _read_pidfile(run: RuntimeDir) -> int:
    try:
        return int((run.path / PIDFILE).read_text().strip())
    except (OSError, ValueError):
        return 0


_SIGKILL_LINE = re.compile(r"killing '([^']+)' \((\d+)\) with SIGKILL")


def _sigkilled_since(log: Path, offset: int) -> list[str]:
    """Programs supervisord had to SIGKILL while stopping, from its own log."""
    try:
        with log.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    # Under load supervisord may log the same kill twice: each pid is listed once.
    found = (f"{m[1]} (pid {m[2]})" for m in re.finditer(_SIGKILL_LINE, text))
    return list(dict.fromkeys(found))
