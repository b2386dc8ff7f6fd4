"""Where a running kextless keeps its sockets, config and logs.

One directory per instance (per network namespace), entered only by its owner, so the control
socket is not open to every local process. Every process derives its endpoints from it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from kextless.base.security import UnsafePath, check_private

ROOT_ENV = "KEXTLESS_RUN_ROOT"


def default_root() -> Path:
    """`$KEXTLESS_RUN_ROOT`, else /run/kextless for root, else $XDG_RUNTIME_DIR/kextless."""
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV])
    if os.geteuid() == 0:
        return Path("/run/kextless")
    xdg = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/kextless-{os.geteuid()}"
    return Path(xdg) / "kextless"


@dataclass(frozen=True)
class RuntimeDir:
    path: Path

    @classmethod
    def for_instance(cls, netns: str | None = None, root: Path | None = None) -> RuntimeDir:
        base = root or default_root()
        return cls(base / (f"netns-{netns}" if netns else "host"))

    @classmethod
    def from_arg(cls, run_dir: Path | None) -> RuntimeDir:
        """An actor's `--run-dir`, or the host instance's directory when it is not given."""
        return cls(run_dir) if run_dir else cls.for_instance()

    def create(self) -> RuntimeDir:
        """Make the directory (and parents) with mode 0700, tightening it if it exists; then
        `check` it. UnsafePath if another user owns it or can change a directory above it."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = os.lstat(self.path)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
            os.chmod(self.path, 0o700)
        self.check()
        return self

    def check(self) -> None:
        """Refuse a run directory someone else could enter or change: its sockets steer the
        firewall. It must be a real directory (not a symlink), ours, mode 0700, on a path only
        trusted users can change (base/security.py)."""
        try:
            st = os.lstat(self.path)
        except OSError as exc:
            raise UnsafePath(
                f"run directory {self.path} cannot be checked: {exc.strerror}"
            ) from None
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePath(f"run directory {self.path} is a symlink; give the real directory")
        if st.st_uid != os.geteuid():
            raise UnsafePath(
                f"run directory {self.path} is owned by uid {st.st_uid}, not by uid "
                f"{os.geteuid()} who runs kextless"
            )
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise UnsafePath(
                f"run directory {self.path} is mode {stat.S_IMODE(st.st_mode):04o}, not 0700"
            )
        check_private(self.path, "run directory", directory=True)

    @property
    def kext_endpoint(self) -> str:
        """The one endpoint Portmaster-style clients talk to (the broker's ROUTER)."""
        return f"ipc://{self.path / 'kext.sock'}"

    @property
    def actors_endpoint(self) -> str:
        """The broker's internal ROUTER that actors connect their DEALERs to."""
        return f"ipc://{self.path / 'actors.sock'}"

    @property
    def ale_endpoint(self) -> str:
        """The ALE actor's ROUTER that capture connects to (the hot path)."""
        return f"ipc://{self.path / 'ale.sock'}"

    @property
    def supervisor_conf(self) -> Path:
        return self.path / "supervisord.conf"

    @property
    def supervisor_socket(self) -> Path:
        return self.path / "supervisor.sock"

    @property
    def log_dir(self) -> Path:
        return self.path / "logs"
