"""The fail-closed guard program: its instructions, then its effect on real traffic."""

from __future__ import annotations

import json
import struct
import sys

import pytest

from kextless.actors.capture import guard
from tests.netns import NetnsPair


def test_program_is_twelve_instructions_ending_in_exits() -> None:
    code = guard.program()
    assert len(code) == 12 * 8
    ops = [code[i] for i in range(0, len(code), 8)]
    assert ops[4] == ops[9] == ops[11] == 0x95  # every path ends in exit
    # the mark test compares the high half with the library's re-injection mark
    assert struct.unpack_from("<i", code, 7 * 8 + 4)[0] == guard.REINJECT_MARK_HI


_PROBE = r"""
import json, socket, subprocess, sys, threading
from pyroute2 import IPRoute
from pydivert import EBPFDivert
from kextless.actors.capture.guard import Guard
host = sys.argv[1]
def tcp():
    s = socket.socket(); s.settimeout(0.5)
    try:
        s.connect((host, 9)); return "connected"
    except ConnectionRefusedError:
        return "refused"
    except OSError as e:
        return "timeout" if isinstance(e, TimeoutError) else repr(e)
    finally:
        s.close()
out = {"before": tcp()}
ipr = IPRoute()
g = Guard.open(ipr)
g.attach(ipr.link_lookup(ifname="va")[0], "va")
subprocess.run(["ip", "neigh", "flush", "dev", "va"], check=True)
out["guarded"] = tcp()
neigh = subprocess.run(["ip", "neigh", "show", host], capture_output=True, text=True).stdout
out["arp"] = "REACHABLE" in neigh or "STALE" in neigh or "DELAY" in neigh
h = EBPFDivert("tcp", priority=0).open()
def loop():
    while True:
        try:
            h.send(h.recv(timeout=0.2))
        except TimeoutError:
            continue
        except Exception:
            return
threading.Thread(target=loop, daemon=True).start()
out["reinjected"] = tcp()
h.close()
g.close()
out["filters_left"] = subprocess.run(
    ["tc", "filter", "show", "dev", "va", "ingress"], capture_output=True, text=True
).stdout
out["after"] = tcp()
print(json.dumps(out))
"""


@pytest.mark.root
def test_guard_drops_ip_passes_arp_and_reinjected_packets_and_comes_off() -> None:
    with NetnsPair("g") as p:
        r = p.run_py(p.a, _PROBE.replace("sys.argv[1]", repr(p.ip4_b)), timeout=30)
        assert r.returncode == 0, r.stderr[-3000:]
        out = json.loads(r.stdout.strip().splitlines()[-1])
        print(out, file=sys.stderr)
        assert out["before"] == "refused"  # nothing listens on port 9: RST
        assert out["guarded"] == "timeout"  # the SYN is dropped on egress
        assert out["arp"], "ARP must pass the guard"
        # A divert handle's re-injected SYN (and RST) carry the library's mark: they pass.
        assert out["reinjected"] == "refused"
        assert "kextless_guard" not in out["filters_left"]
        assert out["after"] == "refused"


_STALE = r"""
import json, subprocess
from pyroute2 import IPRoute
from kextless.actors.capture.guard import Guard, remove_stale
ipr = IPRoute()
g = Guard.open(ipr)  # never closed: a capture killed while the link was guarded
g.attach(ipr.link_lookup(ifname="va")[0], "va")
removed = remove_stale(ipr)
show = ["tc", "filter", "show", "dev", "va", "egress"]
left = subprocess.run(show, capture_output=True, text=True)
print(json.dumps({"removed": removed, "left": left.stdout, "again": remove_stale(ipr)}))
"""


@pytest.mark.root
def test_a_guard_a_killed_capture_left_is_removed_at_start() -> None:
    with NetnsPair("gs") as p:
        r = p.run_py(p.a, _STALE, timeout=30)
        assert r.returncode == 0, r.stderr[-3000:]
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert sorted(out["removed"]) == ["va/egress", "va/ingress"]
        assert "kextless_guard" not in out["left"]
        assert out["again"] == []
