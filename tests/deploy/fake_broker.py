"""A stand-in broker for the deploy mechanics tests: binds the client endpoint and answers the
status request `S` with its own pid, netns and request count, so `kextless status` is checked
against values the test can verify independently (nothing in the reply is a constant)."""

from __future__ import annotations

import json
import os
import signal
import sys

import zmq


def main(endpoint: str) -> int:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    requests = 0
    while not stopping:
        if not sock.poll(100):
            continue
        ident, *frames = sock.recv_multipart()
        if frames == [b"S"]:
            requests += 1
            body = {
                "pid": os.getpid(),
                "requests": requests,
                "netns_inode": os.stat("/proc/self/ns/net").st_ino,
            }
            sock.send_multipart([ident, b"S", json.dumps(body).encode()])
    sock.close()  # unbinding removes the ipc socket file
    ctx.term()
    return 0


if __name__ == "__main__":
    # argv: ENDPOINT RUN_DIR (the run dir only marks the process as the instance's)
    sys.exit(main(sys.argv[1]))
