"""Publishing with confirms, a deadline on every publish, and typed outcomes.

One confirm channel per transport, opened with ``on_return_raises`` so that a
``mandatory`` publish nobody can receive fails instead of vanishing. Many
publishes share the channel at once (aiormq pipelines them), which is what
``publish_many`` relies on.

Outcomes, and what they mean to the caller:

* returns → the broker confirmed the message;
* :class:`~meshlink.errors.UnroutableError` → no queue took it (not stored);
* :class:`~meshlink.errors.PublishTimeoutError` → no confirm within
  ``publish_timeout``: outcome unknown, the broker may still have it;
* :class:`~meshlink.errors.PublishError` → the broker refused it (nack), or the
  link died before the confirm (outcome unknown); retrying is safe for
  idempotent consumers.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
from typing import Any

import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from pamqp.commands import Basic

from meshlink.errors import PublishError, PublishTimeoutError, TransportClosedError, UnroutableError
from meshlink.message import Message
from meshlink_rabbitmq import delay
from meshlink_rabbitmq.settings import RabbitSettings
from meshlink_rabbitmq.topology import Topology

__all__ = ["MessageTooLargeError", "Publisher"]

#: Errors that mean "the link broke under this publish": the outcome is unknown.
_LINK_ERRORS = (aiormq.exceptions.AMQPError, ConnectionError, OSError, RuntimeError)
#: ``wait=False`` where aiormq offers it: do not wait for the socket to drain before
#: waiting for the confirm (which proves the frame left anyway).
_NO_DRAIN: dict[str, Any] = (
    {"wait": False} if "wait" in inspect.signature(aiormq.Channel.basic_publish).parameters else {}
)


class MessageTooLargeError(PublishError):
    """The body is over ``max_message_size``; it was not sent (retrying cannot help)."""

    retryable = False


class Publisher:
    """Sends envelopes to exchanges and waits for the broker's confirmation."""

    def __init__(self, settings: RabbitSettings, topology: Topology) -> None:
        self._settings = settings
        self._topology = topology
        self._channel: AbstractRobustChannel | None = None
        self._delivery_mode = 2 if settings.persistent else 1
        # AMQP message ids currently awaiting a confirm: aiormq matches a returned
        # message to its publish by message id, so two in flight must not share one
        # (e.g. a retry of a publish whose first attempt timed out).
        self._inflight: set[str] = set()
        self._seq = itertools.count(1)

    async def open(self, connection: AbstractRobustConnection) -> None:
        """Open the confirm channel."""
        self._channel = await connection.channel(publisher_confirms=True, on_return_raises=True)

    async def close(self) -> None:
        """Close the confirm channel (publishes still in flight fail)."""
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            await channel.close()

    async def publish(self, destination: str, message: Message, delay_s: float | None) -> None:
        """Publish one message; see the module docstring for the outcomes."""
        channel = self._channel
        if channel is None:
            raise TransportClosedError("the RabbitMQ transport is closed", destination=destination)
        if len(message.body) > self._settings.max_message_size:
            raise MessageTooLargeError(
                f"body of {len(message.body)} bytes is over max_message_size="
                f"{self._settings.max_message_size}",
                destination=destination,
                message_id=message.id,
            )
        headers: dict[str, Any] = message.to_headers()
        if delay_s is not None and delay_s > 0:
            ms = delay.delay_ms(delay_s, self._settings)
            await self._topology.delay_route(destination, ms)
            exchange = delay.entry_exchange(self._settings)
            headers[delay.H_DELAY] = str(ms)
            headers[delay.H_DELAY_DESTINATION] = destination
        else:
            if not self._topology.has_exchange(destination):
                await self._topology.exchange(destination)
            exchange = destination
        amqp_id = message.id
        if amqp_id in self._inflight:
            amqp_id = f"{amqp_id}.{next(self._seq)}"
        properties = Basic.Properties(
            content_type=message.content_type,
            delivery_mode=self._delivery_mode,
            message_id=amqp_id,
            headers=headers,
        )
        self._inflight.add(amqp_id)
        try:
            await self._send(channel, exchange, message.key or "", message.body, properties)
        except aiormq.exceptions.PublishError:
            raise UnroutableError(
                "no queue is bound to receive this message", destination=destination, message_id=message.id
            ) from None
        except aiormq.exceptions.DeliveryError:
            raise PublishError(
                "the broker refused the message (nack)", destination=destination, message_id=message.id
            ) from None
        except TimeoutError:
            raise PublishTimeoutError(
                f"no confirm within {self._settings.publish_timeout}s; outcome unknown",
                destination=destination,
                message_id=message.id,
            ) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # our caller is being cancelled: let it be
            # aiormq cancels pending confirms when the connection dies under them.
            raise PublishError(
                "connection lost before the broker confirmed; outcome unknown",
                destination=destination,
                message_id=message.id,
            ) from None
        except _LINK_ERRORS as exc:
            raise PublishError(
                f"connection lost before the broker confirmed ({type(exc).__name__}); outcome unknown",
                destination=destination,
                message_id=message.id,
            ) from None
        finally:
            self._inflight.discard(amqp_id)

    async def _send(
        self,
        channel: AbstractRobustChannel,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: Basic.Properties,
    ) -> None:
        """Publish on the confirm channel within ``publish_timeout`` (``TimeoutError`` past it)."""
        # The underlying aiormq channel is used directly (not aio_pika.Exchange.publish)
        # to skip building an aio_pika.Message per publish; the robust channel still
        # owns it. No drain wait (_NO_DRAIN): it would cost a future and a wake-up per
        # publish, and the confirm proves the frame left.
        timeout = self._settings.publish_timeout
        # The usual case: aiormq's own deadline covers the channel lock, the write and
        # the confirm, which spares a second asyncio.timeout here.
        if await _publish_if_open(channel, exchange, routing_key, body, properties, timeout=timeout):
            return
        async with asyncio.timeout(timeout):
            await self._send_when_ready(channel, exchange, routing_key, body, properties)

    async def _send_when_ready(
        self,
        channel: AbstractRobustChannel,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: Basic.Properties,
    ) -> None:
        # A channel found closed has not seen this publish, so waiting for the robust
        # channel to be restored and trying again cannot duplicate it.
        while not await _publish_if_open(channel, exchange, routing_key, body, properties, timeout=None):
            await channel.ready()
            if channel.is_closed:
                # Restore has not begun yet (the close callback is still pending):
                # a short pause instead of spinning; the publish deadline bounds it.
                await asyncio.sleep(0.05)


async def _publish_if_open(
    channel: AbstractRobustChannel,
    exchange: str,
    routing_key: str,
    body: bytes,
    properties: Basic.Properties,
    *,
    timeout: float | None,
) -> bool:
    """Publish on the channel's current aiormq channel; ``False`` (nothing sent) if it is closed."""
    if channel.is_closed:
        return False
    underlay = await channel.get_underlay_channel()
    if underlay.is_closed:
        return False
    await underlay.basic_publish(
        body,
        exchange=exchange,
        routing_key=routing_key,
        properties=properties,
        mandatory=True,
        timeout=timeout,
        **_NO_DRAIN,
    )
    return True
