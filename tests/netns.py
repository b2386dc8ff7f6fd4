"""Two throw-away network namespaces joined by a veth pair, for tests that need real traffic.

Divert handles that hold or drop packets must never touch the host's network, so every
real-traffic test runs inside namespaces it creates and always deletes (deleting a namespace
also removes any divert program left attached to its interfaces).

    with NetnsPair() as pair:              # fixture: `with netns_pair() as p: yield p`
        pair.a, pair.b                     # namespace names ("klt-<pid>-<n>-a" / "-b")
        pair.ip4_a, pair.ip4_b             # "10.231.N.1" / "10.231.N.2"   (/24 on the veth)
        pair.ip6_a, pair.ip6_b             # "fd31:0:0:N::1" / "...::2"  (/64, nodad)
        pair.run_py(pair.a, "print(1)", timeout=5)   # -> CompletedProcess (stdout/stderr text)
        proc = pair.popen(pair.b, [sys.executable, "-c", "..."])  # long-running helper
        pair.extra_v4(pair.b, "10.231.N.99")         # more addresses "outside" host a

Both namespaces have `lo` up; the veth ends have fixed MACs (02:6b:6c:00:00:0a / 0b, see
_setup). N is derived from (pid, counter); namespaces isolate addresses anyway, so parallel
runs never interfere. Every process started through `popen` is killed (by PID) when the
context exits, then the namespaces are deleted (also on failure), which also removes any
divert program left on their interfaces.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress

_COUNTER = itertools.count(1)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=10)


def netns_exec(ns: str, argv: Sequence[object]) -> list[str]:
    """The argv that runs `argv` (items str()-ed) inside namespace `ns`."""
    return ["ip", "netns", "exec", ns, *map(str, argv)]


class NetnsPair:
    """Namespaces `a` and `b` with veth `va` (in a) <-> `vb` (in b); see the module docstring."""

    def __init__(self, tag: str = "") -> None:
        n = next(_COUNTER)
        base = f"klt-{os.getpid()}-{n}{tag}"
        self.a = f"{base}-a"
        self.b = f"{base}-b"
        # 1..250, unique enough per process; mixing in the pid keeps parallel runs apart.
        self.subnet = (os.getpid() * 7 + n) % 250 + 1
        self.ip4_a = f"10.231.{self.subnet}.1"
        self.ip4_b = f"10.231.{self.subnet}.2"
        self.ip6_a = f"fd31:0:0:{self.subnet:x}::1"
        self.ip6_b = f"fd31:0:0:{self.subnet:x}::2"
        self._procs: list[subprocess.Popen[bytes]] = []
        self._created: list[str] = []

    # ---- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> NetnsPair:
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _setup(self) -> None:
        for ns in (self.a, self.b):
            _ip("netns", "add", ns)
            self._created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        # Create the veth inside `a` and move one end to `b`: the host never sees it.
        # Fixed MACs starting with nibble 0: libebpfdivert 0.0.5 misreads ARP frames to a MAC
        # starting with nibble 4/6 as IP, so random MACs made ARP fail at random (see
        # actors/capture/filters.py); tests must not depend on the dice.
        _ip(
            "-n",
            self.a,
            "link",
            "add",
            "va",
            "address",
            "02:6b:6c:00:00:0a",
            "type",
            "veth",
            "peer",
            "name",
            "vb",
            "address",
            "02:6b:6c:00:00:0b",
        )
        _ip("-n", self.a, "link", "set", "vb", "netns", self.b)
        for ns, dev, v4, v6 in (
            (self.a, "va", self.ip4_a, self.ip6_a),
            (self.b, "vb", self.ip4_b, self.ip6_b),
        ):
            _ip("-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
            _ip("-n", ns, "-6", "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            _ip("-n", ns, "link", "set", dev, "up")

    def close(self) -> None:
        """Kill helpers we started, then delete the namespaces (idempotent)."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
                with suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        self._procs.clear()
        for ns in reversed(self._created):
            _ip("netns", "del", ns, check=False)
        self._created.clear()

    # ---- helpers -------------------------------------------------------------------------

    def extra_v4(self, ns: str, addr: str, dev: str | None = None) -> None:
        """Add a /32 address in `ns` (e.g. an 'outside' host for redirect tests)."""
        dev = dev or ("va" if ns == self.a else "vb")
        _ip("-n", ns, "addr", "add", f"{addr}/32", "dev", dev)

    def extra_v6(self, ns: str, addr: str, dev: str | None = None) -> None:
        dev = dev or ("va" if ns == self.a else "vb")
        _ip("-n", ns, "-6", "addr", "add", f"{addr}/128", "dev", dev, "nodad")

    def run(
        self, ns: str, argv: Sequence[object], timeout: float = 10.0, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in `ns` to completion (killed after `timeout` seconds)."""
        return subprocess.run(
            netns_exec(ns, argv), capture_output=True, text=True, timeout=timeout, check=check
        )

    def run_py(
        self, ns: str, code: str, timeout: float = 10.0, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run a Python snippet with this interpreter in `ns`."""
        return self.run(ns, [sys.executable, "-c", code], timeout=timeout, check=check)

    def popen(self, ns: str, argv: Sequence[object], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start a background process in `ns`; it is killed when the pair closes."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen(netns_exec(ns, argv), **kwargs)  # type: ignore[call-overload]
        self._procs.append(proc)
        return proc


@contextmanager
def netns_pair(tag: str = "") -> Iterator[NetnsPair]:
    """Context-manager spelling of `NetnsPair`, convenient for `yield`-style pytest fixtures."""
    with NetnsPair(tag) as pair:
        yield pair


# ---- links added after a system started (tests/system/test_interfaces_system.py) ------------


def add_veth_later(
    pair: NetnsPair, a_dev: str, b_dev: str, net: str, mac_byte: int, move_from_b: bool = False
) -> tuple[str, str]:
    """A veth `a_dev` (in a, address NET.1/24) <-> `b_dev` (in b, NET.2/24), both up.

    Created in a with the peer moved to b, or (move_from_b) created in b with `a_dev` moved
    into a: the two ways a link appears in a firewalled namespace. Fixed 02: MACs (see
    _setup). Returns (address in a, address in b)."""
    mac_a, mac_b = f"02:6b:6c:{mac_byte:02x}:00:0a", f"02:6b:6c:{mac_byte:02x}:00:0b"
    home, other = (pair.b, pair.a) if move_from_b else (pair.a, pair.b)
    _ip("-n", home, "link", "add", a_dev, "address", mac_a, "type", "veth", "peer", "name",
        b_dev, "address", mac_b)  # fmt: skip
    if move_from_b:
        _ip("-n", home, "link", "set", a_dev, "netns", other)
    else:
        _ip("-n", home, "link", "set", b_dev, "netns", other)
    _ip("-n", pair.a, "addr", "add", f"{net}.1/24", "dev", a_dev)
    _ip("-n", pair.b, "addr", "add", f"{net}.2/24", "dev", b_dev)
    _ip("-n", pair.a, "link", "set", a_dev, "up")
    _ip("-n", pair.b, "link", "set", b_dev, "up")
    return f"{net}.1", f"{net}.2"


def tc_filters(ns: str, dev: str, hook: str) -> str:
    """`tc filter show dev DEV HOOK` inside `ns` (read-only)."""
    return subprocess.run(
        netns_exec(ns, ["tc", "filter", "show", "dev", dev, hook]),
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout


def wait_diverted(ns: str, dev: str, timeout: float = 5.0) -> float:
    """Seconds until divert programs sit on both hooks of `dev` in `ns`, and either the whole
    kernel-cache chain (kextless_pre and the permanent guard on both hooks) or no guard at all
    (--no-kernel-cache: the reactive guard is gone once diverted); AssertionError after
    `timeout`."""
    import time

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        i, e = tc_filters(ns, dev, "ingress"), tc_filters(ns, dev, "egress")
        chain = all("kextless_pre" in h and "kextless_guard" in h for h in (i, e))
        diverted = "tc_divert_ingre" in i and "tc_divert_egres" in e
        if diverted and (chain or "kextless_guard" not in i + e):
            return time.monotonic() - t0
        time.sleep(0.01)
    raise AssertionError(
        f"{dev} in {ns} never diverted: ingress {tc_filters(ns, dev, 'ingress')!r}, "
        f"egress {tc_filters(ns, dev, 'egress')!r}"
    )


def link_names(ns: str) -> list[str]:
    """Every interface name of `ns` (`ip -j link show`)."""
    import json

    out = _ip("-n", ns, "-j", "link", "show").stdout
    return [str(link["ifname"]) for link in json.loads(out)]
