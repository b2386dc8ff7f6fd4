"""The instance file (instance.json in the run dir): what `up` started, for `status` and `down`.

It outlives a crashed supervisord, so `down` still knows the PIDs, argvs and endpoint to clean
up. A file that is unreadable, broken or not ours counts as no file: `down` then finds the
processes by argv alone, and `up` replaces it.
"""

from __future__ import annotations

import os

import msgspec

from kextless.base.rundir import RuntimeDir

INSTANCE_FILE = "instance.json"


class ProgramRecord(msgspec.Struct, kw_only=True):
    """One program as `up` configured it; pid 0 until it was seen RUNNING."""

    argv: list[str]
    priority: int
    pid: int = 0


class Instance(msgspec.Struct, kw_only=True):
    """What `up` writes before starting supervisord, and updates with the PIDs it learns."""

    netns: str | None
    run_dir: str
    endpoint: str
    #: Where a local client connects (a wildcard tcp bind address made concrete).
    connect: str = ""
    #: The broker's CURVE certificate, whose public key `status` needs for a tcp endpoint.
    curve_server_secret: str | None = None
    #: In start order (lowest priority first); `status` lists programs in this order.
    programs: dict[str, ProgramRecord] = msgspec.field(default_factory=dict)
    supervisord_pid: int = 0
    started: float = 0.0

    @property
    def client_url(self) -> str:
        """Where `status` connects: `connect`, else the endpoint the broker binds."""
        return self.connect or self.endpoint


def read_instance(run: RuntimeDir) -> Instance | None:
    """The instance file, or None when there is none we can use (see the module docstring)."""
    try:
        data = (run.path / INSTANCE_FILE).read_bytes()
        return msgspec.json.decode(data, type=Instance)
    except (OSError, msgspec.DecodeError):
        return None


def write_instance(run: RuntimeDir, inst: Instance) -> None:
    """Written atomically, readable only by the owner (it names the endpoint and key paths)."""
    tmp = run.path / (INSTANCE_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(msgspec.json.format(msgspec.json.encode(inst), indent=2))
    os.replace(tmp, run.path / INSTANCE_FILE)


def instance_name(netns: str | None) -> str:
    """How messages name an instance: by its namespace, or the host's."""
    return f"netns {netns}" if netns else "the host namespace"
