"""`kextless up`: start one supervisord with every program of an instance and return once the
namespace is really guarded, or fail with the reason.

supervisord restarts a crashed actor and owns its logs; `up` only renders its config into the
instance's 0700 run directory, starts it and waits, recording what it started in the instance
file so `status` and `down` find it again.

RUNNING is not enough: a capture is RUNNING seconds before its divert handle is open, and a
connection made in that gap is never decided. So `up` then waits (same --timeout) until every
actor has reported its start work done (`status.not_ready`). A program that cannot start fails
`up` and leaves nothing behind; an instance that runs but does not become ready in time fails
`up` too, but is left running: tearing it down would surely leave the namespace unguarded,
while its guard holds what is not diverted yet and a slow actor may still come up.
"""

from __future__ import annotations

import contextlib
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kextless.base.rundir import RuntimeDir
from kextless.deploy.config import SUPERVISORD_LOG, program_env, render_config, write_config
from kextless.deploy.down import remove_state, teardown
from kextless.deploy.errors import DeployError, UsageError
from kextless.deploy.filters import divert_filters, interface_coverage
from kextless.deploy.instance import (
    Instance,
    ProgramRecord,
    instance_name,
    read_instance,
    write_instance,
)
from kextless.deploy.options import UpOptions, check_host, validate
from kextless.deploy.processes import instance_processes
from kextless.deploy.programs import Program, check_actor_args, programs_for
from kextless.deploy.status import (
    STATUS_TIMEOUT,
    broker_counters,
    interfaces,
    not_ready,
    reported,
)
from kextless.deploy.supervisor_rpc import RPC_ERRORS, new_password, rpc, supervisord_alive


@dataclass
class UpResult:
    """What `up` reports (and tests inspect): the endpoint and each program's pid."""

    endpoint: str
    supervisord_pid: int
    pids: dict[str, int] = field(default_factory=dict)
    #: Seconds from up's start until each awaited actor was ready, in the order they became so.
    ready_s: dict[str, float] = field(default_factory=dict)
    #: Seconds from up's start until every program was RUNNING, and until it returned.
    running_s: float = 0.0
    total_s: float = 0.0


class NotReady(DeployError):
    """The instance runs but did not become ready in time; it is left running (fail closed)."""


def up(
    opts: UpOptions,
    programs: Sequence[Program] | None = None,
    out: Callable[[str], None] = print,
    await_ready: Collection[str] | None = None,
) -> UpResult:
    """Start supervisord with every program and return once every actor is ready (status.
    not_ready is empty). A program that does not start raises and leaves nothing behind; an
    instance not ready by the deadline raises NotReady and is left running.

    `programs` replaces the actor list (tests prove the mechanics with trivial programs); only
    the real actors guard anything, so only they need --netns or --host and checked rules.
    `await_ready`: the programs whose readiness to wait for (None: every actor; a test's
    stand-in that merely carries an actor's name reports nothing, so it passes ()).
    """
    endpoint = validate(opts)
    check_actor_args(opts)
    if programs is None:
        check_host(opts)
        check_rules(opts)
    run = opts.run_dir
    progs = list(programs) if programs is not None else programs_for(opts)
    for prog in progs:
        if str(run.path) not in prog.argv:
            raise UsageError(
                f"program {prog.name}: its argv must name the run dir {run.path} "
                "(that is how `down` finds it again if supervisord is gone)"
            )
    if supervisord_alive(run):
        raise DeployError(
            f"already running for {instance_name(opts.netns)} ({run.path}); "
            f"run `kextless down{_flags(opts)}` first"
        )
    leftovers = instance_processes(run) if run.path.is_dir() else []
    if leftovers:
        raise DeployError(
            f"processes of a previous instance are still alive: {leftovers}; "
            f"run `kextless down{_flags(opts)}` first"
        )
    remove_state(run, read_instance(run))
    if opts.netns is not None:
        # Orphans of a killed capture still run on every packet; say so before adding ours.
        with contextlib.suppress(DeployError, OSError, subprocess.SubprocessError):
            for line in divert_filters(opts.netns):
                out(f"WARNING: divert filter already attached in netns {opts.netns}: {line}")
    run.create()
    run.log_dir.mkdir(mode=0o700, exist_ok=True)
    identifier = f"kextless-{opts.netns or 'host'}"
    password = new_password(run)
    env = program_env(opts, endpoint)
    write_config(run, render_config(run, progs, env, identifier, password=password))
    instance = Instance(
        netns=opts.netns,
        run_dir=str(run.path),
        endpoint=endpoint.url,
        connect=endpoint.connect_url,
        curve_server_secret=str(opts.curve_server_secret or "") or None,
        programs={
            p.name: ProgramRecord(argv=list(p.argv), priority=p.priority)
            for p in sorted(progs, key=lambda p: p.priority)
        },
        started=time.time(),
    )
    write_instance(run, instance)
    t0 = time.monotonic()
    deadline = t0 + opts.timeout
    try:
        _launch_supervisord(run)
        instance.supervisord_pid = int(rpc(run).supervisor.getPID())
        write_instance(run, instance)
        infos = _wait_running(run, [p.name for p in progs], deadline, opts.timeout)
    except BaseException:
        report = teardown(run, instance, opts.netns, check_filters=opts.netns is not None)
        for line in report.problems:
            out(f"kextless up: cleanup: {line}")
        raise
    for info in infos:
        instance.programs[info["name"]].pid = info["pid"]
    write_instance(run, instance)
    result = UpResult(
        endpoint.connect_url, instance.supervisord_pid, {i["name"]: i["pid"] for i in infos}
    )
    result.running_s = time.monotonic() - t0
    out(f"kextless is running for {instance_name(opts.netns)} (run dir {run.path})")
    for info in infos:
        out(f"  {info['name']:<10} RUNNING  pid {info['pid']}")
    awaited = {n: pid for n, pid in result.pids.items() if await_ready is None or n in await_ready}
    result.ready_s = _wait_ready(run, instance, awaited, opts, t0, deadline, out)
    result.total_s = time.monotonic() - t0
    out(f"client endpoint: {endpoint.connect_url}")
    return result


def rules_file(opts: UpOptions) -> Path | None:
    """The rules the policy will load: --policy-rules, else the shipped default (if any)."""
    if not opts.policy:
        return None
    if opts.policy_rules is not None:
        return opts.policy_rules
    from kextless.actors.policy import rules

    default: Path | None = getattr(rules, "DEFAULT_RULES_FILE", None)
    return default if default is not None and default.is_file() else None


def check_rules(opts: UpOptions) -> None:
    """Load the policy's rules the way it will, before anything starts: a broken file is one
    clear line now, not a policy that exits five times under supervisord ~10 s later."""
    path = rules_file(opts)
    if path is None:
        return
    from kextless.actors.policy.rules import RulesError, load

    try:
        load(path)
    except RulesError as exc:
        message = str(exc).strip().replace("\n", " ")
        where = "" if str(path) in message else f"{path}: "
        raise UsageError(f"policy rules: {where}{message}") from None


def _launch_supervisord(run: RuntimeDir) -> None:
    """Run supervisord with this interpreter; it daemonizes, so this returns once it forked."""
    from supervisor import supervisord  # noqa: F401  (fail early and clearly if not installed)

    proc = subprocess.run(
        [sys.executable, "-m", "supervisor.supervisord", "-c", str(run.supervisor_conf)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        umask=0o077,
    )
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip() or log_tail(run.path / SUPERVISORD_LOG)
        raise DeployError(f"supervisord did not start (exit {proc.returncode}): {detail}")


def _wait_running(
    run: RuntimeDir, names: Sequence[str], deadline: float, timeout: float
) -> list[dict[str, Any]]:
    """Poll until every program is RUNNING; raise naming the first that failed or hung."""
    proxy = rpc(run)
    infos: list[dict[str, Any]] = []
    while True:
        try:
            infos = proxy.supervisor.getAllProcessInfo()
        except RPC_ERRORS:
            if time.monotonic() > deadline:
                raise DeployError("supervisord did not answer on its socket in time") from None
            time.sleep(0.1)
            continue
        by_name = {i["name"]: i for i in infos}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise DeployError(f"supervisord does not know program(s) {missing}")
        failed = [
            by_name[n]
            for n in names
            if by_name[n]["statename"] in ("FATAL", "EXITED", "STOPPED", "UNKNOWN")
        ]
        if failed:
            raise _program_failed(run, failed[0])
        if all(by_name[n]["statename"] == "RUNNING" for n in names):
            return [by_name[n] for n in names]
        if time.monotonic() > deadline:
            slow = next(by_name[n] for n in names if by_name[n]["statename"] != "RUNNING")
            raise _program_failed(run, slow, f"not RUNNING after {timeout:g} s")
        time.sleep(0.1)


#: How often `up` asks the broker (and, once the capture reported, reads the interfaces)
#: while it waits for readiness: each look costs a few ms of a CPU the actors start on.
_READY_POLL_S = 0.1


def _wait_ready(
    run: RuntimeDir,
    instance: Instance,
    pids: dict[str, int],
    opts: UpOptions,
    t0: float,
    deadline: float,
    out: Callable[[str], None],
) -> dict[str, float]:
    """Poll until `status.not_ready` is empty, printing what it waits for and, per actor, when
    it became ready; NotReady naming what is not, with its log tail, at the deadline."""
    pending = not_ready(pids, None, None)
    if not pending:
        return {}
    cert = opts.policy_curve_secret
    if instance.client_url.startswith("tcp://") and cert is None:
        # The broker answers `S` over CURVE only; with no client certificate of ours there
        # is no asking it, so readiness is not checked (the guard still fails closed).
        out("not waiting until ready: a tcp endpoint without a client certificate")
        return {}
    out(f"waiting until ready: {', '.join(pending)}")
    proxy = rpc(run)
    ready: dict[str, float] = {}
    restarted: dict[str, str] = {}
    while True:
        broker: dict[str, Any] | None
        try:
            broker = broker_counters(instance, timeout=min(STATUS_TIMEOUT, 0.5), client_cert=cert)
        except DeployError:
            broker = None
        ifaces = None
        capture = (
            reported(broker, "capture", pids["capture"]) if broker and "capture" in pids else None
        )
        if capture is not None and capture.get("counters"):
            with contextlib.suppress(DeployError):
                ifaces = interfaces(opts.netns)
        waiting = not_ready(pids, broker, ifaces)
        now = time.monotonic()
        for name in pending:
            if name in waiting:
                ready.pop(name, None)  # ready since its last (re)start only
            elif name not in ready:
                ready[name] = now - t0
        if not waiting:
            break
        _follow_restarts(proxy, pids, waiting, restarted)
        gave_up = [n for n, state in restarted.items() if n in waiting and state == "FATAL"]
        if now > deadline or gave_up:
            for name, state in restarted.items():
                if name in waiting:
                    waiting[name] += f"; it exited since up started it (now {state})"
            headline = (
                f"not ready after {opts.timeout:g} s (--timeout):"
                if not gave_up
                else f"not ready: supervisord gave up restarting {', '.join(gave_up)}:"
            )
            logs = [*(["broker"] if broker is None and "broker" in pids else []), *waiting]
            raise _not_ready(run, opts, headline, waiting, ready, logs)
        time.sleep(_READY_POLL_S)
    out(
        f"ready after {time.monotonic() - t0:.1f} s: "
        + ", ".join(f"{name} {secs:.1f} s" for name, secs in ready.items())
    )
    return ready


def _follow_restarts(
    proxy: Any, pids: dict[str, int], waiting: dict[str, str], restarted: dict[str, str]
) -> None:
    """An awaited program that died (supervisord restarts it under a new pid, or gives up)
    never reports as the pid we wait for: wait for its successor instead, and remember it."""
    with contextlib.suppress(*RPC_ERRORS):
        for info in proxy.supervisor.getAllProcessInfo():
            name = info["name"]
            if name in waiting and info["pid"] != pids.get(name):
                restarted[name] = info["statename"]
                if info["pid"]:
                    pids[name] = info["pid"]


def _not_ready(
    run: RuntimeDir,
    opts: UpOptions,
    headline: str,
    waiting: dict[str, str],
    ready: dict[str, float],
    logs: Sequence[str],
) -> NotReady:
    """The failure: what is not ready and why, the tail of each log that may say why (the
    broker's too when it did not answer), and what is left running."""
    lines = [headline]
    lines += [f"  {name}: {why}" for name, why in waiting.items()]
    if ready:
        lines.append("  ready: " + ", ".join(f"{n} ({s:.1f} s)" for n, s in ready.items()))
    for name in logs:
        log = run.log_dir / f"{name}.log"
        lines.append(f"--- last lines of {log} ---\n{log_tail(log)}")
    lines.append(_left_running(opts))
    return NotReady("\n".join(lines))


def _left_running(opts: UpOptions) -> str:
    """What the user should know about the instance `up` leaves running: is it fail closed?"""
    held = ""
    if opts.netns is not None:
        try:
            open_links = [c.ifname for c in interface_coverage(opts.netns) if not c.closed]
        except DeployError:
            open_links = []
        if open_links:
            held = (
                f" WARNING: {', '.join(open_links)} pass(es) packets UNEXAMINED "
                "(no divert program and no guard on a hook)."
            )
        else:
            held = " Its guard drops what is not diverted (fail closed)."
    return (
        f"kextless is left running.{held} Look with `kextless status{_flags(opts)}`, "
        f"stop it with `kextless down{_flags(opts)}`."
    )


def _program_failed(run: RuntimeDir, info: dict[str, Any], why: str = "") -> DeployError:
    why = why or f"{info['statename']}" + (f" ({info['spawnerr']})" if info["spawnerr"] else "")
    log = run.log_dir / f"{info['name']}.log"
    return DeployError(
        f"program {info['name']} failed to start: {why}\n"
        f"--- last lines of {log} ---\n{log_tail(log)}"
    )


def log_tail(path: Path, lines: int = 15) -> str:
    """The end of a log, for a failure message that says why without opening files."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _flags(opts: UpOptions) -> str:
    """The --netns/--run-root part of a command we suggest, so it hits this instance."""
    flags = [
        *(["--netns", opts.netns] if opts.netns else []),
        *(["--run-root", str(opts.run_root)] if opts.run_root else []),
    ]
    return " " + shlex.join(flags) if flags else ""
