"""The pydivert programs attached in a namespace, seen from the host over rtnetlink: a killed
capture leaves its tc filters behind, still run on every packet, so `up` warns about them,
`down` removes them and `status` shows which interfaces are guarded. The reading and removal
are the capture's own (actors/capture/orphans.py); here they run inside the named namespace
through pyroute2's NetNS, never on the host's interfaces unless no namespace is named."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from kextless.actors.capture import orphans
from kextless.actors.capture.orphans import Coverage
from kextless.deploy.errors import DeployError


@contextlib.contextmanager
def _netlink(netns: str | None) -> Iterator[Any]:
    """An rtnetlink handle inside `netns` (the current namespace when None: read-only uses)."""
    from pyroute2 import IPRoute, NetNS

    try:
        ipr = NetNS(netns) if netns is not None else IPRoute()
    except Exception as e:  # no such namespace, no permission
        raise DeployError(f"cannot open netlink in netns {netns}: {e}") from None
    try:
        yield ipr
    finally:
        with contextlib.suppress(Exception):
            ipr.close()


def divert_filters(netns: str) -> list[str]:
    """Every divert program in the namespace, as `IFNAME HOOK: pref N NAME`."""
    with _netlink(netns) as ipr:
        try:
            progs = orphans.divert_programs(ipr)
        except Exception as e:
            raise DeployError(f"cannot list tc filters of netns {netns}: {e}") from None
    return [f"{p.ifname} {p.hook.label}: pref {p.pref} {p.name}" for p in progs]


def remove_divert_filters(netns: str) -> tuple[list[str], list[str]]:
    """Remove every divert program in the namespace: (what was removed, what could not be)."""
    with _netlink(netns) as ipr:
        try:
            removed, errors = orphans.remove(ipr, orphans.leftover_programs(ipr))
        except Exception as e:
            raise DeployError(f"cannot remove tc filters of netns {netns}: {e}") from None
    return [p.describe() for p in removed], errors


def interface_coverage(netns: str | None) -> list[Coverage]:
    """Each interface of the namespace and whether divert programs guard its hooks."""
    with _netlink(netns) as ipr:
        try:
            return orphans.coverage(ipr)
        except Exception as e:
            raise DeployError(f"cannot read interfaces of netns {netns}: {e}") from None
