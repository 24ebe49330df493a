"""``amqp://`` and ``amqps://`` — the RabbitMQ transport, on aio-pika's robust connection."""

from __future__ import annotations

from functools import partial
from typing import Any

import structlog
from aio_pika.abc import AbstractRobustConnection

from meshlink.errors import TransportClosedError, TransportError
from meshlink.message import Message
from meshlink.transport.base import DeliveryCallback, Subscription, SubscriptionSpec, Transport
from meshlink_rabbitmq import connection as _connection
from meshlink_rabbitmq.consumer import RabbitSubscription
from meshlink_rabbitmq.publisher import Publisher
from meshlink_rabbitmq.recovery import ConsumerRecovery
from meshlink_rabbitmq.settings import RabbitSettings, SubscriptionOptions
from meshlink_rabbitmq.topology import Topology

_MAX_PREFETCH = 65_535

__all__ = ["RabbitTransport"]

_log = structlog.get_logger("meshlink.rabbitmq")


class RabbitTransport(Transport):
    """The RabbitMQ transport. See the package README for the topology and options.

    Args:
        url: ``amqp://user:password@host:port/vhost?setting=value`` (or ``amqps://``).
        consumer_recovery: how a subscription comes back after the broker cancelled
            its consumer (queue deleted, quorum queue unavailable); see
            :class:`~meshlink_rabbitmq.ConsumerRecovery` for the defaults.
        **options: any :class:`~meshlink_rabbitmq.RabbitSettings` field; wins over the URL.

    Raises:
        ConfigurationError: a setting is unknown or has a bad value.
    """

    schemes = ("amqp", "amqps")

    def __init__(
        self,
        url: str = "amqp://guest:guest@localhost/",
        *,
        consumer_recovery: ConsumerRecovery | None = None,
        **options: Any,
    ) -> None:
        self.settings = RabbitSettings.from_url(url, **options)
        self.consumer_recovery = consumer_recovery or ConsumerRecovery()
        self.topology = Topology(self.settings)
        self._publisher = Publisher(self.settings, self.topology)
        self._connection: AbstractRobustConnection | None = None
        self._subs: list[RabbitSubscription] = []
        self._closed = False
        #: How many times the link was lost and restored since :meth:`connect`.
        self.reconnects = 0
        #: How many times the link was lost since :meth:`connect`.
        self.disconnects = 0

    def __repr__(self) -> str:
        return f"<RabbitTransport {self.describe()}>"

    def describe(self) -> str:
        return self.settings.describe()

    @property
    def connected(self) -> bool:
        """Whether the link to the broker is up right now."""
        conn = self._connection
        return conn is not None and not conn.is_closed and conn.connected.is_set()

    async def connect(self) -> None:
        if self._connection is not None:
            return
        conn = await _connection.connect(self.settings)
        self._connection = conn
        self._closed = False
        conn.reconnect_callbacks.add(self._on_reconnect)
        conn.close_callbacks.add(self._on_disconnect)
        try:
            await self.topology.open(conn)
            await self._publisher.open(conn)
        except BaseException:
            await self.close()
            raise
        _log.info("rabbitmq.connected", url=self.describe())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        subs, self._subs = self._subs, []
        for sub in subs:
            await sub.close()
        await self._publisher.close()
        await self.topology.close()
        conn, self._connection = self._connection, None
        if conn is not None:
            conn.reconnect_callbacks.discard(self._on_reconnect)
            conn.close_callbacks.discard(self._on_disconnect)
            await conn.close()
        _log.info("rabbitmq.closed", url=self.describe())

    def _live(self) -> AbstractRobustConnection:
        if self._closed or self._connection is None:
            raise TransportClosedError("the RabbitMQ transport is not connected", url=self.describe())
        return self._connection

    async def declare(self, destination: str, group: str | None = None) -> None:
        self._live()
        if group is None:
            await self.topology.exchange(destination)
        else:
            await self.topology.group(destination, group, SubscriptionOptions.resolve(self.settings, {}))

    async def publish(self, destination: str, message: Message, *, delay: float | None = None) -> None:
        self._live()
        await self._publisher.publish(destination, message, delay)

    async def subscribe(self, spec: SubscriptionSpec, on_delivery: DeliveryCallback) -> Subscription:
        conn = self._live()
        options = SubscriptionOptions.resolve(self.settings, spec.options)
        name = await self.topology.group(spec.destination, spec.group, options)
        channel = await conn.channel(publisher_confirms=False)
        try:
            # AMQP's prefetch_count is 16 bits: a larger prefetch (a batch handler's
            # concurrency x max_size can be one) is capped at 65,535 unacked messages
            await channel.set_qos(prefetch_count=min(spec.prefetch, _MAX_PREFETCH))
            # Declared again on the consuming channel so that aio-pika's restore of
            # this channel re-creates the queue before consuming from it.
            queue = await channel.declare_queue(name, durable=True, arguments=options.queue_arguments())
            sub = RabbitSubscription(
                spec,
                on_delivery,
                channel,
                queue,
                counts_deliveries=options.queue_type == "quorum",
                redeclare=partial(self._redeclare_group, spec, options),
                recovery=self.consumer_recovery,
            )
            self._subs.append(sub)
            await sub.start()
        except BaseException:
            await channel.close()
            raise
        return sub

    async def _redeclare_group(self, spec: SubscriptionSpec, options: SubscriptionOptions) -> None:
        """Declare and bind a group's queue again: the broker cancelled its consumer (queue lost)."""
        self._live()
        self.topology.forget_group(spec.destination, spec.group)
        await self.topology.group(spec.destination, spec.group, options)

    @property
    def delivery_deadline(self) -> tuple[float, str]:
        """How long a handler may hold a message before the broker takes it back."""
        return self.settings.consumer_timeout, "consumer_timeout"

    def check_subscription(self, spec: SubscriptionSpec, budget: int) -> list[str]:
        """Contradictions between a subscription's queue settings and a handler's attempt budget."""
        options = SubscriptionOptions.resolve(self.settings, spec.options)
        if options.delivery_limit is not None and options.delivery_limit < budget:
            return [
                f"quorum delivery-limit {options.delivery_limit} is below the attempt budget of {budget}: "
                "the broker would drop a message meshlink still means to retry"
            ]
        return []

    def explain(self) -> list[dict[str, Any]]:
        """Every exchange, queue and binding this transport declared, plus live consumers."""
        out = self.topology.explain()
        out.extend({"kind": "consumer", **sub.describe()} for sub in self._subs)
        return out

    # -- link events ------------------------------------------------------------------

    def _on_disconnect(self, *_: Any) -> None:
        if not self._closed:
            self.disconnects += 1
            _log.warning("rabbitmq.link_lost", url=self.describe())

    async def _on_reconnect(self, *_: Any) -> None:
        self.reconnects += 1
        _log.info("rabbitmq.link_restored", url=self.describe(), reconnects=self.reconnects)
        for sub in list(self._subs):
            try:
                await sub.ensure_consuming()
            except (TransportError, Exception):
                _log.exception("rabbitmq.consumer_restore_failed", queue=sub.queue_name)
