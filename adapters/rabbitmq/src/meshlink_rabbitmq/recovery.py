"""Coming back after the broker cancelled a consumer (``basic.cancel``).

RabbitMQ cancels a consumer itself when its queue is deleted (by an operator)
or a quorum queue becomes unavailable. aio-pika then consumes again with the
old tag on a queue it re-creates *without its binding* (aio-pika #334), so
the subscription looks alive and receives nothing, and publishes become
unroutable. :class:`CancelRecovery` hears the cancel through the channel's
consumer-cancel callbacks (hooked again whenever the channel reopens), forgets
the consumer, has the queue declared and bound again, and consumes again,
retrying with the backoff of :class:`ConsumerRecovery`. A subscription paused
or stopped on purpose stays so.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiormq
import structlog
from aio_pika.abc import AbstractRobustChannel, AbstractRobustQueue

from meshlink.errors import ConfigurationError, TransportError

__all__ = ["CancelRecovery", "ConsumerRecovery", "consumers_of", "forget_consumer"]

_log = structlog.get_logger("meshlink.rabbitmq")
_GONE = (aiormq.exceptions.AMQPError, ConnectionError, OSError, RuntimeError)


def forget_consumer(queue: AbstractRobustQueue, tag: str) -> None:
    """Drop ``tag`` from the consumers aio-pika restores when it reopens the channel.

    ``RobustQueue.cancel`` does this before it sends the cancel, but needs a live
    channel to send it; a consumer cancelled while the link is down must be dropped
    here, or aio-pika brings it back after the reconnect (a consumer nobody owns,
    requeueing every message it gets). aio-pika has no public call for it.
    """
    consumers = getattr(queue, "_consumers", None)
    if isinstance(consumers, dict):
        consumers.pop(tag, None)


def consumers_of(channel: aiormq.abc.AbstractChannel) -> Any:
    """The consumer tags aiormq has registered on ``channel`` (not on its abstract type)."""
    return getattr(channel, "consumers", {})


@dataclass(frozen=True, kw_only=True)
class ConsumerRecovery:
    """How a subscription comes back after the broker cancelled its consumer.

    The first attempt runs at once; after each failed attempt the wait doubles
    from ``first_delay`` up to ``max_delay``, for as long as the subscription lives.

    Raises:
        ConfigurationError: a delay is not positive, or ``max_delay`` is below ``first_delay``.
    """

    first_delay: float = 0.1
    """Seconds to wait after the first failed attempt."""
    max_delay: float = 5.0
    """The longest wait between two attempts."""
    consume_timeout: float = 10.0
    """Longest one consume may wait (for the link, for the broker's answer) while it holds the
    subscription's lock: a pause or stop waits at most this long during an outage."""
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    """How to wait (injected by tests so that they never wait on the clock)."""

    def __post_init__(self) -> None:
        if not 0 < self.first_delay <= self.max_delay:
            raise ConfigurationError(
                "consumer_recovery",
                f"needs 0 < first_delay <= max_delay, got {self.first_delay}, {self.max_delay}",
            )
        if not self.consume_timeout > 0:
            raise ConfigurationError(
                "consumer_recovery", f"consume_timeout must be > 0, got {self.consume_timeout}"
            )

    def delay(self, failures: int) -> float:
        """The wait after ``failures`` failed attempts in a row (``failures >= 1``)."""
        return float(min(self.max_delay, self.first_delay * 2 ** min(failures - 1, 32)))


class CancelRecovery:
    """The broker-cancel recovery of :class:`~meshlink_rabbitmq.consumer.RabbitSubscription`
    (a mixin: it works on the subscription's consumer state)."""

    queue_name: str
    _channel: AbstractRobustChannel
    _queue: AbstractRobustQueue
    _tag: str | None
    _current: int
    _paused: bool
    _stopped: bool
    _closed: bool
    _lock: asyncio.Lock
    _redeclare: Callable[[], Awaitable[None]]
    _policy: ConsumerRecovery
    _recovery: asyncio.Task[None] | None
    consumer_losses: int
    recoveries: int

    async def _consume(self) -> None:
        raise NotImplementedError  # the subscription's

    @property
    def recovering(self) -> bool:
        """Whether a recovery after a lost consumer is under way."""
        return self._recovery is not None and not self._recovery.done()

    async def _hook(self) -> None:
        """Listen for broker-side cancels on the channel's current aiormq channel (idempotent)."""
        underlay = await self._channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(self._on_broker_cancel)

    async def _on_reopen(self, _channel: Any) -> None:
        """aio-pika reopened the channel: hook the new one; a consumer it did not restore is lost."""
        if self._closed:
            return
        await self._hook()
        tag = self._tag
        if tag is None or self._paused or self._stopped or self.recovering:
            return
        underlay = await self._channel.get_underlay_channel()
        if tag not in consumers_of(underlay) and tag == self._tag:
            self._lose(tag, "missing_after_reopen")

    def _on_broker_cancel(self, frame: aiormq.spec.Basic.Cancel) -> None:
        """aiormq calls this from the channel's reader on ``basic.cancel``: must not block."""
        if frame.consumer_tag is not None and frame.consumer_tag == self._tag:
            self._lose(frame.consumer_tag, "cancelled_by_broker")
        # Any other tag is one we cancelled ourselves (pause, stop): nothing to bring back.

    def _lose(self, tag: str, reason: str) -> None:
        self._tag = None
        self._current = 0  # nothing more comes for it; a straggler would be given back
        self.consumer_losses += 1
        _log.warning(
            "rabbitmq.consumer_lost", queue=self.queue_name, tag=tag, reason=reason, paused=self._paused
        )
        self._start_recovery(tag)

    def _start_recovery(self, lost: str | None) -> None:
        """Declare the queue again and consume again, with a backoff, in the background."""
        if self._stopped or self.recovering:
            return
        self._recovery = asyncio.get_running_loop().create_task(
            self._recover(lost), name=f"rabbitmq-consumer-recovery:{self.queue_name}"
        )

    async def _recover(self, lost: str | None) -> None:
        if lost is not None:
            async with self._lock:
                # aio-pika still lists the tag and would consume it again by itself, with the
                # old callback and on the queue as it finds it; drop it (the broker ignores
                # a cancel of a tag it does not know).
                forget_consumer(self._queue, lost)
                with contextlib.suppress(*_GONE):
                    await self._queue.cancel(lost, nowait=True)
        failures = 0
        while not self._stopped:
            try:
                await self._redeclare()
                async with self._lock:
                    if self._stopped:
                        return
                    if not self._paused and self._tag is None:
                        await self._consume()
                        if self._tag is None:  # cancelled again before we saw the consume-ok
                            raise TransportError("the broker cancelled the new consumer at once")
            except Exception as exc:
                failures += 1
                wait = self._policy.delay(failures)
                _log.warning(
                    "rabbitmq.consumer_recovery_failed",
                    queue=self.queue_name,
                    attempt=failures,
                    retry_in=wait,
                    error=f"{type(exc).__name__}: {exc}",
                )
                await self._policy.sleep(wait)
                continue
            self.recoveries += 1
            _log.info(
                "rabbitmq.consumer_recovered",
                queue=self.queue_name,
                tag=self._tag,
                paused=self._paused,
                attempts=failures + 1,
            )
            return
