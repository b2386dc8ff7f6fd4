"""KextClient's CURVE certificate options and its sessionless requests (`kextless status` uses
both: it asks for the counters while the policy holds the one session).

The broker here is a stand-in ROUTER in this process with the real broker's zmq.auth set-up (a
server secret certificate, a directory of authorized client certificates), so the client side is
tested alone; the real broker with CURVE is covered in test_broker_process.py and tests/deploy.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from kextless.broker.client import KextClient, KextError, KextTimeout, load_curve_certs

Reply = Callable[[list[bytes]], list[bytes] | None]


@dataclass
class Certs:
    server_public: Path
    server_secret: Path
    client_public: Path
    client_secret: Path
    stranger_secret: Path
    clients_dir: Path


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    keys, clients, strangers = tmp_path / "keys", tmp_path / "clients", tmp_path / "strangers"
    for d in (keys, clients, strangers):
        d.mkdir()
    server_public, server_secret = zmq.auth.create_certificates(keys, "server")
    client_public, client_secret = zmq.auth.create_certificates(keys, "client")
    shutil.copy(client_public, clients)
    _, stranger_secret = zmq.auth.create_certificates(strangers, "stranger")
    return Certs(
        Path(server_public),
        Path(server_secret),
        Path(client_public),
        Path(client_secret),
        Path(stranger_secret),
        clients,
    )


def _answer_stats(frames: list[bytes]) -> list[bytes] | None:
    return [b"S", json.dumps({"pid": 4242, "queue": {"depth": 0}}).encode()]


@contextmanager
def stand_in_broker(
    reply: Reply = _answer_stats, certs: Certs | None = None
) -> Iterator[tuple[str, list[list[bytes]]]]:
    """(endpoint, requests seen): a ROUTER on loopback answering with `reply` (None: silence),
    with CURVE and client authorization when `certs` is given."""
    ctx = zmq.Context()
    auth = None
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    if certs is not None:
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain="*", location=str(certs.clients_dir))
        public, secret = zmq.auth.load_certificate(certs.server_secret)
        sock.curve_server = True
        sock.curve_publickey = public
        sock.curve_secretkey = secret
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    seen: list[list[bytes]] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if sock.poll(50):
                ident, *frames = sock.recv_multipart()
                seen.append(frames)
                answer = reply(frames)
                if answer is not None:
                    sock.send_multipart([ident, *answer])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"tcp://127.0.0.1:{port}", seen
    finally:
        stop.set()
        thread.join(5)
        sock.close(0)
        if auth is not None:
            auth.stop()
        ctx.term()


def _stats(endpoint: str, **kwargs: object) -> dict[str, object]:
    client = KextClient(endpoint, **kwargs)  # type: ignore[arg-type]
    try:
        return client.stats()
    finally:
        client.close_sockets()


def test_stats_over_curve_with_certificate_files(certs: Certs) -> None:
    with stand_in_broker(certs=certs) as (endpoint, seen):
        counters = _stats(
            endpoint,
            request_timeout=5.0,
            curve_server_cert=certs.server_secret,  # what `up` records; its public key is used
            curve_client_cert=certs.client_secret,
        )
        assert counters == {"pid": 4242, "queue": {"depth": 0}}
        # The server's public certificate works as well, and the raw keys are equivalent.
        server_key, keypair = load_curve_certs(certs.server_public, certs.client_secret)
        assert _stats(endpoint, curve_server_key=server_key, curve_keypair=keypair) == counters
        assert seen == [[b"S"], [b"S"]]


def test_an_unauthorized_client_times_out_within_its_request_timeout(certs: Certs) -> None:
    with stand_in_broker(certs=certs) as (endpoint, seen):
        start = time.monotonic()
        with pytest.raises(KextTimeout, match=r"no reply to S within 1\.0 s"):
            _stats(
                endpoint,
                request_timeout=1.0,
                curve_server_cert=certs.server_public,
                curve_client_cert=certs.stranger_secret,
            )
        assert 0.9 < time.monotonic() - start < 3.0
        assert seen == []  # the handshake was refused: nothing reached the broker


def test_a_sessionless_request_waits_its_whole_timeout_then_times_out() -> None:
    # Without a session the client is "closed", which used to end the wait after the first
    # half-second slice with KextEOF instead of waiting for the reply.
    late = threading.Event()

    def slow(frames: list[bytes]) -> list[bytes] | None:
        time.sleep(0.7)
        late.set()
        return _answer_stats(frames)

    with stand_in_broker(slow) as (endpoint, _seen):
        assert _stats(endpoint, request_timeout=3.0)["pid"] == 4242
        assert late.is_set()
    with stand_in_broker(lambda _frames: None) as (endpoint, _seen):
        start = time.monotonic()
        with pytest.raises(KextTimeout):
            _stats(endpoint, request_timeout=0.8)
        assert 0.75 < time.monotonic() - start < 2.5


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ([b"S"], "unexpected status reply"),
        ([b"V", b"{}"], "unexpected status reply"),
        ([b"S", b"not json"], "not JSON"),
        ([b"S", b"[1, 2]"], "not a JSON object"),
        ([b"X", b"no stats for you"], "no stats for you"),
    ],
)
def test_a_malformed_stats_reply_is_a_kext_error(reply: list[bytes], message: str) -> None:
    with stand_in_broker(lambda _frames: reply) as (endpoint, _seen):
        with pytest.raises(KextError, match=message) as err:
            _stats(endpoint, request_timeout=2.0)
        assert not isinstance(err.value, KextTimeout)


def test_unusable_certificates_are_refused_before_connecting(certs: Certs, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot load CURVE certificates"):
        KextClient(
            "tcp://127.0.0.1:1",
            curve_server_cert=tmp_path / "missing",
            curve_client_cert=certs.client_secret,
        )
    with pytest.raises(ValueError, match="holds no secret key"):
        KextClient(
            "tcp://127.0.0.1:1",
            curve_server_cert=certs.server_public,
            curve_client_cert=certs.client_public,
        )
    with pytest.raises(ValueError, match="both"):
        KextClient("tcp://127.0.0.1:1", curve_server_cert=certs.server_public)
    server_key, keypair = load_curve_certs(certs.server_public, certs.client_secret)
    with pytest.raises(ValueError, match="not both"):
        KextClient(
            "tcp://127.0.0.1:1",
            curve_server_key=server_key,
            curve_keypair=keypair,
            curve_server_cert=certs.server_public,
            curve_client_cert=certs.client_secret,
        )
