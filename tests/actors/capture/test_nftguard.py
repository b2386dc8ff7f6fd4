"""The namespace-wide nft guard (actors/capture/nftguard.py): its scripts, then the real table
a capture creates, keeps in step with its links, leaves behind when killed and `down` removes."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from kextless.actors.capture import nftguard, orphans
from kextless.actors.capture.nftguard import Family, NftError
from kextless.protocol.messages import CaptureReady
from tests.actors.capture.harness import capture_env
from tests.entry import KEXTLESS
from tests.netns import NetnsPair
from tests.wait import until

# ---- scripts ------------------------------------------------------------------------------


def test_replace_script_creates_then_deletes_then_recreates_each_table_in_one_script() -> None:
    s = nftguard.render_replace([3, 1, 3])
    lines = s.splitlines()
    # The delete can never fail (the empty create before it), so the script is one
    # transaction that either replaces the old table or changes nothing.
    for fam in ("inet", "bridge"):
        i = lines.index(f"table {fam} kextless {{}}")
        assert lines[i + 1] == f"delete table {fam} kextless"
        assert lines[i + 2] == f"table {fam} kextless {{"
    assert s.count("set guarded { type iface_index; elements = { 1, 3 }; }") == 2
    assert s.count("hook prerouting") == 2 and s.count("hook postrouting") == 2
    assert s.count("iif != @guarded drop") == 2 and s.count("oif != @guarded drop") == 2
    # Bridge frames: only IP is dropped (ARP passes); inet sees only IP anyway.
    assert s.count("ether type { ip, ip6 } iif != @guarded drop") == 1
    assert s.count("ether type { ip, ip6 } oif != @guarded drop") == 1


def test_an_empty_set_has_no_elements_clause() -> None:
    s = nftguard.render_table(Family.INET, [])
    assert "elements" not in s and "type iface_index; }" in s


def test_update_adds_a_removed_element_before_deleting_it() -> None:
    s = nftguard.render_update(add=[7], remove=[5], families=[Family.INET])
    assert s.splitlines() == [
        "add element inet kextless guarded { 7, 5 }",
        "delete element inet kextless guarded { 5 }",
    ]
    assert nftguard.render_update([], [], families=[Family.INET]) == ""
    both = nftguard.render_update([4], [])
    assert "add element inet kextless guarded { 4 }" in both
    assert "add element bridge kextless guarded { 4 }" in both
    assert "delete" not in both


def test_a_missing_nft_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nftguard.shutil, "which", lambda *_a, **_k: None)
    with pytest.raises(NftError, match="nft not found: install the nftables package"):
        nftguard.run(["list", "tables"])
    # `down` without nft: no table of ours can exist, nothing to report.
    assert orphans.remove_nft_tables("any") == ([], [])


def test_the_guard_refuses_the_hosts_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    from kextless.actors.capture import links

    monkeypatch.setattr(links, "in_initial_netns", lambda *_a: True)
    ran: list[object] = []
    monkeypatch.setattr(nftguard, "run", lambda *a, **k: ran.append(a) or "")
    with pytest.raises(NftError, match="host's network namespace"):
        nftguard.NftGuard.create([1])
    assert ran == []


# ---- the real table -----------------------------------------------------------------------


def _nft(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "nft", *args],
        capture_output=True,
        text=True,
        timeout=10,
        check=check,
    )


def _tables(ns: str) -> list[str]:
    return sorted(ln for ln in _nft(ns, "list", "tables").stdout.splitlines() if "kextless" in ln)


def _members(ns: str, family: str = "inet") -> set[str]:
    """The set's elements as nft shows them (interface names, or numbers for gone links)."""
    out = json.loads(_nft(ns, "-j", "list", "set", family, "kextless", "guarded").stdout)
    (s,) = [o["set"] for o in out["nftables"] if "set" in o]
    return {str(e) for e in s.get("elem", [])}


BOTH = ["table bridge kextless", "table inet kextless"]


@pytest.mark.root
@pytest.mark.slow
def test_the_table_follows_the_links_and_goes_with_a_clean_stop() -> None:
    with capture_env() as env:
        ns, p = env.pair.a, env.pair
        # CaptureReady goes out once the first handle is open; the table follows at once.
        assert until(lambda: _tables(ns) == BOTH), env.log()
        assert _members(ns) == _members(ns, "bridge") == {"lo", "va"}
        subprocess.run(
            ["ip", "-n", ns, "link", "add", "vn1", "address", "02:6b:6c:00:0e:0a",
             "type", "veth", "peer", "name", "vn2", "netns", p.b],
            check=True, timeout=10,
        )  # fmt: skip
        assert until(lambda: "vn1" in _members(ns)), env.log()[-2000:]
        assert "vn1" in _members(ns, "bridge")
        subprocess.run(["ip", "-n", ns, "link", "del", "vn1"], check=True, timeout=10)
        assert until(lambda: _members(ns) == {"lo", "va"}), (_members(ns), env.log()[-2000:])
        assert env.stop() == 0
        assert _tables(ns) == []  # a clean stop removes it, as it removes the programs
        assert "nft guard off" in env.log()


@pytest.mark.root
@pytest.mark.slow
def test_a_killed_captures_table_stays_until_the_next_capture_replaces_it(
    tmp_path: Path,
) -> None:
    with capture_env() as env:
        ns = env.pair.a
        assert until(lambda: _tables(ns) == BOTH), env.log()
        env.proc.send_signal(signal.SIGKILL)
        env.proc.wait(10)
        assert _tables(ns) == BOTH  # fail closed for links that appear meanwhile
        readies = sum(isinstance(m, CaptureReady) for m in env.ale.received)
        log_path = tmp_path / "capture2.log"
        with log_path.open("wb") as log_file:
            env.proc = env.pair.popen(
                ns,
                [*KEXTLESS, "run", "capture", "--ale-endpoint", env.ale.endpoint],
                stdout=subprocess.DEVNULL,
                stderr=log_file,
            )
        env.log_path = log_path
        assert env.ale.wait_for(
            lambda: sum(isinstance(m, CaptureReady) for m in env.ale.received) > readies, 15
        ), env.log()
        assert until(lambda: "nft guard on" in env.log()), env.log()
        log = env.log()
        assert "replaced nft table(s) a previous capture left: inet kextless, bridge kextless" in (
            log
        ), log
        assert _tables(ns) == BOTH and _members(ns) == {"lo", "va"}
        env.proc.send_signal(signal.SIGKILL)
        env.proc.wait(10)
        # What `kextless down` runs from the host after the instance stopped.
        removed, errors = orphans.remove_nft_tables(ns)
        assert errors == []
        assert removed == ["nft table inet kextless", "nft table bridge kextless"]
        assert _tables(ns) == []
        assert orphans.remove_nft_tables(ns) == ([], [])  # idempotent, nothing to report
        # The harness checks the capture it holds exited 0; this one was killed on purpose.
        env.proc = subprocess.Popen(["true"])
        env.proc.wait(10)


@pytest.mark.root
def test_down_reports_a_left_over_table_as_removed(tmp_path: Path) -> None:
    """`kextless down --netns` on a namespace a killed capture left its table in."""
    from kextless.deploy.down import down

    with NetnsPair() as pair:
        subprocess.run(
            ["ip", "netns", "exec", pair.a, "nft", "-f", "-"],
            input=nftguard.render_replace([1]),
            text=True,
            check=True,
            timeout=10,
        )
        assert _tables(pair.a) == BOTH
        lines: list[str] = []
        report = down(pair.a, run_root=tmp_path, out=lines.append)
        assert "nft table inet kextless" in report.removed, (report, lines)
        assert "nft table bridge kextless" in report.removed
        assert report.problems == []
        assert f"REMOVED: nft table left in netns {pair.a}: inet kextless" in lines, lines
        assert _tables(pair.a) == []
