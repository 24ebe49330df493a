"""``kafka://`` and ``kafka+ssl://`` — the Kafka transport on aiokafka.

* A destination is a topic, created on first use with ``partitions`` partitions
  (or required to exist with ``create_topics=False``). A group is a Kafka
  consumer group; a new group starts at the log end of the moment it is declared.
* One producer per transport, ``acks=all``; the message key picks the partition
  and the envelope travels in record headers.
* One consumer (group member) per subscription; see
  :mod:`meshlink_kafka.consumer` for ordering, commits, nack and rebalances.
* Delays go through delay topics and a relay, see :mod:`meshlink_kafka.delay`.
* Kafka keeps every message of a topic whether or not a group reads it, so
  publishing where no group is declared is not an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Sequence
from typing import Any

import structlog
from aiokafka.errors import KafkaError

from meshlink.clock import Clock, SystemClock
from meshlink.errors import (
    MeshlinkError,
    PublishBatchError,
    PublishError,
    TransportClosedError,
    TransportConnectionError,
    TransportError,
)
from meshlink.message import Message
from meshlink.transport.base import (
    DeliveryCallback,
    Outgoing,
    Subscription,
    SubscriptionSpec,
    Transport,
)
from meshlink.transport.batching import BatchCallback, BatchLimits
from meshlink_kafka.batch_consumer import KafkaBatchSubscription
from meshlink_kafka.consumer import KafkaSubscription
from meshlink_kafka.delay import H_DELAY_DUE, H_DELAY_TARGET, DelayRelay, tier_topic
from meshlink_kafka.producer import Producer, Record, record_of
from meshlink_kafka.settings import KafkaSettings
from meshlink_kafka.topics import TopicManager

__all__ = ["KafkaTransport"]

_log = structlog.get_logger("meshlink.kafka")


class KafkaTransport(Transport):
    """The Kafka transport. See the module docstring and ``KafkaSettings`` for every option.

    Args:
        url: ``kafka://[user:password@]host:port[,host:port]/?setting=value`` or ``kafka+ssl://…``.
        clock: wall-clock source for delay due times (the system clock by default).
        **options: any :class:`~meshlink_kafka.settings.KafkaSettings` field; wins over the URL.
    """

    schemes = ("kafka", "kafka+ssl")

    def __init__(
        self, url: str = "kafka://localhost:9092", *, clock: Clock | None = None, **options: Any
    ) -> None:
        self.settings = KafkaSettings.from_url(url, **options)
        self._clock: Clock = clock or SystemClock()
        self._topics = TopicManager(self.settings)
        self._producer = Producer(self.settings)
        self._subs: list[KafkaSubscription] = []
        self._relay: DelayRelay | None = None
        self._relay_start: asyncio.Task[None] | None = None
        self._connected = False
        self._closed = False

    def describe(self) -> str:
        return self.settings.describe()

    # -- lifecycle -----------------------------------------------------------------------

    async def connect(self) -> None:
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                await self._topics.start()
                await self._producer.start()
        except (TimeoutError, KafkaError, OSError) as exc:
            await self._teardown()
            raise TransportConnectionError(f"cannot reach kafka: {exc!r}", url=self.describe()) from exc
        self._connected, self._closed = True, False
        if self.settings.delay_consumer == "always":
            await self._start_relay()

    async def close(self) -> None:
        if self._closed or not self._connected:
            self._closed = True
            return
        self._closed = True
        await asyncio.gather(*(sub.close() for sub in self._subs), return_exceptions=True)
        self._subs.clear()
        await self._teardown()

    async def _teardown(self) -> None:
        if self._relay_start is not None and not self._relay_start.done():
            self._relay_start.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._relay_start
        if self._relay is not None:
            await self._relay.stop()
            self._relay = None
        await self._producer.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._topics.close(), self.settings.close_timeout)

    def _live(self) -> None:
        if self._closed or not self._connected:
            raise TransportClosedError("kafka transport is not connected", url=self.describe())

    # -- topology ------------------------------------------------------------------------

    async def declare(self, destination: str, group: str | None = None) -> None:
        self._live()
        try:
            await self._topics.ensure(destination)
            if group is not None:
                await self._topics.seed_group(destination, self.settings.group_id(destination, group))
        except (KafkaError, TimeoutError) as exc:
            raise TransportError(f"cannot declare: {exc!r}", destination=destination, group=group) from exc

    @property
    def delivery_deadline(self) -> tuple[float, str]:
        """How long a handler may hold a message: past ``max_poll_interval_ms`` a rebalance
        may hand its partition to another member, which processes the message again."""
        return self.settings.max_poll_interval_ms / 1000, "max_poll_interval_ms"

    def explain(self) -> list[dict[str, Any]]:
        """The topics this transport has used and the groups it consumes."""
        out: list[dict[str, Any]] = [
            {"kind": "topic", "name": name, "partitions": count}
            for name, count in sorted(self._topics.known().items())
        ]
        out += [
            {
                "kind": "group",
                "destination": s.spec.destination,
                "name": s.spec.group,
                "prefetch": s.spec.prefetch,
            }
            for s in self._subs
        ]
        return out

    # -- publishing ------------------------------------------------------------------------

    def _topic_of(self, destination: str, delay: float | None) -> str:
        if delay is None or delay <= 0:
            return destination
        return tier_topic(self.settings.delay_topic_prefix, delay)

    def _record(self, destination: str, message: Message, delay: float | None) -> Record:
        """The record for one publish; its topics must have been ensured."""
        if delay is None or delay <= 0:
            return record_of(destination, message)
        due_ms = math.ceil((self._clock.time() + delay) * 1000)
        self._start_relay_soon()
        extra = {H_DELAY_TARGET: destination, H_DELAY_DUE: str(due_ms)}
        return record_of(self._topic_of(destination, delay), message, extra)

    async def _ensure(self, destination: str, delay: float | None) -> None:
        await self._topics.ensure(destination)
        if delay is not None and delay > 0:
            await self._topics.ensure(self._topic_of(destination, delay))

    async def publish(self, destination: str, message: Message, *, delay: float | None = None) -> None:
        self._live()
        try:
            if delay is not None or not self._topics.is_known(destination):  # else nothing to await
                await self._ensure(destination, delay)
        except PublishError:
            raise  # e.g. UnroutableError: already the publish contract's
        except (KafkaError, TransportError) as exc:
            raise PublishError(
                f"cannot prepare topic: {exc!r}", destination=destination, message_id=message.id
            ) from exc
        await self._producer.send(self._record(destination, message, delay))

    async def publish_many(self, items: Sequence[Outgoing]) -> None:
        self._live()
        # each topic is ensured once per batch, not once per message
        refused: dict[tuple[str, float | None], BaseException] = {}
        for destination, delay in {(o.destination, o.delay) for o in items}:
            try:
                await self._ensure(destination, delay)
            except (KafkaError, MeshlinkError) as exc:
                refused[(destination, delay)] = exc
        failures: list[tuple[int, BaseException]] = []
        positions: list[int] = []  # of the records, in items
        records: list[Record] = []
        for i, o in enumerate(items):
            why = refused.get((o.destination, o.delay)) if refused else None
            if why is not None:
                failures.append((i, why))
            else:
                positions.append(i)
                records.append(self._record(o.destination, o.message, o.delay))
        results = await self._producer.send_many(records)
        for i, err in zip(positions, results, strict=True):
            if isinstance(err, asyncio.CancelledError):
                raise err
            if err is not None:
                failures.append((i, err))
        if failures:
            raise PublishBatchError(sorted(failures, key=lambda f: f[0]), len(items))

    # -- consuming -------------------------------------------------------------------------

    async def subscribe(self, spec: SubscriptionSpec, on_delivery: DeliveryCallback) -> Subscription:
        self._live()
        await self.declare(spec.destination, spec.group)
        sub = KafkaSubscription(spec, on_delivery, self.settings)
        await sub.start()
        self._subs.append(sub)
        return sub

    batches_keep_key_order = True
    """A partition's next batch waits for its previous one (see :mod:`meshlink_kafka.batch_consumer`)."""

    async def subscribe_batch(
        self, spec: SubscriptionSpec, on_batch: BatchCallback, limits: BatchLimits
    ) -> Subscription:
        """Batches are runs of one partition's fetched records (native, no gathering)."""
        self._live()
        await self.declare(spec.destination, spec.group)
        sub = KafkaBatchSubscription(spec, on_batch, limits, self.settings)
        await sub.start()
        self._subs.append(sub)
        return sub

    # -- delay relay -----------------------------------------------------------------------

    def _start_relay_soon(self) -> None:
        if self.settings.delay_consumer == "never" or self._relay_start is not None:
            return
        self._relay_start = asyncio.get_running_loop().create_task(
            self._start_relay(), name="kafka-delay-start"
        )

    async def _start_relay(self) -> None:
        relay = DelayRelay(self.settings, self._producer, self._topics, self._clock)
        self._relay = relay
        try:
            await relay.start()
        except (KafkaError, MeshlinkError) as exc:
            _log.error(
                "kafka delay relay did not start; delayed messages wait for another relay", error=repr(exc)
            )
