"""Publisher outcomes the broker rarely produces on demand, with the send step stood in for.

The AMQP work itself is covered against the real broker (test_faults.py, test_transport.py);
here only what the publisher makes of the send's outcome: a confirm cancelled under it by a
dying connection, its own caller being cancelled, and two publishes of one message in flight.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from meshlink.errors import PublishError
from meshlink.message import Message
from meshlink_rabbitmq.publisher import Publisher
from meshlink_rabbitmq.settings import RabbitSettings


class _Topology:
    def has_exchange(self, destination: str) -> bool:
        return True


class _Publisher(Publisher):
    """A publisher whose send step is a test function."""

    def __init__(self, send: Any) -> None:
        super().__init__(RabbitSettings.from_url("amqp://guest:guest@127.0.0.1/"), _Topology())  # type: ignore[arg-type]
        self._channel = object()  # type: ignore[assignment]
        self.send = send

    async def _send(
        self, channel: Any, exchange: str, routing_key: str, body: bytes, properties: Any
    ) -> None:
        await self.send(properties)


async def test_a_confirm_cancelled_under_the_publish_is_an_unknown_outcome_not_a_cancel() -> None:
    async def confirm_cancelled(properties: Any) -> None:
        # what aiormq does to pending confirms when the connection dies under them
        lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        lost.cancel()
        await lost

    publisher = _Publisher(confirm_cancelled)
    with pytest.raises(PublishError, match="outcome unknown"):
        await publisher.publish("orders", Message(body=b"{}"), None)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_caller_being_cancelled_is_cancelled_not_turned_into_a_publish_error() -> None:
    started = asyncio.Event()

    async def waits_for_confirm(properties: Any) -> None:
        started.set()
        await asyncio.Event().wait()

    publisher = _Publisher(waits_for_confirm)
    task = asyncio.get_running_loop().create_task(publisher.publish("orders", Message(body=b"{}"), None))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not publisher._inflight


async def test_two_publishes_of_one_message_in_flight_get_distinct_amqp_ids() -> None:
    """aiormq matches a returned message to its publish by message id: two in flight with one
    id would answer the wrong publish."""
    ids: list[str] = []
    both = asyncio.Event()

    async def holds_until_both_sent(properties: Any) -> None:
        ids.append(properties.message_id)
        if len(ids) == 2:
            both.set()
        await both.wait()

    publisher = _Publisher(holds_until_both_sent)
    message = Message(body=b"{}")
    await asyncio.gather(
        publisher.publish("orders", message, None), publisher.publish("orders", message, None)
    )
    assert len(set(ids)) == 2
    assert ids[0] == message.id
    assert ids[1].startswith(message.id)
    assert not publisher._inflight  # forgotten once answered: a later publish uses the plain id
