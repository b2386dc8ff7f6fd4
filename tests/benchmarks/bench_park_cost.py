"""What parking's reader check and the shadow SYN copy cost kextless_pre per packet.

`sudo .venv/bin/python -m tests.benchmarks.bench_park_cost [--rounds 7] [--repeat 200000]`

Runs the loaded program on synthetic packets with BPF_PROG_TEST_RUN (the kernel runs it
`repeat` times and reports the mean time per run), in a namespace of its own, so nothing
touches real traffic. Per round, in alternating order: a TCP SYN and a UDP datagram of an
uncached flow, each with parking off (the baseline: what kextless_pre did before parking)
and with parking on and a live reader registered (this process: the SOCKMAP lookup, the
task lookup, and for the SYN the copy into `syn_shadow`). Prints the median over the rounds
of each case and of the difference to its baseline, with the spread (min..max), as
`MEASURE park_cost {json}`.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import statistics
import struct
import subprocess
import sys

from kextless.actors.capture.kernel_cache import KernelCache
from kextless.actors.capture.packets import fix_checksums
from kextless.base.kernel_maps import libbpf


class _TestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts (libbpf 1.x, bpf.h)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


def frame(proto: int, sport: int) -> bytes:
    """Ethernet + IPv4 + a TCP SYN (proto 6) or an 8-byte UDP datagram (17)."""
    l4 = (
        struct.pack("!HHIIBBHHH", sport, 80, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
        if proto == 6
        else struct.pack("!HHHH", sport, 53, 16, 0) + b"x" * 8
    )
    ip = bytearray(struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0,
        bytes([10, 9, 0, 1]), bytes([10, 9, 0, 2]),
    ) + l4)  # fmt: skip
    fix_checksums(ip, 4, 20, proto)
    return b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00" + bytes(ip)


def run_ns(prog_fd: int, data: bytes, repeat: int) -> float:
    lib = libbpf().lib
    fn = lib.bpf_prog_test_run_opts
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.c_void_p]
    buf = ctypes.create_string_buffer(data, len(data))
    out = ctypes.create_string_buffer(len(data) + 256)
    opts = _TestRunOpts(
        sz=ctypes.sizeof(_TestRunOpts),
        data_in=ctypes.addressof(buf),
        data_out=ctypes.addressof(out),
        data_size_in=len(data),
        data_size_out=len(out),
        repeat=repeat,
    )
    rc = fn(prog_fd, ctypes.byref(opts))
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))
    return float(opts.duration)


def measure(rounds: int, repeat: int) -> dict[str, dict[str, float]]:
    kc = KernelCache.load(flows_max=1024, guard=False)
    ctl = kc.park_ctl
    assert ctl is not None
    a, _b = socket.socketpair()
    cases = {"syn": frame(6, 40000), "udp": frame(17, 40001)}
    samples: dict[str, list[float]] = {f"{c}_{m}": [] for c in cases for m in ("off", "on")}
    for r in range(rounds):
        order = ("off", "on") if r % 2 == 0 else ("on", "off")
        for mode in order:
            if mode == "on":
                ctl.enable(True)
                ctl.register(a.fileno(), os.getpid())
            else:
                ctl.unregister()
                ctl.enable(False)
            for name, data in cases.items():
                samples[f"{name}_{mode}"].append(run_ns(kc.pre_fd, data, repeat))
    ctl.unregister()
    kc.close()
    out: dict[str, dict[str, float]] = {}
    for key, xs in samples.items():
        out[key] = {"median_ns": statistics.median(xs), "min_ns": min(xs), "max_ns": max(xs)}
    for name in cases:
        d = [
            on - off for on, off in zip(samples[f"{name}_on"], samples[f"{name}_off"], strict=True)
        ]
        out[f"{name}_added"] = {
            "median_ns": statistics.median(d),
            "min_ns": min(d),
            "max_ns": max(d),
        }
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--repeat", type=int, default=200_000)
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not args.inner:  # a namespace of our own, removed afterwards
        ns = f"kxbp-{os.getpid()}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            argv = [sys.executable, "-m", "tests.benchmarks.bench_park_cost", "--inner"]
            argv += ["--rounds", str(args.rounds), "--repeat", str(args.repeat)]
            return subprocess.run(["ip", "netns", "exec", ns, *argv], timeout=600).returncode
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=False)
    fig = measure(args.rounds, args.repeat)
    print(f"MEASURE park_cost {json.dumps(fig)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
