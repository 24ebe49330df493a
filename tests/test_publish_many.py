"""Mesh.publish_many: many payloads to one destination, pipelined, each failure named."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from meshlink import Mesh, Message, TransportClosedError
from meshlink.errors import EncodeError, PublishBatchError, PublishError
from meshlink.events import Event, MessagePublished
from meshlink.testing import MeshHarness
from meshlink.transport.memory import MemoryTransport


class Order(BaseModel):
    order_id: int
    customer: str


ORDERS = [Order(order_id=i, customer=f"c{i % 3}") for i in range(12)]


async def test_every_payload_arrives_in_order_per_key_with_its_own_envelope(memory_url: str) -> None:
    mesh = Mesh(memory_url, service="shop")

    @mesh.handler("orders", concurrency=4)
    async def handle(order: Order) -> None:
        pass

    async with MeshHarness(mesh) as h:
        sent = await mesh.publish_many("orders", ORDERS, key=lambda o: o.customer, correlation_id="c-1")
        await h.idle()
    assert [m.key for m in sent] == [o.customer for o in ORDERS]
    assert len({m.id for m in sent}) == len(ORDERS)
    assert {(m.source, m.type, m.correlation_id) for m in sent} == {("shop", "Order", "c-1")}
    handled = h.payloads("handle")
    assert sorted(o.order_id for o in handled) == list(range(12))
    for customer in ("c0", "c1", "c2"):
        mine = [o.order_id for o in handled if o.customer == customer]
        assert mine == sorted(mine)  # one key's messages in the order given


async def test_one_key_for_all_and_ready_messages_sent_as_they_are(memory_url: str) -> None:
    mesh = Mesh(memory_url)
    ready = Message(body=b'{"order_id":99,"customer":"x"}', type="Order", key="k")

    @mesh.handler("orders")
    async def handle(order: Order) -> None:
        pass

    async with MeshHarness(mesh) as h:
        sent = await mesh.publish_many("orders", [ORDERS[0], ready], key="k")
        await h.idle()
    assert sent[1] is ready
    assert [m.key for m in sent] == ["k", "k"]
    assert [o.order_id for o in h.payloads("handle")] == [0, 99]


async def test_listeners_hear_of_every_message(memory_url: str) -> None:
    mesh = Mesh(memory_url)
    heard: list[Event] = []
    mesh.add_listener(heard.append)

    @mesh.handler("orders")
    async def handle(order: Order) -> None:
        pass

    async with MeshHarness(mesh):
        sent = await mesh.publish_many("orders", ORDERS[:3])
    published = [e for e in heard if isinstance(e, MessagePublished)]
    assert [e.message for e in published] == sent
    assert {e.destination for e in published} == {"orders"}


async def test_not_started_or_a_payload_that_cannot_be_encoded_sends_nothing(
    memory_url: str,
) -> None:
    mesh = Mesh(memory_url)
    with pytest.raises(TransportClosedError, match="not started"):
        await mesh.publish_many("orders", ORDERS)

    @mesh.handler("orders")
    async def handle(order: Order) -> None:
        pass

    async with MeshHarness(mesh) as h:
        with pytest.raises(EncodeError):
            await mesh.publish_many("orders", [ORDERS[0], object()])
        await h.idle()
    assert h.handled == []


class _RefusingTransport(MemoryTransport):
    """Refuses the messages whose body mentions ``refused`` (a broker that nacks some)."""

    async def publish(self, destination: str, message: Message, *, delay: float | None = None) -> None:
        if b"refused" in message.body:
            raise PublishError("nacked by the broker", destination=destination, message_id=message.id)
        await super().publish(destination, message, delay=delay)


async def test_the_messages_not_confirmed_are_named_by_index_and_the_others_arrive(memory_url: str) -> None:
    mesh = Mesh(_RefusingTransport(memory_url))
    heard: list[Event] = []
    mesh.add_listener(heard.append)

    @mesh.handler("orders")
    async def handle(order: dict[str, Any]) -> None:
        pass

    async with MeshHarness(mesh) as h:
        with pytest.raises(PublishBatchError) as caught:
            await mesh.publish_many("orders", [{"n": 0}, {"n": "refused"}, {"n": 2}])
        await h.idle()
    assert [i for i, _ in caught.value.failures] == [1]
    assert caught.value.total == 3
    sent = caught.value.messages
    assert [m.body for m in sent] == [b'{"n":0}', b'{"n":"refused"}', b'{"n":2}']
    published = [e.message for e in heard if isinstance(e, MessagePublished)]
    assert published == [sent[0], sent[2]]  # only the confirmed ones
    assert sorted(p["n"] for p in h.payloads("handle")) == [0, 2]
