"""The link to the broker is cut (TCP RST, then refused) and restored: the transport heals."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from kafka_helpers import Progress, Worker, broker_script, transport, unavailable, unique

from meshlink.errors import PublishTimeoutError
from meshlink.message import Message
from meshlink.testing.proxy import ProxyMode, TCPProxy
from meshlink.transport.base import Outgoing, SubscriptionSpec


@pytest.fixture
async def proxied_bootstrap() -> AsyncIterator[tuple[str, TCPProxy]]:
    """A broker of our own that advertises the proxy's port, so clients keep using the proxy."""
    script = broker_script()
    broker_port, proxy_port = script.free_port(), script.free_port()
    try:
        broker = script.LocalBroker.launch(port=broker_port, advertised_port=proxy_port)
    except Exception as exc:
        unavailable(f"could not start a broker behind a proxy: {exc}")
        raise
    try:
        async with TCPProxy("127.0.0.1", broker_port, port=proxy_port) as proxy:
            yield f"127.0.0.1:{proxy_port}", proxy
    finally:
        broker.stop()


async def test_transport_heals_after_the_connection_is_cut(proxied_bootstrap: tuple[str, TCPProxy]) -> None:
    bootstrap, proxy = proxied_bootstrap
    topic = unique("cut")
    t = transport(bootstrap, publish_timeout=3.0)
    await t.connect()
    progress = Progress()
    worker = Worker(on_progress=progress.poke)

    def batch(start: int) -> list[Message]:
        return [Message(body=f"k:{i}".encode(), key=f"k{i % 4}") for i in range(start, start + 50)]

    try:
        await t.subscribe(SubscriptionSpec(destination=topic, group="g", prefetch=8), worker)
        before = batch(0)
        await t.publish_many([Outgoing(destination=topic, message=m) for m in before])
        await progress.until(lambda: len(worker.handled) >= 50, timeout=30)

        cut = await proxy.cut(then=ProxyMode.REFUSE)
        assert cut > 0, "the transport had no connection through the proxy"
        with pytest.raises(PublishTimeoutError):
            await t.publish(topic, Message(body=b"k:999", key="k0"))

        await proxy.restore()
        after = batch(50)
        await t.publish_many([Outgoing(destination=topic, message=m) for m in after])
        want = {m.id for m in before + after}
        await progress.until(lambda: {h.id for h in worker.handled} >= want, timeout=90)
    finally:
        await worker.crash_handlers()
        await t.close()
