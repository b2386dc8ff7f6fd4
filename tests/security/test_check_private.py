"""base/security.py: a file or directory another user could change is refused, with one line
naming it and the problem; what only root and its owner can change passes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from kextless.base.security import UnsafePath, check_private, check_private_tree, problem

NOBODY = 65534  # nobody / nogroup on Debian and Ubuntu


def _file(d: Path, name: str = "f.toml", mode: int = 0o600) -> Path:
    f = d / name
    f.write_text("x = 1\n")
    f.chmod(mode)
    return f


@pytest.fixture
def private(tmp_path: Path) -> Path:
    d = tmp_path / "private"
    d.mkdir(mode=0o700)
    return d


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o400, 0o755])
def test_only_the_owner_may_write_passes(private: Path, mode: int) -> None:
    assert problem(_file(private, mode=mode)) is None
    check_private(private, "dir", directory=True)


def test_world_writable_file_is_refused_naming_it(private: Path) -> None:
    f = _file(private, mode=0o646)
    with pytest.raises(UnsafePath) as err:
        check_private(f, "rules file")
    message = str(err.value)
    assert message.startswith(f"rules file {f} is writable by every user (mode 0646)")
    assert "\n" not in message


def test_a_missing_file_is_left_to_its_reader(private: Path) -> None:
    assert problem(private / "missing") is None


def test_not_a_regular_file_or_not_a_directory(private: Path) -> None:
    assert problem(private) == "is not a regular file"
    assert problem(_file(private), directory=True) == "is not a directory"


def test_a_writable_directory_on_the_way_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    f = _file(d)
    d.chmod(0o777)  # anyone could replace f by a file of their own
    assert problem(f) == f"lies in {d}, which is writable by every user (mode 0777)"
    d.chmod(0o1777)  # sticky (as /tmp): nobody else can rename or remove f
    assert problem(f) is None


def test_a_symlink_is_checked_where_it_points(tmp_path: Path, private: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o777)
    elsewhere.chmod(0o777)
    target = _file(elsewhere)
    link = private / "link.toml"
    link.symlink_to(target)
    assert problem(link) == f"lies in {elsewhere}, which is writable by every user (mode 0777)"


@pytest.mark.root
def test_owned_by_another_user_is_refused(private: Path) -> None:
    f = _file(private)
    os.chown(f, NOBODY, -1)
    assert problem(f) == f"is owned by nobody (uid {NOBODY})"
    os.chown(f, 0, -1)
    os.chown(private, NOBODY, -1)
    assert problem(f) == f"lies in {private}, which is owned by nobody (uid {NOBODY})"


@pytest.mark.root
def test_group_write_counts_only_for_a_group_with_other_users(private: Path) -> None:
    f = _file(private, mode=0o660)
    os.chown(f, 0, 0)  # group root: only root in it here
    assert problem(f) is None
    os.chown(f, 0, NOBODY)  # nogroup: nobody's primary group
    assert problem(f) == f"is writable by group nogroup (gid {NOBODY}) (mode 0660)"
    f.chmod(0o640)  # readable by the group is not writing
    assert problem(f) is None


def _acl(entries: list[tuple[int, int, int]]) -> bytes:
    """The system.posix_acl_access xattr (version 2, then tag/perm/id per entry), as setfacl
    writes it: no acl package needed."""
    import struct

    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


@pytest.mark.root
def test_an_acl_granting_write_is_refused(private: Path) -> None:
    f = _file(private)
    user_obj, user, group_obj, mask, other = 0x01, 0x02, 0x04, 0x10, 0x20
    acl = _acl(
        [(user_obj, 6, 0xFFFFFFFF), (user, 6, NOBODY), (group_obj, 4, 0xFFFFFFFF),
         (mask, 6, 0xFFFFFFFF), (other, 0, 0xFFFFFFFF)]
    )  # fmt: skip
    try:
        os.setxattr(f, "system.posix_acl_access", acl)
    except OSError as exc:
        pytest.skip(f"no POSIX ACLs on this file system: {exc.strerror}")
    assert stat.S_IMODE(f.stat().st_mode) == 0o660  # the group bits are the mask now
    assert problem(f) == "has an ACL that lets others write (mode 0660)"


def test_a_readable_secret_is_a_warning_not_a_refusal(
    private: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f = _file(private, "c.key_secret", 0o644)  # what zmq.auth.create_certificates writes
    check_private(f, "CURVE secret", secret=True)
    assert "readable by other users (mode 0644)" in caplog.text
    f.chmod(0o600)
    caplog.clear()
    check_private(f, "CURVE secret", secret=True)
    assert caplog.text == ""


def test_the_clients_directory_and_every_certificate_in_it(private: Path) -> None:
    check_private_tree(private, "CURVE clients directory")
    cert = _file(private, "a.key", 0o644)
    _file(private, "notes.txt", 0o666)  # zmq.auth loads only *.key
    check_private_tree(private, "CURVE clients directory")
    cert.chmod(0o666)
    with pytest.raises(UnsafePath, match=r"CURVE clients directory: certificate .*a\.key is"):
        check_private_tree(private, "CURVE clients directory")
    cert.chmod(0o644)
    private.chmod(0o777)  # anyone could add a certificate of their own
    with pytest.raises(UnsafePath, match="writable by every user"):
        check_private_tree(private, "CURVE clients directory")
