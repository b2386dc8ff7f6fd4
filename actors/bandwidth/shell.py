"""The bandwidth actor's I/O shell: the kernel's counter maps (read-only), one DEALER.

Runs inside the guarded namespace (`ip netns exec`), where it finds the maps through the TC
filters of the capture's programs on the namespace's links (base.kernel_maps.CounterMaps,
the way a restarted capture adopts them): no bpffs, no shared state with the capture, and map
fds opened BPF_F_RDONLY, so this process can never change what passes. It re-checks the
programs' ids at every read, so a capture that loaded fresh programs is followed within one
poll. Until a capture has attached them there is nothing to read and every answer is empty.

The broker routes GetBandwidthStats here because our Hello says we own it; the answer
(Emits of BandwidthStatsV4/V6 infos) goes back on the same DEALER.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import struct
import time
from pathlib import Path
from typing import Any

import msgspec
import zmq

from kextless.actors.bandwidth.core import BandwidthCore, Effect, ReadCounters, Reading, Source
from kextless.base.cores import wait_ms
from kextless.base.heartbeat import capped_timeout_ms, open_heartbeat
from kextless.base.kernel_maps import (
    PAYLOAD_OFFSET,
    REINJECTED_PAYLOAD_OFFSET,
    CounterMaps,
    KernelCacheError,
    attached_program_ids,
)
from kextless.protocol import messages as m
from kextless.protocol.enums import CommandType, Severity
from kextless.protocol.logtag import source_tag

log = logging.getLogger("bandwidth")
_U64 = struct.Struct("=Q")

OWNED_COMMANDS = (CommandType.GET_BANDWIDTH_STATS,)
HEALTH_NS = 1_000_000_000
_BATCH = 256


def local_addresses(ipr: Any) -> frozenset[bytes]:
    """Every address of the namespace's links, packed (4 or 16 bytes)."""
    import ipaddress

    out = set()
    for a in ipr.get_addr():
        text = a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
        if text:
            out.add(ipaddress.ip_address(text.split("%")[0]).packed)
    return frozenset(out)


class BandwidthShell:
    def __init__(
        self,
        core: BandwidthCore,
        broker_endpoint: str,
        ipr: Any | None = None,
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
        run_dir: Path | None = None,
    ) -> None:
        self.core = core
        self.heartbeat = open_heartbeat(run_dir, "bandwidth", broker_endpoint)
        self.ctx = ctx or zmq.Context.instance()
        self.broker = self.ctx.socket(zmq.DEALER)
        self.broker.setsockopt(zmq.LINGER, 0)
        self.broker.setsockopt(zmq.IDENTITY, b"bandwidth")
        self.broker.connect(broker_endpoint)
        if ipr is None:
            from pyroute2 import IPRoute

            ipr = IPRoute()
        self.ipr = ipr
        self.maps: CounterMaps | None = None
        self.started_boot_ns = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        self._running = True
        self._hello = m.encode(
            m.Hello("bandwidth", os.getpid(), m.CONTRACT_VERSION, OWNED_COMMANDS)
        )
        self.read_ms = 0.0
        self.read_errors = 0
        self._last_error = ""

    def stop(self, *_: object) -> None:
        self._running = False

    # ---- the maps ---------------------------------------------------------------------------

    def _open(self) -> None:
        """(Re)find the maps if the attached programs changed."""
        try:
            ids = attached_program_ids(self.ipr)
        except OSError as e:
            self._error(f"listing the namespace's TC programs failed: {e}")
            return
        if self.maps is not None and self.maps.program_ids == ids:
            return
        if self.maps is not None:
            self.maps.close()
            self.maps = None
        if not ids:
            return
        try:
            self.maps = CounterMaps.open(self.ipr)
        except KernelCacheError as e:
            self._error(f"the capture's counter maps cannot be read: {e}")
            return
        if self.maps is not None:
            log.info(
                "reading counters of programs %s (flows map %d, reinjected %s)",
                list(self.maps.program_ids),
                self.maps.flows.map_id,
                "absent (fail open: no guard)"
                if self.maps.reinjected is None
                else self.maps.reinjected.map_id,
            )

    def read(self) -> list[Effect]:
        """Read both maps into the core."""
        t0 = time.perf_counter()
        self._open()
        readings: list[Reading] = []
        maps = self.maps
        if maps is not None:
            try:
                cache, reinj = Source.CACHE, Source.REINJECTED
                at = PAYLOAD_OFFSET
                readings = [(cache, k, _U64.unpack_from(v, at)[0]) for k, v in maps.flows.items()]
                if maps.reinjected is not None:
                    at = REINJECTED_PAYLOAD_OFFSET
                    readings += [
                        (reinj, k, _U64.unpack_from(v, at)[0]) for k, v in maps.reinjected.items()
                    ]
            except KernelCacheError as e:
                self._error(f"reading the counter maps failed: {e}")
                maps.close()
                self.maps = None
                return []
        gen = maps.program_ids if maps is not None else ()
        fresh = maps is not None and maps.loaded_boot_ns >= self.started_boot_ns
        try:
            local = local_addresses(self.ipr)
        except OSError as e:
            self._error(f"reading the namespace's addresses failed: {e}")
            return []
        out = self.core.poll(readings, gen, fresh, local, time.monotonic_ns())
        self.read_ms = (time.perf_counter() - t0) * 1000
        return out

    def _error(self, text: str) -> None:
        self.read_errors += 1
        if text != self._last_error:  # one line per new problem, not one per poll
            self._last_error = text
            log.error("%s", text)
            self._send(m.Log(Severity.ERROR, f"{source_tag(1)} {text}"))

    # ---- effects ----------------------------------------------------------------------------

    def _send(self, msg: m.Message) -> None:
        try:
            self.broker.send(m.encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            log.warning("broker not reachable; dropped %s", type(msg).__name__)

    def carry_out(self, effects: list[Effect]) -> None:
        for eff in effects:
            if isinstance(eff, ReadCounters):
                self.carry_out(self.read())
            else:
                if isinstance(eff, m.Log):
                    log.warning("%s", eff.line)
                self._send(eff)

    def _on_broker(self, payload: bytes) -> None:
        try:
            msg = m.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("garbage from the broker dropped: %s", exc)
            return
        if isinstance(msg, m.Command) and msg.type == CommandType.GET_BANDWIDTH_STATS:
            self.carry_out(self.read())  # a fresh reading: the answer is up to now
            self.carry_out(self.core.request(time.monotonic_ns()))

    # ---- loop -------------------------------------------------------------------------------

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        try:
            self._loop()
        finally:
            if self.maps is not None:
                self.maps.close()
            self.broker.close()
            with contextlib.suppress(Exception):
                self.ipr.close()
            if self.heartbeat is not None:
                self.heartbeat.close()

    def _loop(self) -> None:
        core, clock = self.core, time.monotonic_ns
        poller = zmq.Poller()
        poller.register(self.broker, zmq.POLLIN)
        next_health = clock()
        self.carry_out(core.start(clock()))
        log.info("running; polling the kernel counters every %.2f s", core.config.poll_ns / 1e9)
        while self._running:
            now = clock()
            if self.heartbeat is not None:
                self.heartbeat.beat(now)
            if now >= next_health:
                self.broker.send(self._hello)
                health = {
                    **core.health(),
                    "read_ms": self.read_ms,
                    "read_errors": float(self.read_errors),
                    "maps_found": float(self.maps is not None),
                }
                self.broker.send(m.encode(m.Health("bandwidth", os.getpid(), health)))
                next_health = now + HEALTH_NS
            due = core.next_deadline_ns()
            if due is not None and now >= due:
                self.carry_out(core.on_deadline(now))
                due = core.next_deadline_ns()
            timeout = capped_timeout_ms(wait_ms(due, now, wait_ms(next_health, now)))
            try:
                ready = poller.poll(timeout)
            except zmq.ZMQError:
                if not self._running:
                    break
                raise
            for _item, _ev in ready:
                for _ in range(_BATCH):
                    try:
                        frames = self.broker.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    for frame in frames:
                        self._on_broker(frame)
