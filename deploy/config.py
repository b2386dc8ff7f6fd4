"""Rendering supervisord.conf for one instance from supervisord.conf.template.

Every substituted value is escaped for supervisord's ini parser, or refused when no escaping
survives it, so a path or argument can never turn into another setting or a cut-off command.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import string
from collections.abc import Sequence
from pathlib import Path

from kextless.base.rundir import RuntimeDir
from kextless.base.supervisor import USERNAME
from kextless.deploy.errors import DeployError, UsageError
from kextless.deploy.options import Endpoint, UpOptions
from kextless.deploy.programs import Program
from kextless.deploy.supervisor_rpc import password_digest

#: supervisord's own files in the run dir, as the rendered config names them.
PIDFILE = "supervisord.pid"
SUPERVISORD_LOG = "supervisord.log"
TEMPLATE = Path(__file__).with_name("supervisord.conf.template")
_PROGRAM_MARKER = ";; @program"


def _conf_value(value: str) -> str:
    """Escape one value for supervisord's ini parser (expansion and inline comments)."""
    if "\n" in value or "\r" in value:
        raise UsageError(f"value {value!r} contains a line break")
    if re.search(r"\s[;#]", value):
        raise UsageError(f"value {value!r} would be cut by supervisord's inline comments")
    return value.replace("%", "%%")


def _env_value(env: dict[str, str]) -> str:
    for key, value in env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) or '"' in value:
            raise UsageError(f"environment {key}={value!r} cannot be passed to supervisord")
    return ",".join(f'{k}="{v}"' for k, v in env.items())


def load_template() -> str:
    """Read beside this module: importlib.resources fails when the editable install's finder
    turns `deploy` into a namespace package (seen when run from outside the checkout)."""
    try:
        return TEMPLATE.read_text()
    except OSError as e:
        raise DeployError(f"cannot read the supervisord template {TEMPLATE}: {e}") from None


def current_user() -> str:
    """The name supervisord's `user =` gets: whoever runs `up` (so it never changes uid)."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a uid without a passwd entry (containers): supervisord takes the number
        return str(os.geteuid())


def render_config(
    run: RuntimeDir,
    programs: Sequence[Program],
    env: dict[str, str],
    identifier: str = "kextless",
    *,
    password: str,
    user: str | None = None,
) -> str:
    """The supervisord.conf text for this instance (one [program:x] section per program);
    `password` protects its socket (supervisor_rpc.new_password)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{16,}", password):
        raise UsageError("the supervisord password must be 16+ characters of [A-Za-z0-9_-]")
    if "%" in str(run.path):
        # supervisord expands log paths twice, so no escaping of '%' survives in them.
        raise UsageError(f"run directory {str(run.path)!r}: '%' is not supported in the path")
    head, marker, block = load_template().partition(_PROGRAM_MARKER)
    if not marker:
        raise DeployError(f"supervisord.conf.template lacks the {_PROGRAM_MARKER!r} marker")
    block = block.split("\n", 1)[1]  # drop the rest of the marker line
    names = [p.name for p in programs]
    if len(set(names)) != len(names) or not programs:
        raise UsageError(f"program names must be unique and non-empty: {names}")
    out = [
        string.Template(head).substitute(
            run_dir=_conf_value(str(run.path)),
            socket=_conf_value(str(run.supervisor_socket)),
            logfile=_conf_value(str(run.path / SUPERVISORD_LOG)),
            pidfile=_conf_value(str(run.path / PIDFILE)),
            log_dir=_conf_value(str(run.log_dir)),
            identifier=_conf_value(identifier),
            environment=_conf_value(_env_value(env)),
            user=_conf_value(user or current_user()),
            username=USERNAME,
            password=password,
            password_digest=password_digest(password),
        )
    ]
    for prog in sorted(programs, key=lambda p: p.priority):
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", prog.name):
            raise UsageError(f"program name {prog.name!r} is not usable in supervisord")
        out.append(
            string.Template(block).substitute(
                name=prog.name,
                command=_conf_value(shlex.join(prog.argv)),
                priority=prog.priority,
                startsecs=prog.startsecs,
                stopwaitsecs=prog.stopwaitsecs,
                logfile=_conf_value(str(run.log_dir / f"{prog.name}.log")),
            )
        )
    return "\n".join(out)


def program_env(opts: UpOptions, endpoint: Endpoint) -> dict[str, str]:
    """What every program gets besides its argv (which names the run dir): unbuffered logs,
    so each event line reaches supervisord's log at once."""
    return {"PYTHONUNBUFFERED": "1"}


def write_config(run: RuntimeDir, text: str) -> None:
    """Owner-only, like the run dir: the config names every program's argv."""
    fd = os.open(run.supervisor_conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
