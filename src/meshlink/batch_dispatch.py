"""Running one batch handler: a task per batch, per-key order, the policy stack, settle, drain.

The batch counterpart of :class:`~meshlink.dispatch.Dispatcher` (whose drain,
shutdown and policy stack it reuses): the transport hands over batches
(:meth:`Transport.subscribe_batch`), each runs in its own task through the same
middleware, and each of its deliveries is settled on its own. See
:mod:`meshlink.batch` for what the policies mean for a batch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import structlog

from meshlink.batch import BatchContext
from meshlink.context import Context
from meshlink.dispatch import _LOG_VARS, Dispatcher
from meshlink.errors import MeshlinkError
from meshlink.events import MessageHandled
from meshlink.handler import HandlerSpec
from meshlink.message import Message
from meshlink.pipeline import Middleware
from meshlink.resilience.breaker import CircuitBreaker
from meshlink.resilience.deadletter import FIRST_FAILED_AT
from meshlink.resilience.retry import first_failed_at
from meshlink.transport.base import Delivery

if TYPE_CHECKING:
    from meshlink.app import Mesh

__all__ = ["BatchDispatcher"]

_log = structlog.get_logger("meshlink.dispatch")


class BatchDispatcher(Dispatcher):
    """Feeds one batch handler from its subscriptions."""

    def __init__(
        self,
        mesh: Mesh,
        spec: HandlerSpec,
        middleware: list[Middleware],
        *,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        super().__init__(mesh, spec, middleware, breaker=breaker)
        assert spec.batch is not None
        self._limits = spec.batch.limits()
        self._decode_wire = spec.wire_decoder()
        # a transport that keeps a key's batches in order itself (Kafka: one batch per
        # partition at a time) spares the per-message key bookkeeping below
        self._ordered = bool(getattr(mesh.transport, "batches_keep_key_order", False))
        self._batch_keys: dict[asyncio.Task[None], list[str]] = {}

    async def start(self) -> None:
        for sub_spec in self.subscription_specs():
            subscription = await self.mesh.transport.subscribe_batch(sub_spec, self.on_batch, self._limits)
            self.subscriptions.append(subscription)
            if self.breaker is not None:
                self.breaker.attach(subscription)

    async def on_delivery(self, delivery: Delivery) -> None:  # pragma: no cover - never subscribed
        await self.on_batch([delivery])

    async def on_batch(self, deliveries: Sequence[Delivery]) -> None:
        if self._ordered:
            task = asyncio.get_running_loop().create_task(self._run_batch(deliveries, ()))
            self.tasks.add(task)
            return
        # a key's message waits for the batch holding the key's previous message
        tails = self._key_tails
        previous: dict[asyncio.Task[None], None] = {}
        keys = [k for d in deliveries if (k := d.message.key) is not None]
        for key in keys:
            tail = tails.get(key)
            if tail is not None:
                previous[tail] = None
        task = asyncio.get_running_loop().create_task(self._run_batch(deliveries, tuple(previous)))
        self.tasks.add(task)
        if keys:
            for key in keys:
                tails[key] = task
            self._batch_keys[task] = keys

    def _finished(self, task: asyncio.Task[None] | None) -> None:
        if task is None:
            return
        self.tasks.discard(task)
        self._settling.discard(task)
        for key in self._batch_keys.pop(task, ()):
            if self._key_tails.get(key) is task:
                del self._key_tails[key]

    # -- one batch ---------------------------------------------------------------------

    async def _run_batch(
        self, deliveries: Sequence[Delivery], previous: tuple[asyncio.Task[None], ...]
    ) -> None:
        me = asyncio.current_task()
        if _LOG_VARS is None:
            structlog.contextvars.bind_contextvars(handler=self.spec.name, batch_size=len(deliveries))
        else:
            _LOG_VARS[3].set(self.spec.name)
        good: list[Delivery] = []
        try:
            waiting = [t for t in previous if not t.done()]
            if waiting:
                await asyncio.wait(waiting)
            payloads: list[Any] = []
            attempt = 1
            decode = self._decode_wire
            envelopes = self.spec.payload_type is Message  # the decoder only checks their size
            for delivery in deliveries:
                body, content_type, tries = delivery.wire()
                try:
                    payload = decode(body, content_type)
                except Exception as exc:  # bad input: this message alone is dead-lettered
                    if me is not None:  # a drain lets its dead-lettering finish (see drain)
                        self._settling.add(me)
                    await self._failed_one(delivery, exc, tries, None)
                    if me is not None:
                        self._settling.discard(me)
                    continue
                payloads.append(delivery.message if envelopes else payload)
                good.append(delivery)
                if tries > attempt:
                    attempt = tries
            if not good:
                return
            ctx = BatchContext(self.mesh, good, self.spec.name, attempt)
            ctx._task = me
            ctx.payload = payloads
            started = time.perf_counter()
            try:
                await self._pipeline(ctx)
            except Exception as exc:
                await self._batch_failed(ctx, exc, attempt, me)
                return
            if me is not None:
                self._settling.add(me)
            self.handled += len(good)
            if self.mesh.has_listeners:
                duration = time.perf_counter() - started
                for delivery, payload in zip(good, payloads, strict=True):
                    self.mesh.emit(
                        MessageHandled(
                            handler=self.spec.name,
                            destination=self.spec.destination,
                            group=self.spec.group,
                            message=delivery.message,
                            payload=payload,
                            duration=duration,
                        )
                    )
            try:
                rest = type(good[0]).ack_all_now(good)
            except MeshlinkError:  # one was settled already: ack the others one by one
                rest = [d for d in good if d.settled is None]
            for delivery in rest:
                try:
                    await delivery.ack()
                except MeshlinkError as exc:
                    _log.warning("could not ack; the broker will redeliver it", error=str(exc))
        except asyncio.CancelledError:
            for delivery in deliveries:
                if delivery.settled is None:
                    ctx1 = Context(self.mesh, delivery, self.spec.name)
                    await self.recoverability.give_back(ctx1, "stopped while running")
            raise
        finally:
            self._finished(me)

    async def _batch_failed(
        self, ctx: BatchContext, exc: Exception, started_at: int, me: asyncio.Task[Any] | None
    ) -> None:
        """Settle every message of a failed batch by the policy, each on its own budget."""
        if me is not None:  # from here on, a drain lets it finish
            self._settling.add(me)
        now = self.mesh.clock.time()
        # the batch's first failure here, unless its time came from the first message's
        # own header: a message without that header first failed here, not then
        here = ctx.first_failed_at
        if here is None or FIRST_FAILED_AT in ctx.message.headers:
            here = now
        tries_here = ctx.attempt - started_at  # in-process retries of this batch
        await asyncio.gather(
            *(self._failed_one(d, exc, d.wire()[2] + tries_here, here) for d in ctx.deliveries)
        )

    async def _failed_one(
        self, delivery: Delivery, exc: Exception, attempt: int, first_failure: float | None
    ) -> None:
        ctx = Context(self.mesh, delivery, self.spec.name)
        ctx.attempt = attempt
        if first_failure is not None:
            ctx.first_failed_at = first_failed_at(ctx.message, first_failure)
        await self._fail(ctx, exc)
