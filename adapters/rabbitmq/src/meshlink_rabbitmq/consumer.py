"""Consuming one group queue: deliveries, settlement, pause and resume.

Each subscription has its own channel, so ``basic.qos`` (prefetch) and the
broker's bookkeeping of unacknowledged messages are per subscription, and
closing that channel hands every unsettled message back to the broker.

Deliveries reach ``on_delivery`` through a local FIFO drained by one worker
task, so the callback runs one call at a time, in broker order. Pausing cancels
the AMQP consumer; deliveries that were in the FIFO, or that arrive before the
broker confirms the cancel, are nacked back (requeue) and never handed over.
A delivery remembers the exact aiormq channel it came on: settling it after that
channel died is a no-op (its delivery tag would mean another message on the
restored channel), and the broker redelivers it anyway.

The broker may cancel the consumer itself (``basic.cancel``: the queue was
deleted, or a quorum queue became unavailable); aio-pika does not recover from
that (aio-pika #334). The subscription hears it through the channel's
consumer-cancel callbacks (hooked again whenever the channel reopens), forgets
the consumer, has the queue declared and bound again and consumes again,
retrying with a bounded backoff (:class:`ConsumerRecovery`). A subscription
paused or stopped on purpose stays so; deliveries already received from the
cancelled consumer are still handed over and settled on their own channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import aiormq
import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustQueue

from meshlink.errors import TransportClosedError, TransportError
from meshlink.message import Message
from meshlink.transport.base import Delivery, DeliveryCallback, Subscription, SubscriptionSpec
from meshlink_rabbitmq import delay
from meshlink_rabbitmq.recovery import CancelRecovery, ConsumerRecovery, consumers_of, forget_consumer

__all__ = ["BROKER_HEADERS", "RabbitDelivery", "RabbitSubscription"]

_log = structlog.get_logger("meshlink.rabbitmq")

#: Headers the broker (dead-lettering, quorum queues) or the delay route adds;
#: they are not part of the envelope and are dropped on the way in.
BROKER_HEADERS = frozenset(
    {
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
        "x-delivery-count",
        delay.H_DELAY,
        delay.H_DELAY_DESTINATION,
    }
)
#: Errors of settling on a channel that is gone: the broker has taken the message back.
_GONE = (aiormq.exceptions.AMQPError, ConnectionError, OSError, RuntimeError)


class RabbitDelivery(Delivery):
    """A message from a group queue, settled on the channel it came on."""

    __slots__ = ("_channel", "_sub", "_tag")

    def __init__(
        self,
        sub: RabbitSubscription,
        channel: aiormq.abc.AbstractChannel,
        tag: int,
        message: Message,
        *,
        redelivered: bool,
        delivery_count: int | None,
    ) -> None:
        super().__init__(
            message,
            destination=sub.spec.destination,
            group=sub.spec.group,
            redelivered=redelivered,
            delivery_count=delivery_count,
        )
        self._sub = sub
        self._channel = channel
        self._tag = tag

    @property
    def location(self) -> dict[str, str]:
        return {"queue": self._sub.queue_name}

    async def _do_ack(self) -> None:
        await self._sub.settle(self, "ack")

    async def _do_nack(self) -> None:
        await self._sub.settle(self, "nack")

    async def _do_reject(self) -> None:
        await self._sub.settle(self, "reject")


class RabbitSubscription(CancelRecovery, Subscription):
    """A consumer of one group queue on its own channel."""

    def __init__(
        self,
        spec: SubscriptionSpec,
        on_delivery: DeliveryCallback,
        channel: AbstractRobustChannel,
        queue: AbstractRobustQueue,
        *,
        counts_deliveries: bool,
        redeclare: Callable[[], Awaitable[None]],
        recovery: ConsumerRecovery | None = None,
    ) -> None:
        self.spec = spec
        self.queue_name = queue.name
        self._on_delivery = on_delivery
        self._channel = channel
        self._queue = queue
        self._counts = counts_deliveries
        self._inbox: deque[RabbitDelivery] = deque()
        self._wake = asyncio.Event()
        self._paused = False
        self._stopped = False
        self._closed = False
        self._tag: str | None = None
        self._generation = itertools.count(1)
        self._current = 0
        self.unsettled = 0
        self._redeclare = redeclare
        self._policy = recovery or ConsumerRecovery()
        self._lock = asyncio.Lock()  # one consume or cancel of our consumer at a time
        self._recovery: asyncio.Task[None] | None = None
        #: How many times the consumer was lost (cancelled by the broker, or missing after a reopen).
        self.consumer_losses = 0
        #: How many of those losses were recovered (queue declared again; consuming unless paused).
        self.recoveries = 0
        channel.reopen_callbacks.add(self._on_reopen)
        self._worker = asyncio.get_running_loop().create_task(
            self._run(), name=f"rabbitmq-consumer:{queue.name}"
        )

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def consumer_tag(self) -> str | None:
        """The AMQP consumer tag while consuming, else ``None``."""
        return self._tag

    async def start(self) -> None:
        """Register the AMQP consumer; returns once the broker confirmed it."""
        async with self._lock:
            await self._consume()

    async def _consume(self) -> None:
        """Register a consumer (under ``_lock``). Bounded: during an outage the link wait would
        otherwise hold the lock, and every pause or stop behind it, until the broker is back."""
        tag = f"meshlink.{self.spec.group}.{uuid.uuid4().hex[:12]}"
        try:
            async with asyncio.timeout(self._policy.consume_timeout):
                await self._hook()
                self._current = generation = next(self._generation)
                # Known before the consume-ok: a broker cancel right after it must find it.
                self._tag = tag
                await self._queue.consume(partial(self._on_message, generation), consumer_tag=tag)
        except BaseException as exc:
            if self._tag == tag:
                self._tag = None
                forget_consumer(self._queue, tag)
            if isinstance(exc, TimeoutError):
                raise TransportError(
                    f"consuming did not start within {self._policy.consume_timeout:g}s (link down?)",
                    destination=self.spec.destination,
                ) from exc
            raise

    async def ensure_consuming(self) -> None:
        """After a reconnect: register the consumer again if aio-pika did not (liveness guard)."""
        if self._paused or self._stopped or self._tag is None or self.recovering:
            return
        await self._channel.ready()
        underlay = await self._channel.get_underlay_channel()
        async with self._lock:
            if self._paused or self._stopped or self._tag is None or self._tag in consumers_of(underlay):
                return
            _log.warning("rabbitmq.consumer_missing_after_reconnect", queue=self.queue_name, tag=self._tag)
            forget_consumer(self._queue, self._tag)  # a later restore must not bring it back too
            await self._consume()

    # -- arrival and hand-over ---------------------------------------------------------

    async def _on_message(self, generation: int, incoming: AbstractIncomingMessage) -> None:
        channel = incoming.channel
        tag = incoming.delivery_tag
        if tag is None:  # only for no_ack consumers, which we never create
            return
        if self._paused or generation != self._current:
            # Arrived after pause() (or from a consumer it cancelled): give it back unseen.
            await self._give_back(channel, tag)
            return
        headers = incoming.headers
        count: int | None = None
        if self._counts:
            raw = headers.get("x-delivery-count", 0)
            count = (int(raw) if isinstance(raw, int) else 0) + 1
        elif not incoming.redelivered:
            count = 1
        if not BROKER_HEADERS.isdisjoint(headers):
            headers = {k: v for k, v in headers.items() if k not in BROKER_HEADERS}
        message = Message.from_headers(headers, incoming.body, key=incoming.routing_key or None)
        self.unsettled += 1
        self._inbox.append(
            RabbitDelivery(
                self, channel, tag, message, redelivered=bool(incoming.redelivered), delivery_count=count
            )
        )
        self._wake.set()

    async def _run(self) -> None:
        inbox = self._inbox
        while True:
            while not inbox or self._paused:
                self._wake.clear()
                await self._wake.wait()
            delivery = inbox.popleft()
            try:
                await self._on_delivery(delivery)
            except Exception:
                _log.exception(
                    "rabbitmq.delivery_callback_failed", message_id=delivery.message.id, queue=self.queue_name
                )
                if delivery.settled is None:
                    await delivery.nack(requeue=True)

    # -- settlement ----------------------------------------------------------------------

    async def settle(self, delivery: RabbitDelivery, how: str) -> None:
        """Send the settlement on the delivery's own channel; a no-op if that channel is gone."""
        self.unsettled -= 1
        channel = delivery._channel
        try:
            if channel.is_closed:
                return
            # wait=False: queue the frame for the connection's writer without waiting
            # for the socket to drain. Nothing is confirmed for a settlement either way;
            # if the link dies before the frame leaves, the broker redelivers.
            if how == "ack":
                await channel.basic_ack(delivery._tag, wait=False)
            elif how == "nack":
                await channel.basic_nack(delivery._tag, requeue=True, wait=False)
            else:
                await channel.basic_reject(delivery._tag, requeue=False, wait=False)
        except _GONE:
            _log.debug("rabbitmq.settle_on_dead_channel", how=how, message_id=delivery.message.id)
        finally:
            if self._stopped and self.unsettled <= 0:
                await self._close_channel()

    async def _give_back(self, channel: aiormq.abc.AbstractChannel, tag: int) -> None:
        try:
            if not channel.is_closed:
                await channel.basic_nack(tag, requeue=True, wait=False)
        except _GONE:
            pass  # channel gone: the broker requeues it by itself

    async def _return_inbox(self) -> None:
        pending = list(self._inbox)
        self._inbox.clear()
        self.unsettled -= len(pending)
        for d in pending:
            await self._give_back(d._channel, d._tag)

    # -- pause, resume, stop ----------------------------------------------------------------

    async def _cancel_consumer(self) -> None:
        async with self._lock:
            tag, self._tag = self._tag, None
            self._current = 0  # anything still arriving for the old consumer is given back
            if tag is None:
                return
            if self._channel.is_closed:
                # link down: the broker dropped the consumer with the channel; aio-pika must
                # not bring it back when it reopens the channel (see forget_consumer)
                forget_consumer(self._queue, tag)
                return
            try:
                await self._queue.cancel(tag)
            except _GONE:
                _log.debug("rabbitmq.cancel_on_dead_channel", queue=self.queue_name)

    async def pause(self) -> None:
        if self._stopped:
            raise TransportClosedError("subscription is stopped", destination=self.spec.destination)
        if self._paused:
            return
        self._paused = True
        # Cancel first: what is returned after the cancel-ok cannot come straight back.
        await self._cancel_consumer()
        await self._return_inbox()

    async def resume(self) -> None:
        if self._stopped:
            raise TransportClosedError("subscription is stopped", destination=self.spec.destination)
        if not self._paused:
            return
        self._paused = False
        # During a recovery the queue may be missing: the recovery consumes once it is back.
        if not self.recovering and self._channel.is_closed:
            self._start_recovery(None)  # link down: consume once it is back, in the background
        elif not self.recovering:
            try:
                async with self._lock:
                    if not self._paused and not self._stopped and self._tag is None:
                        await self._consume()
            except Exception as exc:
                # the link is down, or the queue went while paused: consume again once it
                # is back (declared and bound again), never leave the subscription dead
                _log.warning(
                    "rabbitmq.resume_failed", queue=self.queue_name, error=f"{type(exc).__name__}: {exc}"
                )
                self._start_recovery(None)
        self._wake.set()

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._paused = True
        self._worker.cancel()
        recovery = self._recovery
        if recovery is not None:
            recovery.cancel()
        await asyncio.gather(self._worker, *([recovery] if recovery else []), return_exceptions=True)
        await self._cancel_consumer()
        await self._return_inbox()
        if self.unsettled <= 0:
            await self._close_channel()

    async def close(self) -> None:
        """Stop, then close the channel: the broker takes back every unsettled delivery."""
        await self.stop()
        await self._close_channel()

    async def _close_channel(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._channel.reopen_callbacks.discard(self._on_reopen)
        # Closed even when the link is down: closing is what stops aio-pika from reopening
        # the channel (and restoring its consumers) after the reconnect.
        with contextlib.suppress(*_GONE):
            await self._channel.close()

    def describe(self) -> dict[str, Any]:
        """State for diagnostics."""
        return {
            "queue": self.queue_name,
            "consumer_tag": self._tag,
            "paused": self._paused,
            "stopped": self._stopped,
            "recovering": self.recovering,
            "unsettled": self.unsettled,
        }
