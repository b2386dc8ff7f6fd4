"""Throw-away namespace pairs for the bench: `a` <-> `b` over a veth with fixed MACs (02:...),
10.x / fd.. addresses. Nothing touches the host's interfaces; every pair is deleted on close,
which also removes whatever a capture left attached to its interfaces.

The same shape as the tests' pair (tests/netns.py), written again because the product cannot
import tests. MACs are fixed and start with 02: because libebpfdivert 0.0.5 misreads ARP to a
MAC starting with nibble 4/6 as IP (actors/capture/filters.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from contextlib import suppress

#: Per-namespace sysctls that let a connection-rate run use every port once (netns-local).
_SYSCTLS = (
    ("net.ipv4.ip_local_port_range", "1024 65000"),
    ("net.ipv4.tcp_tw_reuse", "1"),
)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=10)


def netns_exec(ns: str, argv: Sequence[object]) -> list[str]:
    """The argv that runs `argv` inside namespace `ns`."""
    return ["ip", "netns", "exec", ns, *map(str, argv)]


class BenchPair:
    """Namespaces `a` (client side, the one kextless guards) and `b` (servers)."""

    def __init__(self, role: str, index: int) -> None:
        base = f"kxb-{os.getpid() % 100000}-{role}"
        self.role = role
        self.a = f"{base}-a"
        self.b = f"{base}-b"
        octet = (os.getpid() * 3 + index) % 200 + 20
        self.ip4_a = f"10.233.{octet}.1"
        self.ip4_b = f"10.233.{octet}.2"
        self.ip6_a = f"fd33:0:0:{octet:x}::1"
        self.ip6_b = f"fd33:0:0:{octet:x}::2"
        self.mac_a = f"02:6b:62:00:{index:02x}:0a"
        self.mac_b = f"02:6b:62:00:{index:02x}:0b"
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[bytes]] = []

    def create(self) -> BenchPair:
        try:
            for ns in (self.a, self.b):
                _ip("netns", "del", ns, check=False)  # a leftover of a killed earlier bench
                _ip("netns", "add", ns)
                self._created.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            # Created inside `a`, one end moved to `b`: the host namespace never holds the veth.
            _ip("-n", self.a, "link", "add", "va", "address", self.mac_a, "type", "veth",
                "peer", "name", "vb", "address", self.mac_b)  # fmt: skip
            _ip("-n", self.a, "link", "set", "vb", "netns", self.b)
            for ns, dev, v4, v6 in (
                (self.a, "va", self.ip4_a, self.ip6_a),
                (self.b, "vb", self.ip4_b, self.ip6_b),
            ):
                _ip("-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
                _ip("-n", ns, "-6", "addr", "add", f"{v6}/64", "dev", dev, "nodad")
                _ip("-n", ns, "link", "set", dev, "up")
                for key, value in _SYSCTLS:
                    self.run(ns, ["sysctl", "-q", "-w", f"{key}={value}"], timeout=5)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Kill the helpers this pair started (by PID), then delete the namespaces."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
                with suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        self._procs.clear()
        for ns in reversed(self._created):
            _ip("netns", "del", ns, check=False)
        self._created.clear()

    def run(
        self, ns: str, argv: Sequence[object], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            netns_exec(ns, argv), capture_output=True, text=True, timeout=timeout, check=False
        )

    def popen(self, ns: str, argv: Sequence[object]) -> subprocess.Popen[bytes]:
        """A background helper in `ns`, killed when the pair closes."""
        proc = subprocess.Popen(
            netns_exec(ns, argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self._procs.append(proc)
        return proc

    def py(self, ns: str, code: str, *args: object) -> subprocess.Popen[bytes]:
        return self.popen(ns, [sys.executable, "-c", code, *args])
