"""Who may steer the firewall: refuse a file or directory another user can change.

The configuration, the rules, the CURVE keys and the run directory decide what passes. If any
user but their owner (or root) can write one of them, or replace it by writing a directory on
its path, that user decides instead of the owner. `check_private` refuses such a path with one
line naming it and the problem, before it is read.

Trusted: root and the user running this process. A group is trusted when every user in it (as a
member or as its primary group) is trusted. A world-writable directory with the sticky bit
(/tmp) is accepted on the path: nobody else can rename or remove what a trusted user owns there.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import stat
from pathlib import Path

log = logging.getLogger("kextless.security")

_ACL_XATTR = "system.posix_acl_access"


class UnsafePath(ValueError):
    """A file that steers the firewall but someone else could change; one line, names it."""


def trusted_uids() -> frozenset[int]:
    """Root and this process's effective user."""
    return frozenset({0, os.geteuid()})


def _group_trusted(gid: int, trusted: frozenset[int]) -> bool:
    """True when nobody outside `trusted` belongs to group `gid`; an unnamed gid only if 0."""
    try:
        group = grp.getgrgid(gid)
    except KeyError:
        return gid == 0
    for name in group.gr_mem:
        try:
            if pwd.getpwnam(name).pw_uid not in trusted:
                return False
        except KeyError:
            return False  # a member with no account: cannot say who it is
    return all(p.pw_uid in trusted for p in pwd.getpwall() if p.pw_gid == gid)


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _group(gid: int) -> str:
    try:
        return f"{grp.getgrgid(gid).gr_name} (gid {gid})"
    except KeyError:
        return f"gid {gid}"


def _has_acl(path: str) -> bool:
    try:
        os.getxattr(path, _ACL_XATTR)
    except OSError:
        return False  # ENODATA (none) or ENOTSUP (no ACLs on this file system)
    return True


def _writable_by_others(path: str, st: os.stat_result, trusted: frozenset[int]) -> str | None:
    """Why someone untrusted can write this inode, or None."""
    mode = st.st_mode
    if st.st_uid not in trusted:
        return f"is owned by {_user(st.st_uid)}"
    sticky_dir = stat.S_ISDIR(mode) and mode & stat.S_ISVTX
    if mode & stat.S_IWOTH and not sticky_dir:
        return f"is writable by every user (mode {stat.S_IMODE(mode):04o})"
    if mode & stat.S_IWGRP and not sticky_dir:
        # With a POSIX ACL the group bits are its mask: any named user or group may write.
        if _has_acl(path):
            return f"has an ACL that lets others write (mode {stat.S_IMODE(mode):04o})"
        if not _group_trusted(st.st_gid, trusted):
            return f"is writable by group {_group(st.st_gid)} (mode {stat.S_IMODE(mode):04o})"
    return None


def _ancestors(path: Path) -> list[Path]:
    """Every directory on the way to `path`, as written and as resolved (a symlink's directory
    can be swapped too), without repeats, "/" first."""
    seen: dict[Path, None] = {}
    for p in (Path(os.path.abspath(path)), Path(os.path.realpath(path))):
        for parent in reversed(p.parents):
            seen.setdefault(parent, None)
    return list(seen)


def problem(path: Path, *, secret: bool = False, directory: bool = False) -> str | None:
    """What makes `path` unsafe to trust, or None. `secret`: a key file; other users reading it
    is logged as a warning (refusing it would refuse every zmq.auth certificate, made 0644)."""
    trusted = trusted_uids()
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None  # nothing to trust yet: whoever reads it says it is missing
    except OSError as exc:
        return f"cannot be checked: {exc.strerror}"
    if directory and not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if not directory and not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    why = _writable_by_others(str(path), st, trusted)
    if why:
        return why
    for parent in _ancestors(path):
        try:
            pst = os.stat(parent)
        except OSError as exc:
            return f"cannot be checked: {parent}: {exc.strerror}"
        why = _writable_by_others(str(parent), pst, trusted)
        if why:
            return f"lies in {parent}, which {why}"
    if secret and st.st_mode & (stat.S_IRGRP | stat.S_IROTH):
        # Not refused (zmq.auth writes 0644), but whoever reads a client's secret can open
        # sessions as that client: say so once per load.
        log.warning(
            "%s is readable by other users (mode %04o): chmod 600 it",
            path,
            stat.S_IMODE(st.st_mode),
        )
    return None


def check_private(
    path: Path | str, what: str, *, secret: bool = False, directory: bool = False
) -> None:
    """Refuse `path` (UnsafePath: "WHAT PATH PROBLEM; fix") unless only trusted users can
    change it or any directory on its way."""
    p = Path(path)
    why = problem(p, secret=secret, directory=directory)
    if why is not None:
        raise UnsafePath(f"{what} {p} {why}; only root and its owner may be able to change it")


def check_private_tree(path: Path | str, what: str) -> None:
    """A directory and every certificate (`*.key`, what zmq.auth loads) in it: whoever can add
    or change one there can let a client in."""
    p = Path(path)
    check_private(p, what, directory=True)
    try:
        entries = sorted(p.glob("*.key"))
    except OSError as exc:
        raise UnsafePath(f"{what} {p} cannot be listed: {exc.strerror}") from None
    for entry in entries:
        check_private(entry, f"{what}: certificate")
