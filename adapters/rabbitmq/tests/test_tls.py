"""amqps:// end to end: a TLS front (our own, with a throw-away CA) before the real broker.

The shared broker listens in plain AMQP only, so the test puts a TLS-terminating
forwarder in front of it: the transport's TLS settings (CA, client certificate)
are then exercised exactly as against a broker with a TLS listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from meshlink import Message, TransportConnectionError
from meshlink.testing.conformance import Recorder
from meshlink.transport.base import SubscriptionSpec

pytestmark = pytest.mark.rabbitmq


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for localhost and a client certificate, all signed by the CA."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=meshlink test CA",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)  # fmt: skip
    for name, cn in (("server", "localhost"), ("client", "meshlink-client")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)  # fmt: skip
        (d / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)  # fmt: skip
    return d


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def tls_front(pki: Path, *, require_client_cert: bool) -> AsyncIterator[int]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
    if require_client_cert:
        ctx.load_verify_locations(pki / "ca.pem")
        ctx.verify_mode = ssl.CERT_REQUIRED

    async def forward(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            broker_r, broker_w = await asyncio.open_connection("127.0.0.1", 5672)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pipe(client_r, broker_w), _pipe(broker_r, client_w))

    server = await asyncio.start_server(forward, "127.0.0.1", 0, ssl=ctx)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def _round_trip(cleanup: Any, url: str, **options: Any) -> None:
    t = cleanup.transport(url, **options)
    await t.connect()
    dest = f"tls-{uuid.uuid4().hex[:8]}"
    rec = Recorder()
    await t.subscribe(SubscriptionSpec(destination=dest, group="g"), rec)
    sent = Message(body=b'{"over": "tls"}')
    await t.publish(dest, sent)
    await rec.wait_count(1, 30)
    assert rec.deliveries[0].message.id == sent.id


async def test_amqps_with_the_ca_option_round_trips(pki: Path, cleanup: Any) -> None:
    async with tls_front(pki, require_client_cert=False) as port:
        await _round_trip(cleanup, f"amqps://guest:guest@localhost:{port}/", ca_file=str(pki / "ca.pem"))


async def test_amqps_with_a_client_certificate_round_trips(pki: Path, cleanup: Any) -> None:
    async with tls_front(pki, require_client_cert=True) as port:
        await _round_trip(
            cleanup,
            f"amqps://guest:guest@localhost:{port}/",
            ca_file=str(pki / "ca.pem"),
            cert_file=str(pki / "client.pem"),
            key_file=str(pki / "client.key"),
        )


async def test_an_untrusted_broker_certificate_fails_fast(pki: Path, cleanup: Any) -> None:
    async with tls_front(pki, require_client_cert=False) as port:
        t = cleanup.transport(f"amqps://guest:guest@localhost:{port}/")  # system CAs: ours is unknown
        with pytest.raises(TransportConnectionError):
            await t.connect()
