"""Running one handler: tasks per delivery, per-key order, the policy stack, settle, drain.

A :class:`Dispatcher` is what the transport's ``on_delivery`` calls, for the
handler's destination and its retry destination. It starts one task per
delivery (the transport's prefetch and the bulkhead bound how many), keeps
messages of one key in order (a key's next message waits for the previous one,
whatever the broker does), runs the policy stack, settles each delivery by how
it ended, and on shutdown drains: waits for running handlers up to a deadline,
then cancels the rest and gives their messages back to the broker.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from typing import TYPE_CHECKING, Any

import structlog

from meshlink.context import Context
from meshlink.errors import MeshlinkError
from meshlink.events import HandlerFailed, MessageHandled
from meshlink.handler import HandlerSpec
from meshlink.pipeline import Middleware, compose
from meshlink.resilience.breaker import CircuitBreaker
from meshlink.resilience.bulkhead import Bulkhead
from meshlink.resilience.idempotency import IdempotencyMiddleware
from meshlink.resilience.recoverability import Recoverability
from meshlink.resilience.retry import RetryMiddleware
from meshlink.resilience.timeout import Timeout
from meshlink.transport.base import Delivery, Subscription, SubscriptionSpec

if TYPE_CHECKING:
    from meshlink.app import Mesh

__all__ = ["Dispatcher", "policy_stack"]

_log = structlog.get_logger("meshlink.dispatch")


def _log_vars() -> tuple[contextvars.ContextVar[Any], ...] | None:
    """structlog's own context variables for the keys bound per message, or ``None``.

    ``bind_contextvars`` looks each variable up by a formatted name on every call
    (a tenth of the dispatcher's cost per message); setting the same variables
    directly binds exactly the same context (read by ``merge_contextvars``). The
    registry is structlog's private one, hence the fallback to the public call.
    """
    keys = ("message_id", "message_type", "correlation_id", "handler", "attempt")
    registry = getattr(structlog.contextvars, "_CONTEXT_VARS", None)
    if not isinstance(registry, dict):
        return None
    # bind (in a throw-away context) once so that structlog creates and registers them
    contextvars.Context().run(structlog.contextvars.bind_contextvars, **dict.fromkeys(keys))
    found = [registry.get(f"{structlog.contextvars.STRUCTLOG_KEY_PREFIX}{k}") for k in keys]
    if not all(isinstance(v, contextvars.ContextVar) for v in found):
        return None
    return tuple(v for v in found if v is not None)


_LOG_VARS = _log_vars()

#: Seconds a drain waits, past its deadline, for handlers that returned to settle.
_SETTLE_GRACE = 30.0


def policy_stack(spec: HandlerSpec, breaker: Middleware | None, bulkhead: Bulkhead) -> list[Middleware]:
    """The resilience middleware of a handler, outermost first:
    idempotency → breaker → bulkhead → retry → breaker re-check → unit of work → timeout."""
    p = spec.policies
    stack: list[Middleware] = []
    if p.idempotency is not None:
        stack.append(IdempotencyMiddleware(p.idempotency))
    if breaker is not None:
        stack.append(breaker)
    stack.append(bulkhead)
    if p.retry.attempts > 1:
        stack.append(RetryMiddleware(p.retry))
    if isinstance(breaker, CircuitBreaker):
        # the breaker may have opened while this message waited for a slot or a retry
        stack.append(breaker.recheck)
    if p.unit_of_work is not None:
        stack.append(p.unit_of_work)
    if p.timeout is not None:
        stack.append(Timeout(p.timeout))
    return stack


class Dispatcher:
    """Feeds one handler from its subscriptions."""

    def __init__(
        self,
        mesh: Mesh,
        spec: HandlerSpec,
        middleware: list[Middleware],
        *,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.mesh = mesh
        self.spec = spec
        self.breaker = breaker
        self.bulkhead = Bulkhead(spec.concurrency)
        self.subscriptions: list[Subscription] = []
        self.tasks: set[asyncio.Task[None]] = set()
        # tasks whose handler has returned: they only settle now and are never cancelled
        self._settling: set[asyncio.Task[None]] = set()
        self._key_tails: dict[str, asyncio.Task[None]] = {}
        self._task_keys: dict[asyncio.Task[None], str] = {}
        self._decode = spec.decoder()
        self.stack = [*middleware, *spec.middleware, *policy_stack(spec, breaker, self.bulkhead)]
        self._pipeline = compose(self.stack, self._call_user)
        self.recoverability = Recoverability(mesh, spec)
        self.handled = 0
        self.failed = 0

    def subscription_specs(self) -> list[SubscriptionSpec]:
        """The destination, and the retry destination (redeliveries and DLQ replays come back there)."""
        destinations = [self.spec.destination, self.spec.retry_destination]
        return [
            SubscriptionSpec(
                destination=d,
                group=self.spec.group,
                prefetch=self.spec.prefetch,
                options=self.spec.options,
            )
            for d in destinations
        ]

    async def start(self) -> None:
        """Subscribe to every destination of this handler."""
        for sub_spec in self.subscription_specs():
            subscription = await self.mesh.transport.subscribe(sub_spec, self.on_delivery)
            self.subscriptions.append(subscription)
            if self.breaker is not None:
                self.breaker.attach(subscription)

    async def on_delivery(self, delivery: Delivery) -> None:
        key = delivery.message.key
        previous = self._key_tails.get(key) if key is not None else None
        task = asyncio.get_running_loop().create_task(self._run(delivery, previous))
        self.tasks.add(task)
        if key is not None:
            self._key_tails[key] = task
            self._task_keys[task] = key

    def _finished(self, task: asyncio.Task[None] | None) -> None:
        """Forget a delivery's task: called as its last step (not as a done callback, which
        costs an event-loop callback per message), and by drain() for tasks cancelled
        before they ever ran."""
        if task is None:
            return
        self.tasks.discard(task)
        self._settling.discard(task)
        key = self._task_keys.pop(task, None)
        if key is not None and self._key_tails.get(key) is task:
            del self._key_tails[key]

    # -- one delivery ----------------------------------------------------------------

    async def _run(self, delivery: Delivery, previous: asyncio.Task[None] | None) -> None:
        message = delivery.message
        me = asyncio.current_task()  # once: asyncio.current_task() is Python code on 3.11
        ctx = Context(self.mesh, delivery, self.spec.name)
        ctx._task = me
        # Each delivery runs in its own task, whose context is a copy: binding here
        # needs no reset, and costs half of structlog's bound_contextvars().
        if _LOG_VARS is None:
            structlog.contextvars.bind_contextvars(
                message_id=message.id,
                message_type=message.type,
                correlation_id=message.correlation_id or message.id,
                handler=self.spec.name,
                attempt=message.attempt,
            )
        else:
            v_id, v_type, v_correlation, v_handler, v_attempt = _LOG_VARS
            v_id.set(message.id)
            v_type.set(message.type)
            v_correlation.set(message.correlation_id or message.id)
            v_handler.set(self.spec.name)
            v_attempt.set(message.attempt)
        try:
            if previous is not None and not previous.done():
                await asyncio.wait([previous])
            # the outermost stage (inline: one coroutine less per message): ack on success;
            # on failure, act on the policy's decision
            started = time.perf_counter()
            try:
                ctx.payload = self._decode(message)
                await self._pipeline(ctx)
            except Exception as exc:
                await self._failed(ctx, exc, me)
                return
            if me is not None:
                self._settling.add(me)
            self.handled += 1
            if self.mesh.has_listeners:
                self.mesh.emit(
                    MessageHandled(
                        handler=self.spec.name,
                        destination=self.spec.destination,
                        group=self.spec.group,
                        message=message,
                        payload=ctx.payload,
                        duration=time.perf_counter() - started,
                    )
                )
            try:
                await delivery.ack()
            except MeshlinkError as exc:
                _log.warning("could not ack; the broker will redeliver it", error=str(exc))
        except asyncio.CancelledError:
            await self.recoverability.give_back(ctx, "stopped while running")
            raise
        finally:
            self._finished(me)

    async def _failed(self, ctx: Context, exc: Exception, me: asyncio.Task[Any] | None) -> None:
        if me is not None:  # from here on, a drain lets it finish (see drain)
            self._settling.add(me)
        await self._fail(ctx, exc)

    async def _fail(self, ctx: Context, exc: Exception) -> None:
        """Count and report the failure, then settle the message as the policy decides."""
        self.failed += 1
        self.mesh.emit(
            HandlerFailed(
                handler=self.spec.name,
                destination=self.spec.destination,
                group=self.spec.group,
                message=ctx.message,
                error=exc,
            )
        )
        await self.recoverability.on_failure(ctx, exc)

    async def _call_user(self, ctx: Context) -> None:
        if ctx._task is not None:
            self._settling.discard(ctx._task)  # a retried try is running again: cancellable
        if self.spec.wants_context:
            await self.spec.fn(ctx.payload, ctx)
        else:
            await self.spec.fn(ctx.payload)
        if ctx._task is not None:
            # the handler returned: a drain lets the rest of the stack (recording the
            # idempotency key, the breaker's outcome) and the settlement finish
            self._settling.add(ctx._task)

    # -- shutdown ----------------------------------------------------------------------

    async def stop_fetching(self) -> None:
        for subscription in self.subscriptions:
            await subscription.stop()

    async def drain(self, deadline: float) -> int:
        """Wait for running handlers until ``deadline`` (loop time); cancel the rest.

        A handler that has returned is never cancelled: its ack, redelivery or
        dead-letter publish completes, so a message that finished is not
        delivered again. Returns how many handlers were cancelled (their
        messages went back to the broker).
        """
        loop = asyncio.get_running_loop()
        pending = set(self.tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=max(0.0, deadline - loop.time()))
        cancelled = [t for t in pending if t not in self._settling]
        for task in cancelled:
            task.cancel()
        if pending:
            _, stuck = await asyncio.wait(pending, timeout=_SETTLE_GRACE)
            if stuck:
                # a store or broker that stopped answering must not hold the shutdown forever:
                # these messages were not settled, so the broker delivers them again
                _log.warning("settlements did not finish; cancelled", count=len(stuck), grace=_SETTLE_GRACE)
                for task in stuck:
                    task.cancel()
                _, unfinished = await asyncio.wait(stuck, timeout=_SETTLE_GRACE)
                if unfinished:  # a give-back that hangs too: leave it, the broker redelivers
                    _log.error("handler tasks ignored their cancellation", count=len(unfinished))
                cancelled.extend(t for t in stuck if t not in cancelled)
        for task in [t for t in self.tasks if t.done()]:  # cancelled before their first step
            self._finished(task)
        return len(cancelled)
