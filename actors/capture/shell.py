"""The capture actor's I/O: one pydivert NETWORK handle and one ZMQ DEALER, in one thread.

The handle's event fd and the DEALER are multiplexed with zmq.Poller (pydivert's asyncio path
was measured slowest). The core decides; this file only receives, sends and swaps handles. The
loop sleeps until the first of: an input (packet, ALE message, opened handle), the core's next
deadline (`next_deadline_ns`: a held packet or a connection to expire), or the read bound
after the handle was last read (10 ms while packets flow, 1 s idle). Packets come in batches
(batch.py: one recv_ex per up to 64) and their re-injections go out together (one send_ex per
loop pass).

Handle swaps: a filter is fixed at open, so a new per-connection port set means a new handle.
It is opened at the same priority in a helper thread (an open takes tens of ms, the loop keeps
serving the old handle meanwhile). Once open, the newest handle shadows the old one, which is
shut down for receiving, drained through the core and closed in another thread (a close waits
for the kernel). What a swap costs and loses: docs/measurements.md M1-M3.

The kernel flow cache (kernel_cache.py), in a namespace this shell owns: at start it adopts a
killed predecessor's programs and maps (found through the programs still attached: its
verdicts keep passing decided flows meanwhile and after) or loads fresh ones, attaches
kextless_pre (pref 10) and, unless `fail_open`, the permanent guard (pref 65000) to every link
before the handle opens and to every link that appears later, and opens the handle with the
fixed all-IP filter (filters.build_all). The core's Kernel* actions write the map; they run in
order with the rest, so a flow's entry is in the kernel before its held packet is
re-injected. Nothing of it is removed at exit: the guard keeps the namespace fail closed while
no capture runs, and the next capture adopts the verdicts (`kextless down` removes all).

The scan for connections that predate us (existing.py) also runs off the loop, in a child
process: reading 10 000 sockets takes about a second of Python (M21), which on the loop would
hold every packet that long, and in a thread would still take the interpreter lock from it.
The loop polls the child's stdout; the flows are handed to the core in parts of
`_EXISTING_PART`, with packets served between them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import zmq
from pydivert import EBPFDivert
from pydivert.ebpf import SHUTDOWN_RECV
from zmq.utils.monitor import recv_monitor_message

from kextless.actors.capture import existing, filters, nftguard, orphans, tcbpf
from kextless.actors.capture import packets as pk
from kextless.actors.capture.batch import AddrFlag, Batch, Captured, fresh_address
from kextless.actors.capture.core import (
    Action,
    CaptureCore,
    DestroySocket,
    Drop,
    ExistingFlow,
    Inject,
    KernelAudit,
    KernelClear,
    KernelDelete,
    KernelProbe,
    KernelPut,
    KernelRedirect,
    KernelVerdict,
    Pass,
    Reroute,
    ScanExisting,
    SetFilter,
    ToAle,
)
from kextless.actors.capture.counters import LossCounters
from kextless.actors.capture.kernel_cache import DEFAULT_FLOWS_MAX, KernelCache
from kextless.actors.capture.kernel_cache import Action as KAction
from kextless.actors.capture.l2pass import L2Pass
from kextless.actors.capture.links import LinkGuard, in_initial_netns
from kextless.actors.capture.parked import fresh, read_shadow, recent_syns
from kextless.base.cores import wait_ms
from kextless.base.heartbeat import capped_timeout_ms, open_heartbeat, read_heartbeats
from kextless.base.kernel_maps import (
    FLOW_KEY,
    GUARD_NAME,
    GUARD_PREF,
    PRE_NAME,
    PRE_PREF,
    BpfMap,
    FlowKey,
    KernelCacheError,
    prog_maps,
)
from kextless.base.rundir import RuntimeDir
from kextless.base.supervisor import supervisor_state
from kextless.protocol.enums import Direction, Verdict
from kextless.protocol.messages import (
    BUNDLE_MAX,
    CacheSet,
    Decision,
    Flow,
    Health,
    Log,
    Message,
    PacketHeld,
    Rehold,
    decode,
    encode_many,
    unbundle,
)

log = logging.getLogger("capture")

_BATCH = 256
#: Packets per ebpfdivert_recv_ex call (batch.py; kernel-flow-cache.md §d: 16-64).
_RECV_BATCH = 64
#: The longest the handle goes unread, whatever its event fd says. libebpfdivert 0.0.5 can
#: miss a ring-buffer wakeup when two CPUs produce at once (docs/upstream-ebpfdivert-wakeup.md):
#: the packet then sits in the ring, the event fd quiet, until some later wakeup. A
#: non-blocking read consumes the ring whether or not a wakeup came, so reading the handle at
#: least this often bounds how long such a packet waits. The race needs the consumer to be
#: draining at the moment a second CPU commits (a commit to an idle, sleeping consumer always
#: wakes it), so it can only strand a packet committed just after one we read: while packets
#: flowed in the last _BUSY_NS the bound is 10 ms; idle it is 1 s, which keeps an idle capture
#: at ~1 wake-up a second (10 ms always: ~1% of a core, 95 wake-ups/s; bench_batch.py).
_BUSY_RECV_TIMEOUT_NS = 10_000_000
_IDLE_RECV_TIMEOUT_NS = 1_000_000_000
_BUSY_NS = 250_000_000
_STATS_NS = 5_000_000_000
#: Takes of up to parked.TAKE_MAX parked packets per wakeup of the parked ring.
_PARKED_TAKES = 4
#: Existing connections handed to the core per loop pass (the core takes ~25 us each, so a
#: part keeps packets waiting a few ms at most).
_EXISTING_PART = 128


@dataclass(frozen=True)
class ShellConfig:
    ale_endpoint: str
    priority: int = 0
    exclude_ports: frozenset[int] = frozenset()
    #: eBPF ring size per handle (0: library default). A full ring lets packets pass unexamined.
    ring_bytes: int = 0
    #: This shell is the namespace's capture process, so it may change the namespace's tc
    #: filters: remove every divert program before the first open (orphans.py) and put the
    #: fail-closed guard on links that appear later (links.py, never in the host's namespace).
    #: Only `kextless run capture` sets it, running inside the namespace it guards; a shell
    #: built in a test (fake handles, the host's namespace) must never touch tc filters.
    owns_namespace: bool = False
    #: Use the kernel flow cache where it can be (a namespace we own, not the host's): False
    #: keeps the per-port filters and handle swaps.
    kernel_cache: bool = True
    #: No fail-closed guard (and no nft guard): what the divert program lets by unexamined
    #: (a full ring, a stall, no capture running) passes instead of being dropped.
    fail_open: bool = False
    #: Entries of the kernel's flow map (LRU: an evicted flow is asked again, never passed).
    flows_max: int = DEFAULT_FLOWS_MAX
    #: What packets still held when the capture stops get (the ALE's default verdict: the
    #: client stops first, so nobody would answer them; a Block fails the connection at once
    #: instead of its retransmit getting through once kextless is gone).
    stop_verdict: Verdict = Verdict.BLOCK
    #: The instance's run dir, for the loop's heartbeat (base/heartbeat.py; None: unwatched).
    run_dir: Path | None = None


class _Opener:
    """Opens handles off the loop thread and wakes the loop through a pipe when done."""

    def __init__(self) -> None:
        self.rfd, self._wfd = os.pipe()
        os.set_blocking(self.rfd, False)
        self.results: queue.Queue[
            tuple[int, frozenset[int] | None, EBPFDivert | None, float, str]
        ] = queue.Queue()
        self.busy = False
        self.requested = 0.0

    def start(self, gen: int, ports: frozenset[int] | None, filt: str, cfg: ShellConfig) -> None:
        self.busy = True
        self.requested = time.perf_counter()
        threading.Thread(target=self._open, args=(gen, ports, filt, cfg), daemon=True).start()

    def _open(self, gen: int, ports: frozenset[int] | None, filt: str, cfg: ShellConfig) -> None:
        t0 = time.perf_counter()
        log.debug(
            "opening generation %d (thread started after %.1f ms)",
            gen,
            (t0 - self.requested) * 1000,
        )
        try:
            h = EBPFDivert(filt, priority=cfg.priority, ring_bytes=cfg.ring_bytes).open()
            err = ""
        except Exception as e:  # reported to the loop, which keeps the old handle
            h, err = None, repr(e)
        self.results.put((gen, ports, h, time.perf_counter() - t0, err))
        os.write(self._wfd, b"x")

    def close(self) -> None:
        os.close(self.rfd)
        os.close(self._wfd)


class _Scanner:
    """Reads the namespace's existing connections in a child process (existing.main), whose
    stdout the loop polls: the read's ~1 s per 10 000 sockets (M21) neither blocks the loop
    nor competes with it for the interpreter lock (measured: a thread did, by 100-300 ms)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self._buf = bytearray()
        self._t0 = 0.0

    @property
    def busy(self) -> bool:
        return self.proc is not None

    def start(self) -> int:
        """Start the child; the fd to poll for its answer."""
        self._t0 = time.perf_counter()
        self._buf.clear()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kextless.actors.capture.existing"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        os.set_blocking(fd, False)
        return fd

    def on_readable(self) -> tuple[list[ExistingFlow] | None, float, str] | None:
        """Read what the child wrote; its result once it has finished, else None."""
        proc = self.proc
        assert proc is not None and proc.stdout is not None
        fd = proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                return None
            if not chunk:
                break
            self._buf += chunk
        rc = proc.wait()
        proc.stdout.close()
        self.proc = None
        secs = time.perf_counter() - self._t0
        if rc != 0:
            return None, secs, f"scan process exited with {rc}"
        try:
            return existing.decode(bytes(self._buf)), secs, ""
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            return None, secs, f"unreadable scan answer: {e}"

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:  # our own child: end it by its pid
            proc.kill()
            proc.wait(5)
            if proc.stdout is not None:
                proc.stdout.close()


class _KernelLinks:
    """What links.LinkGuard attaches to a link that appears, in kernel-cache mode: kextless_pre
    and (unless fail open) the permanent guard, in place of guard.py's temporary one. Never
    detached when the divert programs arrive: the guard is what drops what they let by."""

    def __init__(self, kc: KernelCache, ipr: Any, guard: bool) -> None:
        self.kc, self.ipr, self.guard = kc, ipr, guard

    def attach(self, index: int, name: str = "") -> None:
        attach_link(self.kc, self.ipr, index, name, self.guard)

    def detach(self, index: int) -> bool:
        return True  # permanent

    def close(self) -> None:
        pass  # the programs outlive us (adopted by the next capture, removed by down)


def attach_link(kc: KernelCache, ipr: Any, index: int, name: str, guard: bool) -> None:
    """kextless_pre on both hooks of a link, and the guard unless fail open - lo included:
    loopback traffic is diverted once, on lo egress, and a loopback packet the divert program
    let by unexamined meets the guard on lo ingress. Both programs pass the divert library's
    inbound re-injection (marked 0x4D4Axxxx, out of lo and redirected from lo ingress to its
    target link) on untouched: before they did, a guard on lo egress dropped those packets
    (their send failed with ENOBUFS) and kextless_pre on lo ingress passed those of a cached
    flow into lo's own stack, where they were lost."""
    kc.attach(ipr, index, name, guard=guard)


def start_kernel_cache(ipr: Any, cfg: ShellConfig) -> KernelCache:
    """Adopt the programs a previous capture left attached (their verdicts still apply) or
    load fresh ones; remove every other program of ours or the divert library's (orphans);
    set the pass ports; attach to every link. KernelCacheError/OSError: no kernel cache."""
    try:
        kc = KernelCache.adopt(ipr)
    except KernelCacheError as e:
        log.error("kernel cache not adopted (%s): loading afresh", e)
        kc = None
    keep = {(PRE_NAME, PRE_PREF), (GUARD_NAME, GUARD_PREF)} if kc is not None else set()
    orphans.remove_orphans(ipr, keep)
    want_guard = not cfg.fail_open
    if kc is not None and want_guard and kc.guard_fd is None:
        # A fail-open predecessor: load a guard by loading afresh, keeping its verdicts.
        old, kc = kc, KernelCache.load(cfg.flows_max, guard=True)
        n = 0
        for key, entry in old.entries():
            with contextlib.suppress(ValueError):
                kc.put(key, KAction(entry.action), entry.verdict)
                n += 1
        old.close()
        log.info("kernel cache reloaded with a guard; %d entries carried over", n)
    if kc is None:
        kc = KernelCache.load(cfg.flows_max, guard=want_guard)
    elif not want_guard and kc.guard_fd is not None:
        for link in ipr.get_links():
            with contextlib.suppress(OSError):
                tcbpf.detach(ipr, int(link["index"]), GUARD_PREF)
        log.warning("fail open: the previous capture's guard removed")
    else:
        log.info("kernel cache adopted with %d entries", sum(1 for _ in kc.entries()))
    wanted = {(proto, port) for port in cfg.exclude_ports for proto in (6, 17)}
    for proto, port in kc.pass_port_list():
        if (proto, port) not in wanted:
            kc.clear_pass_port(proto, port)
    for proto, port in sorted(wanted):
        kc.set_pass_port(proto, port)
    for link in ipr.get_links():
        attach_link(kc, ipr, int(link["index"]), str(link.get_attr("IFLA_IFNAME")), want_guard)
    return kc


#: The guard's map of redirect translations (guard.bpf.c).
REDIRECTED_MAP = "redirected"


class RedirectMap:
    """The guard's `redirected` map: the 5-tuple a redirected connection's outbound packet
    carries after its rewrite (local -> the target) -> the one the application sent, so the
    guard counts its bytes for the connection the application sees (KernelRedirect)."""

    def __init__(self, m: BpfMap) -> None:
        self.map = m

    @classmethod
    def of(cls, kc: KernelCache) -> RedirectMap | None:
        """The map of `kc`'s guard; None without a guard (fail open) or for an adopted guard
        older than the map. KernelCacheError/OSError."""
        if kc.guard_fd is None:
            return None
        fds = prog_maps(kc.guard_fd)
        fd = fds.pop(REDIRECTED_MAP, None)
        for other in fds.values():
            os.close(other)
        if fd is None:
            return None
        try:
            return cls(BpfMap(fd, REDIRECTED_MAP, FLOW_KEY.size, FLOW_KEY.size))
        except BaseException:
            os.close(fd)
            raise

    def set(self, rewritten: FlowKey, original: FlowKey) -> None:
        self.map.update(rewritten.pack(), original.pack())

    def clear(self, rewritten: FlowKey) -> bool:
        return self.map.delete(rewritten.pack())

    def clear_all(self) -> int:
        """Delete every translation (at start: a predecessor's; the ALE's replay re-adds the
        redirects that still hold); how many were deleted."""
        keys = [k for k, _v in self.map.items()]
        return sum(self.map.delete(k) for k in keys)

    def close(self) -> None:
        os.close(self.map.fd)


#: ICMP / ICMPv6 echo types (flowcache.bpf.c records the senders of the requests).
_ECHO = {pk.ICMP: {8: "request", 0: "reply"}, pk.ICMPV6: {128: "request", 129: "reply"}}


def _icmp_echo(msg: PacketHeld) -> str:
    """ "request" or "reply" for an ICMP/ICMPv6 echo, else "": the only ICMP whose sender
    kextless_pre records (errors and replies are the kernel's own, sent from softirq)."""
    types = _ECHO.get(msg.flow.protocol)
    if types is None:
        return ""
    p = pk.parse(msg.packet)
    return "" if p is None else types.get(p.icmp_type, "")


def warn_risky_macs(sys_net: Path = Path("/sys/class/net")) -> list[str]:
    """Warn about interfaces whose ARP replies libebpfdivert may misread as IP (filters.py)."""
    risky = []
    for dev in sorted(sys_net.iterdir()) if sys_net.is_dir() else []:
        with contextlib.suppress(OSError):
            mac = (dev / "address").read_text().strip()
            if mac and mac[0] in "46" and mac != "00:00:00:00:00:00":
                risky.append(dev.name)
                log.warning(
                    "interface %s has MAC %s: libebpfdivert 0.0.5 can misread ARP "
                    "replies to it as IP and lose them (ARP to some neighbours may "
                    "fail); a MAC not starting with 4 or 6 avoids it",
                    dev.name,
                    mac,
                )
    return risky


class CaptureShell:
    def __init__(self, core: CaptureCore, cfg: ShellConfig) -> None:
        self.core = core
        self.cfg = cfg
        self._stop = False
        self._lo = socket.if_nametoindex("lo")
        self.handle: EBPFDivert | None = None
        self._opener = _Opener()
        self._wanted: tuple[int, frozenset[int] | None] | None = None
        self.loss = LossCounters()
        self._closers: list[threading.Thread] = []
        self._connects = 0
        self._lost_before: int | None = None
        # Links that appear later (links.py): guarded at once, then a new handle generation.
        self._links: LinkGuard | None = None
        self._l2pass: L2Pass | None = None
        self._active: tuple[int, frozenset[int] | None] = (0, frozenset())
        self._open_started_ns = 0
        self.errors = 0
        # One Batch (receive buffer, re-injection queue) per open handle, by id().
        self._batches: dict[int, Batch] = {}
        #: ALE-bound messages of this loop pass (PacketHeld, Log, Health), sent by _flush.
        self._ale_out: list[Message] = []
        self._last_packet_ns = 0
        # Connections that predate us: scanned off the loop, handed to the core in parts;
        # blocked ones have their sockets aborted, only in the namespace this shell owns.
        self._scanner = _Scanner()
        self._scan_fd = -1
        self._poller: zmq.Poller | None = None
        self._existing: list[ExistingFlow] = []
        self._existing_at = 0
        self._destroyer: existing.Destroyer | None = None
        # The kernel flow cache (None: per-port filters and handle swaps).
        self._kc: KernelCache | None = None
        self._redirects: RedirectMap | None = None
        self._ipr: Any = None
        # This capture's liveness for kextless_pre (parked.py): one end of a socket pair in
        # its `reader` map while the handle is read; the kernel removes it when we die.
        self._reader: tuple[socket.socket, socket.socket] | None = None
        self.park_counts: dict[str, int] = dict.fromkeys(
            ("parked_replayed", "parked_stale", "parked_bad", "reheld", "shadow_replayed"), 0
        )
        #: The previous capture's last heartbeat (0: none): which shadow SYNs to replay.
        self._last_beat_ns = 0

    def stop(self, *_: object) -> None:
        self._stop = True

    # ---- main loop --------------------------------------------------------------------------

    def run(self) -> int:
        if self.cfg.run_dir is not None:  # before ours overwrites it
            self._last_beat_ns = read_heartbeats(self.cfg.run_dir).get("capture", 0)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        # Watch the connection: when the ALE restarts, re-ask what it lost (core.resync).
        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sock.connect(self.cfg.ale_endpoint)
        self.sock = sock
        ours = self.cfg.owns_namespace and not in_initial_netns()
        if ours and self.cfg.kernel_cache:
            self._start_kernel()
        # The namespace's only divert user: anything attached now (divert programs, our own
        # l2pass and guards) is a killed capture's orphan, still run on every packet. Remove
        # it before our own programs join it (the kernel cache adopted its own already).
        if self.cfg.owns_namespace and self._kc is None:
            try:
                orphans.remove_orphans()
            except Exception as e:  # never fatal: the new handle still guards the namespace
                log.error("orphan divert programs not checked: %s", e)
        # Non-IP frames skip the divert program (l2pass.py): ARP is never misread as IP and
        # lost by the filter's "every protocol" clauses. Only in a namespace we own.
        if ours and self._kc is None:
            try:
                self._l2pass = L2Pass.open()
                self._l2pass.sync()
            except Exception as e:  # ARP may then be lost (below); the capture still guards
                log.error("l2pass not attached: %s", e)
        if self._l2pass is None:
            warn_risky_macs()
        with contextlib.suppress(OSError):
            # Verdicts and handle swaps must not queue behind the traffic they police: a
            # saturated CPU (bulk apps + softirq) otherwise adds tens of ms to a block.
            os.setpriority(os.PRIO_PROCESS, 0, -10)
        first = self._filter(frozenset())
        self.handle = EBPFDivert(
            first, priority=self.cfg.priority, ring_bytes=self.cfg.ring_bytes
        ).open()
        log.info("handle open (priority %d): %s", self.cfg.priority, first)
        self._run_actions(self.core.start(os.getpid(), time.monotonic_ns()))
        pfd = self._start_reading()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        poller.register(self._opener.rfd, zmq.POLLIN)
        self._poller = poller
        hfd = self._event_fd(self.handle)
        poller.register(hfd, zmq.POLLIN)
        if pfd >= 0:
            poller.register(pfd, zmq.POLLIN)
        lfd = -1
        # Never drop traffic of the machine's own namespace, nor touch a test's tc filters.
        if self.cfg.owns_namespace and in_initial_netns():
            log.error("in the host's network namespace: links added later are NOT guarded")
        elif self.cfg.owns_namespace:
            self._destroyer = existing.Destroyer()
            kernel = (
                None
                if self._kc is None
                else _KernelLinks(self._kc, self._ipr, not self.cfg.fail_open)
            )
            self._links = LinkGuard(self.cfg.priority, nft=not self.cfg.fail_open, tc_guard=kernel)
            lfd = self._links.fileno()
            poller.register(lfd, zmq.POLLIN)
            self._on_links(self._links.start(time.monotonic_ns()))
        core = self.core
        last_read = next_stats = time.monotonic_ns()
        heartbeat = open_heartbeat(self.cfg.run_dir, "capture")
        try:
            while not self._stop:
                now = time.monotonic_ns()
                if heartbeat is not None:
                    heartbeat.beat(now)  # the watchdog's proof that this loop still turns
                bound = (
                    _BUSY_RECV_TIMEOUT_NS
                    if now - self._last_packet_ns < _BUSY_NS
                    else _IDLE_RECV_TIMEOUT_NS
                )
                if now - last_read >= bound:
                    self._drain_handle(self.handle)  # a packet whose wakeup was missed
                    last_read = now
                deadline = core.next_deadline_ns()
                if deadline is not None and now >= deadline:
                    self._run_actions(core.on_deadline(now))
                    deadline = core.next_deadline_ns()
                if now >= next_stats:
                    next_stats = now + _STATS_NS
                    self._check_stats()
                # Sleep until the core's next deadline, the next input, or the read bound.
                read_ms = (last_read + bound - now + 999_999) // 1_000_000
                if self._existing:  # a scan's parts still to hand over: do not sleep
                    self._existing_part()
                    read_ms = 0
                for item, _ev in poller.poll(capped_timeout_ms(wait_ms(deadline, now, read_ms))):
                    if item is sock:
                        self._drain_ale()
                    elif item is monitor:
                        self._on_monitor(recv_monitor_message(monitor)["event"])
                    elif item == self._opener.rfd:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._opener.rfd, 64)
                        newfd = self._finish_swap()
                        if newfd is not None:
                            poller.unregister(hfd)
                            hfd = newfd
                            poller.register(hfd, zmq.POLLIN)
                    elif item == self._scan_fd:
                        self._on_scan_output()
                    elif item == hfd:
                        self._drain_handle(self.handle)
                        last_read = time.monotonic_ns()
                    elif item == pfd:
                        self._replay_parked()
                    elif item == lfd and self._links is not None:
                        need = self._links.on_event(time.monotonic_ns())
                        if self._l2pass is not None:  # before the new link's handle opens
                            self._l2pass.sync()
                        self._on_links(need)
                # Verdicts, deadlines and drains queued re-injections: one send_ex for all.
                self._flush()
        finally:
            # The whole instance stopping (`down`, a SIGTERM to supervisord), not just us being
            # restarted: then our kernel programs and nft table go too, leaving the network as
            # it was; a restart keeps them (fail closed until the next capture adopts them).
            state = (
                "no run dir"
                if self.cfg.run_dir is None
                else supervisor_state(RuntimeDir(self.cfg.run_dir))
            )
            whole = state == "SHUTDOWN"
            log.info("stopping; supervisord: %s", state)
            if not whole:
                self._stop_reading()  # what arrives from now on waits for the next capture
            self._resolve_held()
            self._send_ale()
            self._shutdown(remove_programs=whole)
            if heartbeat is not None:
                heartbeat.close()
            sock.disable_monitor()
            monitor.close(0)
            sock.close(0)
            ctx.term()
        return 0

    # ---- parked packets (parked.py) ---------------------------------------------------------

    def _start_reading(self) -> int:
        """The handle is open: tell kextless_pre a capture reads (parking stops), then replay
        what it parked while none did. The parked ring's fd (-1: no parking here)."""
        kc = self._kc
        if kc is None or kc.park_ctl is None or kc.park_ring is None:
            return -1
        try:
            self._reader = socket.socketpair()  # close-on-exec: a child never keeps it
            kc.park_ctl.register(self._reader[0].fileno(), os.getpid())
        except (OSError, KernelCacheError) as e:
            log.error("capture not registered as the reader (packets stay parked): %s", e)
        self._replay_shadow()
        self._replay_parked()
        return kc.park_ring.fileno()

    def _replay_shadow(self) -> None:
        """The TCP openers that reached the divert program just before our predecessor died
        and have no verdict in the kernel map: through the core again (parked.recent_syns)."""
        kc = self._kc
        if kc is None or kc.syn_shadow_fd is None:
            return
        now = time.monotonic_ns()
        try:
            syns = recent_syns(read_shadow(kc.syn_shadow_fd, kc.ncpus), self._last_beat_ns, now)
        except (OSError, KernelCacheError) as e:
            log.error("shadow SYNs not read: %s", e)
            return
        todo = []
        for key, p in syns:
            entry = kc.get(key)
            if entry is None or entry.action not in (KAction.PASS, KAction.DROP):
                todo.append(p)
        for p in todo:
            self._replay(self._token(p.raw, p.ifindex, p.inbound, now), now, "a shadow SYN")
        self.park_counts["shadow_replayed"] += len(todo)
        if todo:
            log.info(
                "replayed %d SYN(s) our predecessor may not have asked about (of %d recent)",
                len(todo),
                len(syns),
            )
            self._flush()

    def _stop_reading(self) -> None:
        kc = self._kc
        if kc is None or kc.park_ctl is None or self._reader is None:
            return
        try:
            kc.park_ctl.unregister()
        except (OSError, KernelCacheError) as e:
            log.error("reader not removed (it goes when we exit): %s", e)

    def _replay_parked(self) -> None:
        """Every packet parked while no capture read, through the core as if just diverted
        (asked, held, decided like any other); one older than parked.MAX_AGE_NS is dropped."""
        kc = self._kc
        ring = kc.park_ring if kc is not None else None
        if ring is None or self.handle is None:
            return
        counts = self.park_counts
        for _ in range(_PARKED_TAKES):  # bounded: the ring's fd wakes the loop for the rest
            try:
                parked, bad = ring.take()
            except (OSError, KernelCacheError) as e:
                log.error("parked packets not read: %s", e)
                return
            counts["parked_bad"] += bad
            if not parked:
                break
            now = time.monotonic_ns()
            replayed = 0
            for p in parked:
                if not fresh(p, now):
                    counts["parked_stale"] += 1
                elif self._replay(self._token(p.raw, p.ifindex, p.inbound, now), now, "a parked"):
                    replayed += 1
            counts["parked_replayed"] += replayed
            oldest = (now - parked[0].ktime_ns) / 1e6
            log.info(
                "replayed %d parked packet(s) (oldest %.0f ms; %d too old)",
                replayed,
                oldest,
                len(parked) - replayed,
            )
            self._flush()

    def _rehold(self, msg: Rehold, now: int) -> None:
        """A packet our killed predecessor held, still undecided: held again, as if just
        received (the ALE gives it back the pending id it had)."""
        if self.handle is None or not msg.ifindex or not msg.packet:
            return
        tok = self._token(msg.packet, msg.ifindex, msg.direction is Direction.INBOUND, now)
        self.park_counts["reheld"] += 1
        self._replay(tok, now, "a re-held")

    def _replay(self, tok: Captured, now: int, what: str) -> bool:
        """A packet that did not come from the handle (parked, a shadow SYN, re-held) through
        the core as if it had; False if the core failed on it (dropped, logged)."""
        try:
            acts = self.core.on_packet(tok, tok.raw, tok.outbound, tok.loopback, now)
        except Exception:
            log.exception("core failed on %s %d-byte packet: dropped", what, len(tok.raw))
            return False
        self._run_actions(acts)
        return True

    def _token(self, raw: bytes, ifindex: int, inbound: bool, now: int) -> Captured:
        """A packet we did not receive from the handle (parked, re-held), as a detached token
        with a fresh address: re-injected where it was met."""
        loopback = ifindex == self._lo
        outbound = loopback or not inbound
        flags = (int(AddrFlag.OUTBOUND) if outbound else 0) | (
            int(AddrFlag.LOOPBACK) if loopback else 0
        )
        if raw and raw[0] >> 4 == 6:
            flags |= int(AddrFlag.IPV6)
        return Captured(raw, fresh_address(ifindex, outbound, loopback), flags, ifindex, now, None)

    # ---- the kernel flow cache --------------------------------------------------------------

    def _start_kernel(self) -> None:
        """Adopt or load the kernel cache; on failure the per-port filter path is used."""
        from pyroute2 import IPRoute

        self._ipr = IPRoute()
        try:
            self._kc = start_kernel_cache(self._ipr, self.cfg)
        except Exception as e:  # no TC BPF here: per-port filters and handle swaps
            log.error("kernel flow cache unavailable (%s): per-port filters instead", e)
            self._kc = None
        self.core.use_kernel_cache(self._kc is not None)
        if self._kc is not None and self._kc.park_ctl is not None:
            try:  # until our handle reads, what would be diverted is parked (not with fail open)
                self._kc.park_ctl.enable(not self.cfg.fail_open)
            except (OSError, KernelCacheError) as e:
                log.error("parking not set: %s", e)
        elif self._kc is not None:
            log.warning(
                "kextless_pre adopted without parking (an older one): a packet sent"
                " while no capture runs is dropped until its sender resends it"
            )
        if self._kc is not None:
            self._open_redirects(self._kc)
            log.info(
                "kernel flow cache on %d link(s), guard %s",
                len(self._kc.attached),
                "OFF (fail open)" if self.cfg.fail_open else "on (fail closed)",
            )

    def _open_redirects(self, kc: KernelCache) -> None:
        """The guard's redirect map, emptied of a predecessor's translations."""
        try:
            self._redirects = RedirectMap.of(kc)
            if self._redirects is not None and self._redirects.clear_all():
                log.info("a previous capture's redirect byte translations cleared")
        except (OSError, KernelCacheError) as e:
            log.error("the guard's redirect map cannot be opened: %s", e)
            self._redirects = None
        if self._redirects is None and kc.guard_fd is not None:
            log.warning(
                "the guard has no redirect map (an older one, adopted): a redirected"
                " connection's outbound bytes count under the rewritten 5-tuple until the"
                " programs are loaded afresh (kextless down, then up)"
            )

    def _filter(self, ports: frozenset[int] | None) -> str:
        if self._kc is not None:
            return filters.build_all()
        return filters.build(ports, self.cfg.exclude_ports)

    def _run_kernel(
        self,
        a: KernelPut | KernelDelete | KernelRedirect | KernelClear | KernelProbe | KernelAudit,
    ) -> None:
        kc = self._kc
        if kc is None:
            raise RuntimeError("kernel action without a kernel cache")
        if isinstance(a, KernelPut):
            action = KAction.PASS if a.verdict is KernelVerdict.PASS else KAction.DROP
            kc.put(FlowKey.from_flow(a.flow), action, int(a.reason))
        elif isinstance(a, KernelDelete):
            key = FlowKey.from_flow(a.flow)
            kc.retire(key) if a.keep_counts else kc.delete(key)
        elif isinstance(a, KernelRedirect):
            self._run_redirect(a)
        elif isinstance(a, KernelClear):
            n = kc.clear()
            log.info("kernel cache cleared: %d entries", n)
        elif isinstance(a, KernelAudit):
            flows = [Flow(k.proto, k.src, k.sport, k.dst, k.dport) for k, _e in kc.entries()]
            self._run_actions(self.core.kernel_audit(flows, time.monotonic_ns()))
        else:
            seen: dict[Flow, int | None] = {}
            for flow in a.flows:
                key = FlowKey.from_flow(flow)
                last = 0
                for k in (key, key.reversed()):
                    e = kc.get(k)
                    if e is not None:
                        last = max(last, e.last_seen_ns)
                seen[flow] = last or None
            self._run_actions(self.core.kernel_activity(seen, time.monotonic_ns()))

    def _run_redirect(self, a: KernelRedirect) -> None:
        """The guard's translation of `a.flow`'s rewritten outbound 5-tuple (local -> the
        target it is redirected to) back to the flow's own, written or removed."""
        rmap = self._redirects
        if rmap is None:
            return  # fail open (nothing counts what passes Python) or an older guard
        f = a.flow
        rewritten = FlowKey.from_flow(Flow(f.protocol, f.local_ip, f.local_port, *a.target))
        if a.counted:
            rmap.set(rewritten, FlowKey.from_flow(f))
        else:
            rmap.clear(rewritten)

    def _on_monitor(self, event: int) -> None:
        """Track the ALE connection; on a reconnect, resend what the lost peer held."""
        if event == zmq.EVENT_DISCONNECTED:
            self._lost_before = self.core.next_hold_id()
            log.warning("ALE connection lost; %d packet(s) held", len(self.core.held))
        elif event == zmq.EVENT_CONNECTED:
            self._connects += 1
            if self._connects > 1:
                mark = self._lost_before
                before = self.core.next_hold_id() if mark is None else mark
                self._run_actions(self.core.resync(os.getpid(), before, time.monotonic_ns()))
            self._lost_before = None

    def _event_fd(self, h: EBPFDivert) -> int:
        return int(h._event_fd)  # the level-triggered fd pydivert's asyncio path waits on

    def _batch(self, h: EBPFDivert) -> Batch:
        b = self._batches.get(id(h))
        if b is None or b.handle is not h:
            b = self._batches[id(h)] = Batch(h, _RECV_BATCH, self._lo)
        return b

    def _flush(self) -> None:
        """Send what is queued: ALE-bound messages (one frame, a Bundle when several) and the
        re-injections on the active handle (one send_ex call)."""
        self._send_ale()
        if self.handle is None:
            return
        b = self._batch(self.handle)
        if not b.pending():
            return
        failed = b.counters.send_failed + b.counters.send_unconfirmed
        try:
            b.flush()
        except OSError as e:
            self.errors += 1
            log.error("re-injection failed: %s", e)
        self.errors += b.counters.send_failed + b.counters.send_unconfirmed - failed

    def _drain_handle(self, h: EBPFDivert | None, quiet: bool = False) -> None:
        if h is None:
            return
        core = self.core
        b = self._batch(h)
        for _ in range(max(1, _BATCH // b.size)):
            try:
                toks = b.recv(0)  # flushes b's queue first: it points into b's buffer
            except OSError as e:
                if not quiet:  # a shut-down handle reports EBADF once it is empty
                    log.error("recv failed: %s", e)
                return
            if toks:
                self._last_packet_ns = time.monotonic_ns()
            for t in toks:
                try:
                    acts = core.on_packet(
                        t, t.raw, t.outbound, t.loopback, t.timestamp or time.monotonic_ns()
                    )
                except Exception:
                    # Never crash on a packet: drop it (fail closed) and keep serving.
                    log.exception("core failed on a %d-byte packet: dropped", len(t.raw))
                    b.drop(t)
                    continue
                if acts:
                    self._run_actions(acts)
            if len(toks) < b.size:
                break
        self._flush()

    def _drain_ale(self) -> None:
        """Up to `_BATCH` ALE frames (a frame may be a Bundle of many messages); the poller
        comes back at once for the rest, after the handle's packets (a scan's thousands of
        answers would otherwise hold them, M21)."""
        sock = self.sock
        debug = log.isEnabledFor(logging.DEBUG)
        for _ in range(_BATCH):
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msgs = unbundle(decode(frame))
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                log.warning("garbage from the ALE ignored (%d bytes): %s", len(frame), e)
                continue
            now = time.monotonic_ns()
            for msg in msgs:
                if type(msg) is Rehold:
                    self._rehold(msg, now)
                    continue
                try:
                    acts = self.core.on_message(msg, now)
                except Exception:
                    log.exception("core failed on %s", type(msg).__name__)
                    continue
                if debug:
                    log.debug("ALE: %s", msg)
                self._run_actions(acts)

    # ---- actions ----------------------------------------------------------------------------

    def _run_actions(self, acts: list[Action]) -> None:
        for a in acts:
            try:
                self._run(a)
            except Exception as e:
                self.errors += 1
                log.error("%s failed: %s", type(a).__name__, e)

    def _run(self, a: Action) -> None:
        b = self._batch(self.handle)
        if isinstance(a, Pass):
            b.reinject(a.token)  # type: ignore[arg-type]  # queued; sent by _flush
        elif isinstance(a, Drop):
            if isinstance(a.token, Captured):
                b.drop(a.token)  # no copy at the next receive
        elif isinstance(a, ToAle):
            # sent by _flush, with the loop pass's others
            self._ale_out.append(self._stamp(a.msg))
        elif isinstance(a, Reroute):
            b.reroute(a.token, a.raw, a.loopback)  # type: ignore[arg-type]
        elif isinstance(a, Inject):
            # A fresh address (batch.inject_like): re-using the captured packet's address
            # (even with Outbound flipped) re-injects towards where the original came from
            # (measured: an RST for an inbound SYN never reached the remote that way).
            b.inject_like(a.like, a.raw, a.inbound)  # type: ignore[arg-type]
        elif isinstance(a, SetFilter):
            self._wanted = (a.generation, a.ports)
            self._maybe_open()
        elif isinstance(a, ScanExisting):
            if not self._scanner.busy and self._poller is not None:  # one at a time
                self._scan_fd = self._scanner.start()
                self._poller.register(self._scan_fd, zmq.POLLIN)
        elif isinstance(a, DestroySocket):
            self._destroy(a)
        elif isinstance(
            a, KernelPut | KernelDelete | KernelRedirect | KernelClear | KernelProbe | KernelAudit
        ):
            self._run_kernel(a)

    def _stamp(self, msg: Message) -> Message:
        """A PacketHeld with the link its packet came in on (so a successor can hold it again
        if we die: Rehold) and, for an outbound TCP/UDP opener, the pid `kextless_pre`
        recorded at egress (the connect()/sendmsg() caller's context): the ALE then emits the
        info at once instead of waiting for the lifecycle actor's attribution (docs M25). An
        ICMP echo request the same way (the sendto() caller; nothing else can tell: no socket
        event names an ICMP flow), and the echo reply that comes back for it (same flow key:
        local first). I/O, so here and not in the core; a miss or no owners map leaves
        process_id 0."""
        if not isinstance(msg, PacketHeld):
            return msg
        h = self.core.held.get(msg.hold_id)
        tok = h.token if h is not None else None
        ifindex = tok.ifindex if isinstance(tok, Captured) and not msg.ifindex else 0
        pid = 0 if msg.process_id else self._owner_pid(msg)
        if pid and ifindex:
            return msgspec.structs.replace(msg, process_id=pid, ifindex=ifindex)
        if pid:
            return msgspec.structs.replace(msg, process_id=pid)
        if ifindex:
            return msgspec.structs.replace(msg, ifindex=ifindex)
        return msg

    def _owner_pid(self, msg: PacketHeld) -> int:
        """The pid kextless_pre recorded for this held packet's opener (0: none)."""
        owners = self._kc.owners if self._kc is not None else None
        if owners is None:
            return 0
        outbound = msg.direction is Direction.OUTBOUND
        if msg.flow.protocol in (pk.TCP, pk.UDP):
            if not outbound:
                return 0
        elif _icmp_echo(msg) != ("request" if outbound else "reply"):
            return 0
        try:
            owner = owners.get(FlowKey.from_flow(msg.flow))
        except (OSError, KernelCacheError) as e:
            log.debug("owner lookup failed: %s", e)
            return 0
        return owner.pid if owner is not None else 0

    # ---- connections that predate us --------------------------------------------------------

    def _on_scan_output(self) -> None:
        """The scan child wrote: once it is done, queue its flows for the core
        (`_existing_part`)."""
        done = self._scanner.on_readable()
        if done is None:
            return
        if self._poller is not None:
            self._poller.unregister(self._scan_fd)
        self._scan_fd = -1
        flows, secs, err = done
        if flows is None:
            log.error("existing connections not read (never asked about): %s", err)
            return
        log.info("existing connections: %d read in %.1f ms, off the loop", len(flows), secs * 1e3)
        self._existing, self._existing_at = flows, 0
        if not flows:
            self._run_actions(self.core.existing([], time.monotonic_ns()))

    def _existing_part(self) -> None:
        """Hand the core the next part of the scan; packets are served before the next one."""
        i = self._existing_at
        part = self._existing[i : i + _EXISTING_PART]
        self._existing_at = i + len(part)
        last = self._existing_at >= len(self._existing)
        if last:
            self._existing, self._existing_at = [], 0
        self._run_actions(self.core.existing(part, time.monotonic_ns(), last=last))

    def _destroy(self, a: DestroySocket) -> None:
        """Abort a blocked existing connection's socket (the kernel then resets the peer)."""
        if self._destroyer is None:  # a test's shell, or the host's namespace: never
            log.warning(
                "not aborting the socket of a blocked existing connection: namespace not ours"
            )
            return
        t0 = time.perf_counter()
        n = self._destroyer.destroy(a.flow)
        log.info(
            "aborted %d socket(s) of a blocked existing connection in %.2f ms",
            n,
            (time.perf_counter() - t0) * 1e3,
        )

    # ---- handle swaps -----------------------------------------------------------------------

    def _maybe_open(self) -> None:
        if self._opener.busy or self._wanted is None:
            return
        gen, ports = self._wanted
        self._wanted = None
        filt = self._filter(ports)
        ok, pos, msg = EBPFDivert.check_filter(filt)
        if not ok:
            log.warning(
                "filter for %d ports rejected (%s at %d): diverting all TCP",
                len(ports or ()),
                msg,
                pos,
            )
            ports = None
            filt = filters.build(None, self.cfg.exclude_ports)
        self._open_started_ns = time.monotonic_ns()
        self._opener.start(gen, ports, filt, self.cfg)

    def _on_links(self, need_handle: bool) -> None:
        """After a link check: refusals to the ALE as Error Logs; a new handle if one is due."""
        if self._links is not None:
            self._to_ale(self._links.take_logs())
        if need_handle:
            self._reopen()

    def _reopen(self) -> None:
        """A new handle generation with the active filter, for links the handle lacks; a swap
        already wanted or under way does (links.py re-checks after every swap)."""
        if not self._opener.busy and self._wanted is None:
            self._wanted = self._active
            self._maybe_open()

    def _finish_swap(self) -> int | None:
        """Adopt the freshly opened handle: drain and close the old one; new event fd or None."""
        try:
            gen, ports, new, secs, err = self._opener.results.get_nowait()
        except queue.Empty:
            return None
        self._opener.busy = False
        newfd = None
        if new is None:
            log.error("opening handle generation %d failed: %s (keeping the old one)", gen, err)
            self._run_actions(self.core.filter_active(gen, ports, time.monotonic_ns()))
        else:
            old, self.handle = self.handle, new
            # The new handle shadows the old one from now on: whatever the old one still
            # holds is handled by the core and sent through the new handle.
            # Stop the old handle taking packets (unshut, it would also catch packets the new
            # one reinjects), drain what it holds, and close it off the loop: a close waits
            # for the kernel to detach its programs (docs/measurements.md M2), during which
            # the new handle's packets would wait.
            if old is not None:
                self._read_loss(old)  # what the old handle lost since the last check
                with contextlib.suppress(OSError):
                    old.shutdown(SHUTDOWN_RECV)
                self._drain_all(old, quiet=True)
                self._flush()  # the old handle's packets, re-injected through the new one
                self._batches.pop(id(old), None)
                closer = threading.Thread(target=_close_quietly, args=(old,), daemon=True)
                closer.start()
                self._closers = [t for t in self._closers if t.is_alive()] + [closer]
            newfd = self._event_fd(new)
            self._active = (gen, ports)
            self.loss.new_handle()
            desc = "all TCP" if ports is None else f"{len(ports)} port(s)"
            log.info(
                "handle generation %d active in %.1f ms (open %.1f ms; per-packet: %s)",
                gen,
                (time.perf_counter() - self._opener.requested) * 1000,
                secs * 1000,
                desc,
            )
            self._run_actions(self.core.filter_active(gen, ports, time.monotonic_ns()))
            if self._links is not None:
                self._on_links(self._links.after_swap(self._open_started_ns))
        self._maybe_open()
        return newfd

    def _drain_all(self, h: EBPFDivert | None, quiet: bool = False) -> None:
        while h is not None:
            before = self.core.counters["packets"]
            self._drain_handle(h, quiet)
            if self.core.counters["packets"] - before < _BATCH:
                return

    def _check_stats(self) -> None:
        """Every _STATS_NS: loss counters to the capture log, Warning Logs and Health (which the
        ALE forwards to the broker, so `kextless status` shows them)."""
        if self.handle is None:
            return
        self._read_loss(self.handle)
        self._read_kernel()
        self._to_ale([self.loss.health(os.getpid(), self.core.counters | self.park_counts)])

    def _read_loss(self, h: EBPFDivert) -> None:
        try:
            st = h.stats()
        except Exception as e:
            log.warning("stats unavailable: %s", e)
            return
        logs = self.loss.observe(st, time.time())
        for msg in logs:
            log.warning("%s", msg.line)
        self._to_ale(logs)
        log.debug("stats %s counters %s", st, self.core.counters)

    def _read_kernel(self) -> None:
        """The kernel programs' counters; a Warning Log when the guard dropped more."""
        kc = self._kc
        if kc is None:
            return
        try:
            pre = {k.name.lower(): v for k, v in kc.stats().items()}
            g = kc.guard_stats() if not self.cfg.fail_open else None
        except OSError as e:
            log.warning("kernel cache stats unavailable: %s", e)
            return
        logs = self.loss.observe_kernel(None if g is None else g.dropped, pre, time.time())
        for msg in logs:
            log.warning("%s", msg.line)
        self._to_ale(logs)

    def _to_ale(self, msgs: list[Log] | list[Health]) -> None:
        self._ale_out.extend(msgs)
        self._send_ale()

    def _send_ale(self) -> None:
        """The queued ALE-bound messages, in order, as few frames as fit (encode_many)."""
        out = self._ale_out
        if not out:
            return
        self._ale_out = []
        frames = encode_many(out)
        for i, frame in enumerate(frames):
            try:
                self.sock.send(frame, zmq.NOBLOCK)
            except zmq.Again:
                lost = len(out) - i * BUNDLE_MAX
                log.warning("ALE queue full: %d message(s) not sent (held packets expire)", lost)
                return

    def _remove_programs(self) -> None:
        """The instance is stopping: our TC programs off every link and the nft table gone."""
        kc = self._kc
        if kc is None or self._ipr is None:
            return
        links = sorted(kc.attached.items())
        for index, _name in links:
            try:
                kc.detach(self._ipr, index)
            except Exception as e:  # a link gone meanwhile took its filters with it
                log.warning("kernel programs on ifindex %d not removed: %s", index, e)
        removed: list[str] = []
        if self._links is not None and self._links.nft is not None:  # we made one
            removed, errors = nftguard.remove_tables()
            for error in errors:
                log.error("nft table not removed: %s", error)
        log.info(
            "instance stopping: kernel programs removed from %d link(s), %s",
            len(links),
            ", ".join(removed) or "no nft table",
        )

    def _resolve_held(self) -> None:
        """Stopping: every held packet gets `stop_verdict` now, not dropped with the handle."""
        ids = tuple(self.core.held)
        if not ids or self.handle is None:
            return
        verdict = self.cfg.stop_verdict
        now = time.monotonic_ns()
        try:
            if verdict in (Verdict.ACCEPT, Verdict.PERMANENT_ACCEPT):
                # Accepted for good: with no capture after us, a temporary Accept's replies
                # would only meet the guard; the kernel map lets the rest of the flow pass.
                for flow in {h.flow for h in self.core.held.values()}:
                    cache_set = CacheSet(flow, Verdict.PERMANENT_ACCEPT)
                    self._run_actions(self.core.on_message(cache_set, now))
            self._run_actions(self.core.on_message(Decision(ids, verdict), now))
            self._flush()
        except Exception as e:  # stopping anyway: the rest of the shutdown must still run
            log.error("held packets not resolved at stop: %s", e)
            return
        log.info("stopping: %d held packet(s) given %s", len(ids), verdict.kext_name)

    def _shutdown(self, remove_programs: bool = False) -> None:
        h, self.handle = self.handle, None
        held = len(self.core.held)
        if h is not None:
            with contextlib.suppress(Exception):
                h.close()
        for t in self._closers:  # old handles must be gone (tc filters removed) before exit
            t.join(10)
        # A handle still being opened is closed when it arrives.
        if self._opener.busy:
            with contextlib.suppress(queue.Empty):
                late = self._opener.results.get(timeout=5)[2]
                if late is not None:
                    late.close()
        self._opener.close()
        self._scanner.close()
        if self._destroyer is not None:
            self._destroyer.close()
        if self._links is not None:
            self._links.close()  # guards still attached (links never diverted) come off
        if self._l2pass is not None:
            self._l2pass.close()
        if self._kc is not None:
            self._read_kernel()  # the last drops, to the log
            if remove_programs:
                self._remove_programs()
            self._kc.close()  # fds only: the programs stay attached (fail closed, adopted)
        if self._redirects is not None:
            self._redirects.close()
        if self._ipr is not None:
            with contextlib.suppress(Exception):
                self._ipr.close()
        log.info("handles closed; %d held packet(s) dropped; counters %s", held, self.core.counters)


def _close_quietly(h: EBPFDivert) -> None:
    try:
        h.close()
    except Exception as e:
        log.warning("closing an old handle failed: %s", e)


def install_signals(shell: CaptureShell) -> None:
    signal.signal(signal.SIGTERM, shell.stop)
    signal.signal(signal.SIGINT, shell.stop)
