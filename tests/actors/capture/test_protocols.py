"""Every IP protocol is asked about, in both families, and ARP / neighbour discovery survive it
(issue 8 point 4; filters.py, l2pass.py). Real capture process, real packets in namespaces.
"""

from __future__ import annotations

import json
import socket
import sys
import time

import pytest

from kextless.protocol.enums import Direction, Verdict
from tests import apps
from tests.actors.capture.harness import CaptureEnv, capture_env

pytestmark = [pytest.mark.root]

PORT_A, PORT_B = 18012, 18011

#: Count raw packets of protocol argv[2] arriving for address family of argv[1] for argv[3] s.
RAW_SINK = r"""
import json, socket, sys, time
fam = socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET
s = socket.socket(fam, socket.SOCK_RAW, int(sys.argv[2])); s.settimeout(0.1)
print("ready", flush=True)
n = 0; end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    try:
        d = s.recv(4096)
    except (socket.timeout, TimeoutError):
        continue
    if b"kextless-proto" in d:
        n += 1
print(json.dumps({"got": n}))
"""

RAW_SEND = r"""
import socket, sys, time
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_RAW, int(sys.argv[2]))
for _ in range(int(sys.argv[3])):
    s.sendto(b"kextless-proto", (sys.argv[1], 0)); time.sleep(0.05)
"""


def _send_and_count(env: CaptureEnv, sender: str, receiver: str, dst: str, proto: int) -> int:
    """Send 3 raw packets of `proto` to `dst`; how many the receiving namespace got."""
    p = env.pair
    fam = "6" if ":" in dst else "4"
    sink = p.popen(receiver, [sys.executable, "-c", RAW_SINK, fam, proto, 2.5])
    assert sink.stdout is not None and b"ready" in sink.stdout.readline()
    p.run(sender, [sys.executable, "-c", RAW_SEND, dst, proto, 3], timeout=5, check=True)
    out, _ = sink.communicate(timeout=10)
    return int(json.loads(out)["got"])


@pytest.mark.parametrize(
    ("verdict", "delivered"),
    [
        pytest.param(Verdict.PERMANENT_ACCEPT, True, id="PermanentAccept"),
        pytest.param(Verdict.PERMANENT_BLOCK, False, id="PermanentBlock"),
        pytest.param(Verdict.PERMANENT_DROP, False, id="PermanentDrop"),
    ],
)
@pytest.mark.parametrize("proto", [61, 253])
def test_unlisted_protocols_are_held_and_decided_both_families_both_directions(
    verdict: Verdict, delivered: bool, proto: int
) -> None:
    with capture_env(verdict) as env:
        p = env.pair
        for label, sender, receiver, dst, direction in (
            ("in-v4", p.b, p.a, p.ip4_a, Direction.INBOUND),
            ("in-v6", p.b, p.a, p.ip6_a, Direction.INBOUND),
            ("out-v4", p.a, p.b, p.ip4_b, Direction.OUTBOUND),
            ("out-v6", p.a, p.b, p.ip6_b, Direction.OUTBOUND),
        ):
            before = len(env.ale.held)
            got = _send_and_count(env, sender, receiver, dst, proto)
            asked = [
                m
                for m in env.ale.held[before:]
                if m.flow.protocol == proto and m.direction == direction
            ]
            assert len(asked) == 3, (label, len(asked))  # every packet: never cached
            assert all(m.packet[0] >> 4 == (6 if "v6" in label else 4) for m in asked)
            assert got == (3 if delivered else 0), (label, got)


@pytest.mark.parametrize("nibble", range(16))
def test_arp_and_neighbour_discovery_work_with_macs_of_every_leading_nibble(nibble: int) -> None:
    """Regression: libebpfdivert reads ARP frames to a MAC starting with 4 / 6 as IP; with every
    protocol asked, such frames were taken and lost (docs/measurements.md M22)."""
    first = (nibble << 4) | 0x02  # locally administered, unicast
    with capture_env(Verdict.PERMANENT_ACCEPT) as env:
        p = env.pair
        apps.start(p, p.b, apps.ECHO_SERVER, PORT_B)
        apps.start(p, p.a, apps.ECHO_SERVER, PORT_A)
        # Both ends take the nibble: replies to a (ingress) and from a (egress) are both tried.
        p.run(
            p.a, ["ip", "link", "set", "va", "address", f"{first:02x}:00:00:00:00:0a"], check=True
        )
        p.run(
            p.b, ["ip", "link", "set", "vb", "address", f"{first:02x}:00:00:00:00:0b"], check=True
        )
        for ns, dev in ((p.a, "va"), (p.b, "vb")):
            p.run(ns, ["ip", "neigh", "flush", "dev", dev], check=True)
        for label, ns, host, port in (
            ("arp a->b", p.a, p.ip4_b, PORT_B),
            ("nd a->b", p.a, p.ip6_b, PORT_B),
        ):
            res = apps.run(p, ns, apps.UDP_CLIENT, host, port, 2.0)
            assert res["result"] == "ok", (label, res)
        for ns, dev in ((p.a, "va"), (p.b, "vb")):
            p.run(ns, ["ip", "neigh", "flush", "dev", dev], check=True)
        for label, ns, host, port in (
            ("arp b->a", p.b, p.ip4_a, PORT_A),
            ("nd b->a", p.b, p.ip6_a, PORT_A),
        ):
            res = apps.run(p, ns, apps.UDP_CLIENT, host, port, 2.0)
            assert res["result"] == "ok", (label, res)
        # Only IP reached the ALE, and no neighbour discovery / MLD.
        for m in env.ale.held:
            assert m.packet[0] >> 4 in (4, 6)
            assert not (m.flow.protocol == 58 and m.packet[40] in (*range(130, 138), 143))


def test_kernel_cache_runs_before_divert_and_stays_after_exit() -> None:
    """kextless_pre (pref 10) lets non-IP by before the divert program, as l2pass did; the
    guard sits after it. Both stay after a clean exit: the next capture adopts them, and
    until then the guard keeps the link fail closed (`kextless down` removes them)."""
    with capture_env(Verdict.PERMANENT_ACCEPT) as env:
        p = env.pair

        def filters_on(dev: str, kind: str) -> str:
            return p.run(p.a, ["tc", "filter", "show", "dev", dev, kind]).stdout

        for kind in ("ingress", "egress"):
            out = filters_on("va", kind)
            assert "kextless_l2pass" not in out, out
            assert (
                out.index("kextless_pre") < out.index("tc_divert") < out.index("kextless_guard")
            ), out
        assert env.stop() == 0
        for kind in ("ingress", "egress"):
            out = filters_on("va", kind)
            assert "kextless_pre" in out and "kextless_guard" in out and "tc_divert" not in out


def test_l2pass_is_attached_before_divert_and_removed_on_exit() -> None:
    """Without the kernel cache (platforms without it), l2pass does that job."""
    with capture_env(Verdict.PERMANENT_ACCEPT, extra_args=("--no-kernel-cache",)) as env:
        p = env.pair

        def filters_on(dev: str, kind: str) -> str:
            return p.run(p.a, ["tc", "filter", "show", "dev", dev, kind]).stdout

        for kind in ("ingress", "egress"):
            out = filters_on("va", kind)
            assert "kextless_l2pass" in out and "tc_divert" in out, out
            assert out.index("kextless_l2pass") < out.index("tc_divert"), out  # runs first
        assert env.stop() == 0
        for kind in ("ingress", "egress"):
            assert "kextless_l2pass" not in filters_on("va", kind)


def test_portmaster_self_check_protocol_61_on_loopback_is_asked() -> None:
    """portmaster-client.md §8.1 item 9: raw IPv4 protocol 61 to 127.65.67.75 is surfaced."""
    probe = socket.inet_aton("127.65.67.75")
    with capture_env(Verdict.PERMANENT_DROP) as env:
        p = env.pair
        code = (
            "import socket, time\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 61)\n"
            "s.sendto(b'kextless self-check', ('127.65.67.75', 0)); time.sleep(0.2)\n"
        )
        p.run(p.a, [sys.executable, "-c", code], timeout=5, check=True)
        assert env.ale.wait_for(
            lambda: any(
                m.flow.protocol == 61 and probe in (m.flow.remote_ip, m.flow.local_ip)
                for m in env.ale.held
            ),
            timeout=5,
        ), [(m.flow, m.direction) for m in env.ale.held]
        time.sleep(0.1)
