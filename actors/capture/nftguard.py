"""The namespace-wide guard: an nftables table that drops IP on every link not yet guarded.

The TC guard (guard.py) is reactive: it goes on a link once the capture has seen the link's
event, and a link moved in, addressed and brought up faster than that passed packets
(docs/measurements.md M20). This table exists before any later link does: its chains drop
IPv4/IPv6 whose input interface (prerouting) or output interface (postrouting) is not in the
set `guarded`, so a link nobody has looked at yet carries no IP at all. The capture adds a link's
ifindex once its TC guard or the divert programs are on both hooks, and removes it when the link
goes. Prerouting sees every IP packet a link receives and postrouting every one a link sends
(input/forward/output are subsets of them), so two rules per family are the whole cost. On
ingress TC runs before netfilter and the divert library re-injects a held packet by redirecting
it to the ingress of the same link (BPF_F_INGRESS), so netfilter sees it with the same iif; on
egress netfilter runs first. A `bridge` table does the same for frames bridged between ports,
which never reach the inet hooks.

Why the `nft` CLI and not a Python binding: the table must be replaced atomically (a restarted
capture swaps its killed predecessor's table with no window), which is one `nft -f` transaction
of "add; delete; create". pyroute2 0.9's nftables module sends each request as its own batch,
has no documented way to group several into one transaction, and builds rules from raw
expression lists (a set lookup with the inverted flag would be hand-assembled netlink); the
nftables project's own CLI is its reference client, kept with the kernel, and its script syntax
is what an operator reads in `nft list ruleset`. Calls are rare (start, link events), so one
exec (a few ms) per change costs nothing on the packet path.
"""

from __future__ import annotations

import enum
import logging
import shutil
import subprocess
from collections.abc import Iterable, Sequence

log = logging.getLogger("capture.nftguard")

TABLE = "kextless"
SET = "guarded"
#: Bounds every nft run: a hung nft must not stall the capture's loop for long.
_TIMEOUT_S = 10.0


class Family(enum.Enum):
    """The nftables families of the guard's tables."""

    INET = "inet"
    BRIDGE = "bridge"


#: ether type match for the bridge family (inet sees only IP anyway).
_MATCH = {Family.INET: "", Family.BRIDGE: "ether type { ip, ip6 } "}
#: Ingress before conntrack and NAT; egress after NAT (nothing of ours runs later in netfilter).
_PRIO_IN, _PRIO_OUT = -300, 300


class NftError(Exception):
    """nft is missing, or it refused a script (the message says which and why)."""


def render_table(family: Family, guarded: Iterable[int]) -> str:
    """The script that creates (or replaces, in the same transaction) one family's table."""
    elems = sorted(set(guarded))
    elements = f" elements = {{ {', '.join(map(str, elems))} }};" if elems else ""
    m = _MATCH[family]
    t = f"{family.value} {TABLE}"
    return (
        f"table {t} {{}}\n"  # so the delete below never fails: the replace is one transaction
        f"delete table {t}\n"
        f"table {t} {{\n"
        f"  set {SET} {{ type iface_index;{elements} }}\n"
        f"  chain ingress {{ type filter hook prerouting priority {_PRIO_IN}; policy accept; "
        f"{m}iif != @{SET} drop; }}\n"
        f"  chain egress {{ type filter hook postrouting priority {_PRIO_OUT}; policy accept; "
        f"{m}oif != @{SET} drop; }}\n"
        f"}}\n"
    )


def render_replace(guarded: Iterable[int], families: Sequence[Family] = tuple(Family)) -> str:
    """Every family's table replaced in one script (one transaction)."""
    members = sorted(set(guarded))
    return "".join(render_table(f, members) for f in families)


def render_update(
    add: Iterable[int], remove: Iterable[int], families: Sequence[Family] = tuple(Family)
) -> str:
    """Set changes as one script. A removed element is added first, so deleting one the kernel
    never had (or already lost) cannot fail the whole transaction."""
    adds, removes = sorted(set(add)), sorted(set(remove))
    out = []
    for f in families:
        t = f"{f.value} {TABLE} {SET}"
        if adds or removes:
            out.append(f"add element {t} {{ {', '.join(map(str, adds + removes))} }}\n")
        if removes:
            out.append(f"delete element {t} {{ {', '.join(map(str, removes))} }}\n")
    return "".join(out)


def render_delete(families: Sequence[Family] = tuple(Family)) -> str:
    return "".join(f"delete table {f.value} {TABLE}\n" for f in families)


def nft_argv(netns: str | None = None) -> list[str]:
    """`nft` here, or inside the named namespace (`kextless down` from the host)."""
    nft = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
    if nft is None:
        raise NftError("nft not found: install the nftables package (apt-get install nftables)")
    return [nft] if netns is None else ["ip", "netns", "exec", netns, nft]


def run(args: Sequence[str], script: str | None = None, netns: str | None = None) -> str:
    """Run nft (a script on stdin with `-f -`); its stdout. NftError on any failure."""
    argv = [*nft_argv(netns), *args]
    try:
        r = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NftError(f"{' '.join(argv)}: {e}") from None
    if r.returncode != 0:
        raise NftError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def tables(netns: str | None = None) -> list[str]:
    """Which of our tables exist, as `FAMILY kextless`."""
    out = run(["list", "tables"], netns=netns)
    have = {line.strip().removeprefix("table ") for line in out.splitlines()}
    return [f"{f.value} {TABLE}" for f in Family if f"{f.value} {TABLE}" in have]


def remove_tables(netns: str | None = None) -> tuple[list[str], list[str]]:
    """Delete our tables (a killed capture's): (removed as `nft table FAMILY kextless`, errors)."""
    try:
        present = tables(netns)
    except NftError as e:
        return [], [str(e)]
    fams = [f for f in Family if f"{f.value} {TABLE}" in present]
    if not fams:
        return [], []
    try:
        run(["-f", "-"], render_delete(fams), netns)
    except NftError as e:
        return [], [str(e)]
    return [f"nft table {f.value} {TABLE}" for f in fams], []


class NftGuard:
    """The capture's tables in its own namespace and the ifindexes it has put in `guarded`."""

    def __init__(self) -> None:
        self.members: set[int] = set()

    @classmethod
    def create(cls, guarded: Iterable[int]) -> NftGuard:
        """Create or atomically replace the tables with `guarded` as the set. Never in the
        machine's own namespace (it would drop the host's traffic on every later link)."""
        from kextless.actors.capture.links import in_initial_netns

        if in_initial_netns():
            raise NftError("refusing to add the nft guard in the host's network namespace")
        g = cls()
        members = set(guarded)
        before = tables()
        run(["-f", "-"], render_replace(members))
        g.members = members
        if before:
            log.warning("replaced nft table(s) a previous capture left: %s", ", ".join(before))
        log.info(
            "nft guard on: IP dropped on any link but ifindex %s",
            ", ".join(map(str, sorted(members))) or "(none)",
        )
        return g

    def sync(self, wanted: Iterable[int]) -> None:
        """Make `guarded` exactly `wanted` (one transaction). NftError leaves members as they
        were, so the next sync retries."""
        want = set(wanted)
        add, remove = want - self.members, self.members - want
        if not add and not remove:
            return
        run(["-f", "-"], render_update(add, remove))
        self.members = want
        for i in sorted(add):
            log.info("nft guard: ifindex %d admitted", i)
        for i in sorted(remove):
            log.info("nft guard: ifindex %d withdrawn (gone or no longer guarded)", i)

    def close(self) -> None:
        """Remove the tables (a clean stop: the divert programs are gone too)."""
        run(["-f", "-"], render_delete())
        self.members = set()
        log.info("nft guard off")
