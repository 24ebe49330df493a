"""Declaring what the transport needs, once, and keeping it for reconnects.

The mapping (see the README for the full picture):

* destination → a durable ``topic`` exchange of the same name;
* group → a durable queue ``<destination>.<group>`` bound to it with ``#``
  (every routing key), so each group gets its own copy of every message;
* message key → the routing key (empty when the message has no key).

Every object is declared through aio-pika's robust channel, which keeps a strong
reference to it and declares it again after a reconnect; this class also keeps
strong references (aio-pika's connection holds channels only weakly) and the
list that :meth:`Topology.explain` returns. A declaration that clashes with what
the broker already has (``PRECONDITION_FAILED``) is reported at once as a
:class:`~meshlink.errors.ConfigurationError` instead of failing on every restore.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustExchange,
    AbstractRobustQueue,
)
from pamqp.common import FieldTable

from meshlink.errors import ConfigurationError, TransportError
from meshlink_rabbitmq import delay
from meshlink_rabbitmq.settings import RabbitSettings, SubscriptionOptions

__all__ = ["BINDING_KEY", "Topology", "queue_name"]

BINDING_KEY = "#"
"""Binding key of group queues: a topic pattern that matches every routing key."""


def queue_name(destination: str, group: str) -> str:
    """The durable queue that holds one group's messages."""
    name = f"{destination}.{group}"
    if len(name.encode()) > 255:
        raise ConfigurationError("group", f"queue name {name!r} is longer than RabbitMQ's 255 bytes")
    return name


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


class Topology:
    """Exchanges, queues and bindings declared by one transport."""

    def __init__(self, settings: RabbitSettings) -> None:
        self._settings = settings
        self._channel: AbstractRobustChannel | None = None
        self._exchanges: dict[str, AbstractRobustExchange] = {}
        self._queues: dict[str, AbstractRobustQueue] = {}
        self._done: set[str] = set()
        self._pending: dict[str, asyncio.Future[None]] = {}
        self._records: dict[str, dict[str, Any]] = {}

    async def open(self, connection: AbstractRobustConnection) -> None:
        """Open the channel used for declarations."""
        self._channel = await connection.channel(publisher_confirms=False)

    async def close(self) -> None:
        """Close the declaration channel; the records stay for :meth:`explain`."""
        channel, self._channel = self._channel, None
        self._exchanges.clear()
        self._queues.clear()
        self._done.clear()
        if channel is not None and not channel.is_closed:
            await channel.close()

    def has_exchange(self, destination: str) -> bool:
        """Whether the destination's exchange was declared (fast path for publishing)."""
        return f"exchange:topic:{destination}" in self._done

    async def exchange(self, destination: str) -> None:
        """Declare the destination's exchange (idempotent, deduplicated).

        Raises:
            ConfigurationError: the name is over AMQP's 255 bytes, or is one of the
                delay exchanges' (a group there would receive every delayed message).
        """
        if len(destination.encode()) > 255:
            raise ConfigurationError("destination", f"{destination[:40]}... is over AMQP's 255-byte limit")
        s = self._settings
        if destination in (delay.entry_exchange(s), delay.return_exchange(s)):
            raise ConfigurationError("destination", f"{destination!r} is reserved for delays (delay_prefix)")
        await self._exchange(destination, "topic")

    async def _exchange(self, name: str, kind: str) -> None:
        # keyed by kind and name: never mistaken for another declaration (route:, queue:...)
        await self._once(f"exchange:{kind}:{name}", lambda: self._declare_exchange(name, kind))

    async def group(self, destination: str, group: str, options: SubscriptionOptions) -> str:
        """Declare the destination's exchange and the group's queue bound to it."""
        name = queue_name(destination, group)
        await self.exchange(destination)
        await self._once(f"queue:{name}", lambda: self._declare_group(destination, name, options))
        return name

    def forget_group(self, destination: str, group: str) -> None:
        """Forget that the group's queue was declared: the next :meth:`group` declares and binds it again.

        For a queue the broker lost (deleted by an operator, or a quorum queue that
        became unavailable), which the broker reports by cancelling its consumers.
        """
        self._done.discard(f"queue:{queue_name(destination, group)}")

    async def delay_route(self, destination: str, ms: int) -> None:
        """Declare what a message delayed ``ms`` on its way to ``destination`` passes through."""
        s = self._settings
        entry, back = delay.entry_exchange(s), delay.return_exchange(s)
        await self.exchange(destination)
        await self._exchange(entry, "headers")
        await self._exchange(back, "headers")
        await self._once(f"delay:{ms}", lambda: self._declare_delay_queue(ms))
        await self._once(f"route:{destination}", lambda: self._declare_return_route(destination))

    def explain(self) -> list[dict[str, Any]]:
        """One dict per declared exchange, queue and binding, in declaration order."""
        return [dict(r) for r in self._records.values()]

    # -- internals ------------------------------------------------------------------

    async def _once(self, key: str, declare: Callable[[], Awaitable[None]]) -> None:
        """Run ``declare`` once per key; concurrent callers share the one attempt."""
        if key in self._done:
            return
        pending = self._pending.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._run(key, declare))
            # Every caller may have been cancelled meanwhile (a subscription stopped
            # during its recovery): the outcome is still retrieved, never left unseen.
            pending.add_done_callback(_retrieve)
            self._pending[key] = pending
        await asyncio.shield(pending)

    async def _run(self, key: str, declare: Callable[[], Awaitable[None]]) -> None:
        try:
            async with asyncio.timeout(self._settings.connect_timeout):
                await declare()
            self._done.add(key)
        except aio_pika.exceptions.ChannelPreconditionFailed as exc:
            raise ConfigurationError(
                "topology", f"{key} exists on the broker with other settings: {exc}"
            ) from None
        except TimeoutError:
            raise TransportError(f"declaring {key} timed out") from None
        except (aio_pika.exceptions.AMQPError, ConnectionError) as exc:
            raise TransportError(f"declaring {key} failed: {type(exc).__name__}: {exc}") from None
        finally:
            self._pending.pop(key, None)

    def _live(self) -> AbstractRobustChannel:
        if self._channel is None:
            raise TransportError("the topology channel is closed")
        return self._channel

    async def _declare_exchange(self, name: str, kind: str) -> None:
        ex = await self._live().declare_exchange(name, kind, durable=True)
        self._exchanges[name] = ex
        self._records[f"exchange:{name}"] = {"kind": "exchange", "name": name, "type": kind, "durable": True}

    async def _declare_group(self, destination: str, name: str, options: SubscriptionOptions) -> None:
        args = options.queue_arguments()
        channel, exchange = self._live(), self._exchanges.get(destination)
        if exchange is None:  # closed meanwhile, which cleared what it had declared
            raise TransportError("the topology channel is closed")
        queue = self._queues.get(name)
        if queue is None:
            queue = await channel.declare_queue(name, durable=True, arguments=args)
        else:
            # Declared again after forget_group(): the same object, so that aio-pika's
            # channel does not collect one more queue to restore per recovery. Unlike
            # declare_queue(), it does not wait for the channel to be restored.
            await channel.ready()
            await queue.declare()
        await queue.bind(exchange, BINDING_KEY)
        self._queues[name] = queue
        self._records[f"queue:{name}"] = {
            "kind": "queue",
            "name": name,
            "durable": True,
            "queue_type": options.queue_type,
            "single_active_consumer": options.single_active_consumer,
            "arguments": args,
        }
        self._records[f"binding:{destination}->{name}"] = {
            "kind": "binding",
            "source": destination,
            "destination": name,
            "routing_key": BINDING_KEY,
        }

    async def _declare_delay_queue(self, ms: int) -> None:
        s = self._settings
        name, args = delay.queue_name(ms, s), delay.delay_queue_arguments(ms, s)
        queue = await self._live().declare_queue(name, durable=True, arguments=args)
        match: FieldTable = {"x-match": "all", delay.H_DELAY: str(ms)}
        await queue.bind(self._exchanges[delay.entry_exchange(s)], "", arguments=match)
        self._queues[name] = queue
        self._records[f"queue:{name}"] = {"kind": "queue", "name": name, "durable": True, "arguments": args}
        self._records[f"binding:delay->{name}"] = {
            "kind": "binding",
            "source": delay.entry_exchange(s),
            "destination": name,
            "arguments": match,
        }

    async def _declare_return_route(self, destination: str) -> None:
        back = delay.return_exchange(self._settings)
        match: FieldTable = {"x-match": "all", delay.H_DELAY_DESTINATION: destination}
        await self._exchanges[destination].bind(self._exchanges[back], "", arguments=match)
        self._records[f"binding:{back}->{destination}"] = {
            "kind": "binding",
            "source": back,
            "destination": destination,
            "arguments": match,
        }
