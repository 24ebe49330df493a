"""The aiokafka consumer of one subscription, replaceable while the subscription goes on.

One client at a time, each subscribed with a listener of its own: when the
client is replaced (see :mod:`meshlink_kafka.watchdog`), the old listener is
*retired* first, so a rebalance the old client is still going through can no
longer touch the subscription's partition state. Starting is bounded by
``connect_timeout``; stopping by ``close_timeout`` (``stop()`` can block when
the brokers are down, aiokafka #659).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from meshlink_kafka.settings import KafkaSettings

__all__ = ["Listener", "Member", "RebalanceHandler"]

_log = structlog.get_logger("meshlink.kafka")


class RebalanceHandler(Protocol):
    """What a subscription does when its partitions move."""

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Release ``revoked`` (drain, commit)."""
        ...

    async def on_assigned(self, assigned: set[TopicPartition], listener: Listener) -> None:
        """Take ``assigned``; ignore them if ``listener`` was retired meanwhile."""
        ...


class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Rebalance callbacks of one client; a replaced client's (``retired``) are ignored."""

    def __init__(self, handler: RebalanceHandler) -> None:
        self._handler = handler
        self.retired = False

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if not self.retired:
            await self._handler.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if not self.retired:
            await self._handler.on_assigned(assigned, self)


class Member:
    """The current client of one group member, its listener, and the client being retired."""

    def __init__(self, settings: KafkaSettings, group_id: str, topic: str, handler: RebalanceHandler) -> None:
        self._settings = settings
        self._group_id = group_id
        self._topic = topic
        self._handler = handler
        self.retiring: AIOKafkaConsumer | None = None
        """The replaced client until it stopped."""
        self.client, self.listener = self._new()

    def _new(self) -> tuple[AIOKafkaConsumer, Listener]:
        client = AIOKafkaConsumer(**self._settings.consumer_kwargs(self._group_id))
        listener = Listener(self._handler)
        client.subscribe([self._topic], listener=listener)
        return client, listener

    async def start(self) -> None:
        """Start the current client (join the group), bounded by ``connect_timeout``."""
        async with asyncio.timeout(self._settings.connect_timeout):
            await self.client.start()

    def retire(self) -> None:
        """From now on the current client's rebalances are ignored; :meth:`replace` follows."""
        self.listener.retired = True
        self.retiring = self.client

    async def replace(self) -> None:
        """Stop the retired client (bounded), then start a new one with the same settings."""
        old = self.retiring
        if old is not None:
            await self._stop(old)
            self.retiring = None
        self.client, self.listener = self._new()
        await self.start()

    async def stop(self) -> None:
        """Stop the client being retired, if any, and the current one; each bounded."""
        for client in (self.retiring, self.client):
            if client is not None:
                await self._stop(client)
        self.retiring = None

    async def _stop(self, client: AIOKafkaConsumer) -> None:
        # Shielded from our caller's cancellation (a close landing during a swap): aiokafka marks
        # a consumer closed first, so a stop cut short would never be finished by a second one.
        stopping = asyncio.ensure_future(client.stop())
        try:
            await asyncio.wait_for(asyncio.shield(stopping), self._settings.close_timeout)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(stopping, self._settings.close_timeout)
            raise
        except (TimeoutError, KafkaError) as exc:
            stopping.cancel()
            _log.warning("kafka consumer did not stop cleanly", group=self._group_id, error=repr(exc))
