"""Lowering the recoverability decision to the transport.

:func:`~meshlink.resilience.policy.decide` says *what* to do with a failed
message; this module does it with nothing but the transport contract, so it
works the same on every broker:

* **redeliver** — a delayed publish of the message (same id, ``attempt`` + 1,
  ``x-meshlink-first-failed-at`` kept) to the handler's retry destination, which
  only this handler's group consumes; then ack the original;
* **dead-letter** — a confirmed publish to the dead-letter destination with the
  failure headers; then ack the original;
* **give back** — ``nack(requeue=True)``: the message returns to the broker without
  spending its budget (shutdown, an open breaker, a failed redelivery publish).

A message is never acked before its successor copy is confirmed by the broker.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import structlog

from meshlink.context import Context
from meshlink.errors import CircuitOpenError, MeshlinkError
from meshlink.events import MessageDeadLettered, MessageGivenBack, RedeliveryScheduled
from meshlink.handler import HandlerSpec
from meshlink.message import Message
from meshlink.resilience.deadletter import (
    ERROR_MESSAGE,
    ERROR_TYPE,
    FIRST_FAILED_AT,
    LAST_FAILED_AT,
    failure_headers,
    original_location,
)
from meshlink.resilience.policy import DeadLetterNow, Redeliver, RetryNow, decide
from meshlink.resilience.retry import failure_of, iso

if TYPE_CHECKING:
    from meshlink.app import Mesh

__all__ = ["Recoverability"]

_log = structlog.get_logger("meshlink.recoverability")


class Recoverability:
    """Settles a failed delivery as its handler's policy decides."""

    def __init__(self, mesh: Mesh, spec: HandlerSpec) -> None:
        self.mesh = mesh
        self.spec = spec

    async def on_failure(self, ctx: Context, error: Exception) -> None:
        """Decide and act: give back, redeliver later, or dead-letter."""
        if isinstance(error, CircuitOpenError):
            await self.give_back(ctx, f"circuit {error.breaker!r} is open")
            return
        action = decide(failure_of(ctx, error), self.spec.policies.retry)
        if isinstance(action, RetryNow):  # no in-process retry layer ran: go through the broker
            action = Redeliver(action.wait)
        if isinstance(action, Redeliver):
            _log.info("handler failed; redelivering", error=str(error), delay=action.delay)
            await self.redeliver(ctx, error, action.delay, spend=action.spend)
        else:
            assert isinstance(action, DeadLetterNow)
            _log.warning("handler failed; dead-lettering", error=str(error), reason=action.reason)
            await self.dead_letter(ctx, error, action.reason)

    async def redeliver(
        self, ctx: Context, error: BaseException, delay: float, *, spend: bool = True
    ) -> None:
        """Publish the next attempt (the same one unless ``spend``) to the retry destination
        after ``delay``, then ack."""
        now = self.mesh.clock.time()
        first = ctx.first_failed_at if ctx.first_failed_at is not None else now
        again = ctx.message.replace(attempt=ctx.attempt + 1 if spend else ctx.message.attempt).with_headers(
            {
                # where the first delivery was consumed, for a later dead-letter
                **original_location(ctx.message, ctx.delivery.location),
                FIRST_FAILED_AT: iso(first),
                LAST_FAILED_AT: iso(now),
                ERROR_TYPE: f"{type(error).__module__}.{type(error).__qualname__}",
                ERROR_MESSAGE: (str(error) or type(error).__name__)[:1024],
            }
        )
        if await self._forward(ctx, self.spec.retry_destination, again, delay):
            self.mesh.emit(
                RedeliveryScheduled(
                    handler=self.spec.name,
                    message=again,
                    retry_destination=self.spec.retry_destination,
                    delay=delay,
                    error=error,
                )
            )
            await self.ack(ctx)

    async def dead_letter(self, ctx: Context, error: BaseException, reason: str) -> None:
        """Publish to the dead-letter destination with the failure headers, then ack."""
        headers = failure_headers(
            ctx.message,
            error=error,
            handler=self.spec.name,
            destination=self.spec.destination,
            group=self.spec.group,
            location=ctx.delivery.location,
            attempts=ctx.attempt,
            now=datetime.fromtimestamp(self.mesh.clock.time(), UTC),
            first_failed_at=iso(ctx.first_failed_at) if ctx.first_failed_at is not None else None,
        )
        dead = ctx.message.with_headers(headers)
        if await self._forward(ctx, self.spec.dead_letter, dead, None):
            self.mesh.emit(
                MessageDeadLettered(
                    handler=self.spec.name,
                    destination=self.spec.destination,
                    dead_letter_destination=self.spec.dead_letter,
                    message=dead,
                    reason=reason,
                )
            )
            await self.ack(ctx)

    async def give_back(self, ctx: Context, reason: str) -> None:
        """Return the message to the broker without spending its budget."""
        if ctx.delivery.settled is not None:
            return
        try:
            await ctx.delivery.nack(requeue=True)
        except MeshlinkError as exc:
            _log.warning("could not give the message back; the broker will redeliver it", error=str(exc))
        self.mesh.emit(MessageGivenBack(handler=self.spec.name, message=ctx.message, reason=reason))

    async def _forward(self, ctx: Context, destination: str, message: Message, delay: float | None) -> bool:
        try:
            await self.mesh.transport.publish(destination, message, delay=delay)
        except MeshlinkError as exc:
            _log.error("could not move the failed message; giving it back", to=destination, error=str(exc))
            await self.give_back(ctx, f"publish to {destination} failed: {exc}")
            return False
        return True

    async def ack(self, ctx: Context) -> None:
        try:
            await ctx.delivery.ack()
        except MeshlinkError as exc:
            _log.warning("could not ack; the broker will redeliver it", error=str(exc))
