"""Talking to an instance's supervisord: XML-RPC over the unix socket in its run dir.

supervisor ships the transport (`SupervisorTransport`); its unix connection opens a socket
without a timeout, so a stopped or hung supervisord would hang `status` and `down` forever.
The one change here is a connection whose socket has the timeout the caller asked for.

The socket is owner-only (chmod 0700 in a 0700 directory) and also asks for a password: a
random one `up` writes to the run dir (mode 0600) and renders into supervisord.conf, so no
other local user (nor a process that only reaches the socket) can drive supervisord, and
supervisord logs no CRIT line about an unauthenticated server.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
import xmlrpc.client
from pathlib import Path

from supervisor.xmlrpc import Faults

from kextless.base.rundir import RuntimeDir

# The transport lives in base (the capture asks it too); deploy's callers keep these names here.
from kextless.base.supervisor import RPC_ERRORS as RPC_ERRORS
from kextless.base.supervisor import RPC_TIMEOUT as RPC_TIMEOUT
from kextless.base.supervisor import SECRET_FILE as SECRET_FILE
from kextless.base.supervisor import USERNAME as USERNAME
from kextless.base.supervisor import read_password as read_password
from kextless.base.supervisor import rpc as rpc
from kextless.deploy.errors import DeployError
from kextless.deploy.instance import instance_name, read_instance


def new_password(run: RuntimeDir) -> str:
    """A fresh random password for this instance's socket, written owner-only (0600)."""
    password = secrets.token_urlsafe(24)  # [A-Za-z0-9_-]: nothing supervisord's ini mangles
    tmp = run.path / (SECRET_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    os.replace(tmp, run.path / SECRET_FILE)
    return password


def password_digest(password: str) -> str:
    """supervisord's `{SHA}` form, so its own section holds no reusable plain password."""
    return "{SHA}" + hashlib.sha1(password.encode()).hexdigest()


def supervisord_alive(run: RuntimeDir, timeout: float = 2.0) -> bool:
    """True when a supervisord answers on this instance's socket within `timeout` seconds."""
    if not run.supervisor_socket.exists():
        return False
    try:
        state: str = rpc(run, timeout).supervisor.getState()["statename"]
    except RPC_ERRORS:
        return False
    return state == "RUNNING"


#: The policy's log lines for a SIGHUP reload, done or refused (actors/policy/main.py).
_RELOADED = "rules reloaded (SIGHUP)"
_REFUSED = "rules reload (SIGHUP) refused"


def signal_policy(netns: str | None, run_root: Path | None, wait: float = 3.0) -> tuple[bool, str]:
    """`kextless reload`: the instance's policy gets SIGHUP from its supervisord (which knows
    the live pid, also after a restart) and reloads its rules. Its log then says whether the
    new rules were taken or refused (the last good ones stay): (taken, what to tell the user).
    """
    from kextless.deploy.options import check_netns_name

    check_netns_name(netns)
    run = RuntimeDir.for_instance(netns, run_root)
    name = instance_name(netns)
    inst = read_instance(run)
    if inst is None or not supervisord_alive(run):
        raise DeployError(f"kextless is not running for {name} ({run.path})")
    if "policy" not in inst.programs:
        raise DeployError(
            f"no policy runs for {name} (started with --no-policy): nothing to reload; "
            "an external client reloads its own rules"
        )
    log = run.log_dir / "policy.log"
    offset = log.stat().st_size if log.exists() else 0
    proxy = rpc(run)
    try:
        proxy.supervisor.signalProcess("policy", "HUP")
        pid = int(proxy.supervisor.getProcessInfo("policy")["pid"])
    except xmlrpc.client.Fault as e:
        if e.faultCode in (Faults.NOT_RUNNING, Faults.BAD_NAME):
            raise DeployError(
                f"the policy of {name} is not running (see `kextless status`)"
            ) from None
        raise DeployError(f"supervisord refused to signal the policy: {e.faultString}") from None
    except RPC_ERRORS as e:
        raise DeployError(f"supervisord of {name} did not answer: {e}") from None
    sent = f"sent SIGHUP to the policy of {name} (pid {pid})"
    deadline = time.monotonic() + wait
    while True:
        line = _reload_line(log, offset)
        if line is not None:
            return _REFUSED not in line, f"{sent}: {line}"
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    try:
        now = int(proxy.supervisor.getProcessInfo("policy")["pid"])
    except (*RPC_ERRORS, KeyError, ValueError):
        now = pid
    if now != pid:  # SIGHUP before its handler was installed ends it; supervisord restarts it
        return True, (
            f"{sent}, which ended it before it was ready; supervisord restarted it (pid {now}), "
            "and it read its rules file anew"
        )
    return True, f"{sent}; it has not logged the reload yet (see {log})"


def _reload_line(log: Path, offset: int) -> str | None:
    """The policy's first reload line written after `offset`, without its time stamp."""
    try:
        with log.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        for marker in (_RELOADED, _REFUSED):
            if marker in line:
                return line[line.index(marker) :]
    return None
