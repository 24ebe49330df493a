"""Running one handler's subscription: tasks per delivery, per-key order, settlement, drain.

A :class:`Dispatcher` is what the transport's ``on_delivery`` calls. It starts
one task per delivery (the transport's prefetch bounds how many), keeps
messages of one key in order (a key's next message waits for the previous one,
whatever the broker does), settles each delivery by how its pipeline ended,
and on shutdown drains: waits for running handlers up to a deadline, then
cancels the rest and gives their messages back to the broker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from meshlink.context import Context
from meshlink.errors import MeshlinkError, is_retryable
from meshlink.events import Event, HandlerFailed, MessageDeadLettered, MessageHandled
from meshlink.handler import HandlerSpec
from meshlink.message import Message
from meshlink.pipeline import Middleware, compose
from meshlink.resilience.deadletter import failure_headers
from meshlink.transport.base import Delivery, Subscription, SubscriptionSpec

if TYPE_CHECKING:
    from meshlink.app import Mesh

__all__ = ["Dispatcher"]

_log = structlog.get_logger("meshlink.dispatch")


class Dispatcher:
    """Feeds one handler from one subscription."""

    def __init__(self, mesh: Mesh, spec: HandlerSpec, middleware: list[Middleware]) -> None:
        self.mesh = mesh
        self.spec = spec
        self.subscription: Subscription | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        # tasks whose handler has returned: they only settle now and are never cancelled
        self._settling: set[asyncio.Task[None]] = set()
        self._key_tails: dict[str, asyncio.Task[None]] = {}
        self._task_keys: dict[asyncio.Task[None], str] = {}
        self._decode = spec.decoder()
        self._pipeline = compose([*middleware, *spec.middleware], self._call_user)
        self.handled = 0
        self.failed = 0

    @property
    def subscription_spec(self) -> SubscriptionSpec:
        return SubscriptionSpec(
            destination=self.spec.destination,
            group=self.spec.group,
            prefetch=self.spec.concurrency,
            options=self.spec.options,
        )

    async def on_delivery(self, delivery: Delivery) -> None:
        key = delivery.message.key
        previous = self._key_tails.get(key) if key is not None else None
        task = asyncio.get_running_loop().create_task(self._run(delivery, previous))
        self.tasks.add(task)
        if key is not None:
            self._key_tails[key] = task
            self._task_keys[task] = key
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self._settling.discard(task)
        key = self._task_keys.pop(task, None)
        if key is not None and self._key_tails.get(key) is task:
            del self._key_tails[key]

    # -- one delivery ----------------------------------------------------------------

    async def _run(self, delivery: Delivery, previous: asyncio.Task[None] | None) -> None:
        message = delivery.message
        ctx = Context(self.mesh, delivery, self.spec.name)
        # Each delivery runs in its own task, whose context is a copy: binding here
        # needs no reset, and costs half of structlog's bound_contextvars().
        structlog.contextvars.bind_contextvars(
            message_id=message.id,
            message_type=message.type,
            correlation_id=message.correlation_id or message.id,
            handler=self.spec.name,
            attempt=message.attempt,
        )
        try:
            if previous is not None and not previous.done():
                await asyncio.wait([previous])
            await self._settle(ctx)
        except asyncio.CancelledError:
            if delivery.settled is None:
                await self._give_back(delivery)
            raise

    async def _settle(self, ctx: Context) -> None:
        """The outermost stage: ack on success, dead-letter on failure."""
        delivery = ctx.delivery
        started = time.perf_counter()
        try:
            ctx.payload = self._decode(ctx.message)
            await self._pipeline(ctx)
        except Exception as exc:
            self._enter_settling()
            self.failed += 1
            self._emit(
                HandlerFailed(
                    handler=self.spec.name,
                    destination=self.spec.destination,
                    group=self.spec.group,
                    message=ctx.message,
                    error=exc,
                )
            )
            await self._on_failure(ctx, exc)
            return
        self._enter_settling()
        self.handled += 1
        if self.mesh.has_listeners:
            self._emit(
                MessageHandled(
                    handler=self.spec.name,
                    destination=self.spec.destination,
                    group=self.spec.group,
                    message=ctx.message,
                    payload=ctx.payload,
                    duration=time.perf_counter() - started,
                )
            )
        await self._safe(delivery.ack)

    def _enter_settling(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._settling.add(task)

    async def _call_user(self, ctx: Context) -> None:
        if self.spec.wants_context:
            await self.spec.fn(ctx.payload, ctx)
        else:
            await self.spec.fn(ctx.payload)

    async def _on_failure(self, ctx: Context, exc: Exception) -> None:
        """Decide what a failure becomes. Every failure is dead-lettered with its reason.

        Retries and delayed redelivery are added in front of this by the
        resilience policies; what reaches this point has no budget left.
        """
        log = _log.warning if is_retryable(exc) else _log.error
        log("handler failed; dead-lettering", error=str(exc), error_type=type(exc).__name__)
        await self.dead_letter(ctx, exc)

    async def dead_letter(self, ctx: Context, exc: BaseException) -> None:
        """Publish the message to the dead-letter destination (confirmed), then ack it.

        If the dead-letter publish fails, the message is given back to the broker
        instead: it is never acked without a confirmed copy somewhere.
        """
        delivery = ctx.delivery
        headers = failure_headers(
            ctx.message,
            error=exc,
            handler=self.spec.name,
            destination=self.spec.destination,
            group=self.spec.group,
            location=delivery.location,
            now=datetime.fromtimestamp(self.mesh.clock.time(), UTC),
        )
        dead: Message = ctx.message.with_headers(headers)
        try:
            await self.mesh.transport.publish(self.spec.dead_letter, dead)
        except MeshlinkError as publish_exc:
            _log.error(
                "dead-letter publish failed; message given back to the broker",
                dead_letter=self.spec.dead_letter,
                error=str(publish_exc),
            )
            await self._give_back(delivery)
            return
        self._emit(
            MessageDeadLettered(
                handler=self.spec.name,
                destination=self.spec.destination,
                dead_letter_destination=self.spec.dead_letter,
                message=dead,
                reason=headers["x-meshlink-error-message"],
            )
        )
        await self._safe(delivery.ack)

    async def _give_back(self, delivery: Delivery) -> None:
        await self._safe(lambda: delivery.nack(requeue=True))

    async def _safe(self, settle: Callable[[], Any]) -> None:
        try:
            await settle()
        except MeshlinkError as exc:
            _log.warning("could not settle delivery; the broker will redeliver it", error=str(exc))

    def _emit(self, event: Event) -> None:
        self.mesh.emit(event)

    # -- shutdown ----------------------------------------------------------------------

    async def stop_fetching(self) -> None:
        if self.subscription is not None:
            await self.subscription.stop()

    async def drain(self, deadline: float) -> int:
        """Wait for running handlers until ``deadline`` (loop time); cancel the rest.

        A handler that has returned is never cancelled: its ack or dead-letter
        publish completes, so a message that finished is not delivered again.

        Returns how many handlers were cancelled (their messages went back to the broker).
        """
        loop = asyncio.get_running_loop()
        pending = set(self.tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=max(0.0, deadline - loop.time()))
        cancelled = [t for t in pending if t not in self._settling]
        for task in cancelled:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        return len(cancelled)
