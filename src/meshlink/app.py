"""The :class:`Mesh`: register handlers, publish, run."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import structlog

from meshlink.batch import Batch
from meshlink.batch_dispatch import BatchDispatcher
from meshlink.clock import Clock, SystemClock
from meshlink.dispatch import Dispatcher
from meshlink.errors import ConfigurationError
from meshlink.events import Event, Listener, MeshDraining
from meshlink.handler import HandlerSpec, UserHandler, inspect_handler
from meshlink.logs import redact_url
from meshlink.pipeline import Middleware
from meshlink.publishing import Publisher
from meshlink.resilience.breaker import Breaker, CircuitBreaker, shared_breaker
from meshlink.resilience.bulkhead import Bulkhead
from meshlink.resilience.defaults import DEFAULTS, UNSET, Policies, Unset, resolve
from meshlink.resilience.idempotency import Idempotency
from meshlink.resilience.policy import Retry
from meshlink.transport.base import Transport
from meshlink.transport.registry import transport_from_url

__all__ = ["DEFAULT_DRAIN_TIMEOUT", "UNSET", "Mesh"]

F = TypeVar("F", bound=UserHandler)
Hook = Callable[[], Awaitable[None]]
H = TypeVar("H", bound=Hook)
_log = structlog.get_logger("meshlink.mesh")


DEFAULT_DRAIN_TIMEOUT = 30.0
"""Seconds a stopping mesh waits for running handlers before giving their messages back."""
DEAD_LETTER_GROUP = "dlq"
"""The group declared on every dead-letter destination, which keeps its messages."""


class Mesh(Publisher):
    """A service's connection to the message mesh: its handlers and its publisher.

    Args:
        url: broker URL (``memory://``, ``amqp://…``, ``kafka://…``) or a
            :class:`~meshlink.transport.Transport` instance.
        service: this service's name; the ``ce_source`` of what it publishes and
            the default consumer group of its handlers.
        middleware: middleware applied to every handler, outside the handler's own.
        clock: time source for every time-based behaviour (tests inject a FakeClock).
        drain_timeout: seconds :meth:`stop` waits for running handlers.
        defaults: the policies of handlers that do not set their own
            (see :mod:`meshlink.resilience.defaults`).
        transport_options: keyword options for the transport built from ``url``.

    Example:
        >>> mesh = Mesh("memory://", service="billing")
        >>> @mesh.handler("orders.placed")
        ... async def charge(event: OrderPlaced, ctx: Context) -> None: ...  # doctest: +SKIP
    """

    def __init__(
        self,
        url: str | Transport = "memory://",
        *,
        service: str = "meshlink",
        middleware: Sequence[Middleware] = (),
        clock: Clock | None = None,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        defaults: Policies = DEFAULTS,
        transport_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not service or not isinstance(service, str):
            raise ConfigurationError("service", "must be a non-empty string")
        if drain_timeout < 0:
            raise ConfigurationError("drain_timeout", f"must be >= 0, got {drain_timeout}")
        self.service = service
        self.clock: Clock = clock or SystemClock()
        self.drain_timeout = drain_timeout
        self.defaults = defaults
        self.breakers: dict[str, CircuitBreaker] = {}
        self.middleware = list(middleware)
        if isinstance(url, Transport):
            self.transport = url
        else:
            options = dict(transport_options or {})
            if url.startswith("memory:") and clock is not None:
                options.setdefault("clock", clock)
            self.transport = transport_from_url(url, **options)
        self.handlers: list[HandlerSpec] = []
        self.dispatchers: list[Dispatcher] = []
        self._listeners: list[Listener] = []
        self._started = False
        self._stop_requested: asyncio.Event | None = None
        self._on_start: list[Hook] = []
        self._on_stop: list[Hook] = []
        # start() and stop() one at a time: a stop() during a slow connect was lost (the mesh
        # then ran after stop() returned), and two starts made every dispatcher twice
        self._lifecycle = asyncio.Lock()

    # -- registration ----------------------------------------------------------------

    def handler(
        self,
        destination: str,
        *,
        group: str | None = None,
        name: str | None = None,
        retry: Retry | None = None,
        timeout: float | str | Unset | None = UNSET,
        concurrency: int | None = None,
        bulkhead: Bulkhead | None = None,
        breaker: Breaker | Unset | None = UNSET,
        idempotency: Idempotency | Unset | None = UNSET,
        unit_of_work: Middleware | Unset | None = UNSET,
        dead_letter: str | None = None,
        middleware: Sequence[Middleware] = (),
        options: Mapping[str, Any] | None = None,
        batch: Batch | None = None,
    ) -> Callable[[F], F]:
        """Register an async handler for ``destination``.

        The handler's first parameter is annotated with the payload type (a
        pydantic model, ``Message`` for the raw envelope, ``bytes``, or anything
        pydantic can validate); an optional second parameter receives the
        :class:`~meshlink.Context`.

        Args:
            destination: what to consume.
            group: consumer group; defaults to the service name. Replicas of one
                service share it and compete; other groups get their own copy.
            name: handler name; defaults to the function's name.
            retry: immediate tries, redelivery delays and budget (:class:`~meshlink.Retry`).
            timeout: deadline of one try (``"10s"``), or ``None`` for none.
            concurrency: most messages handled at once (also the prefetch).
            bulkhead: the same as ``concurrency``, as a :class:`~meshlink.Bulkhead`.
            breaker: a :class:`~meshlink.Breaker` (named ones are shared), or ``None``.
            idempotency: an :class:`~meshlink.Idempotency` (store and key), or ``None``.
            unit_of_work: middleware around each try (e.g. ``meshlink_sqlalchemy.UnitOfWork``:
                one transaction per try with the inbox record, the handler's writes and
                its outgoing messages).
            dead_letter: where failed messages go; default ``<destination>.<group>.dlq``.
            Policies not given come from the mesh's ``defaults``.
            middleware: handler-level middleware, first listed outermost.
            options: transport-specific subscription options.
            batch: make it a batch handler (:class:`~meshlink.Batch`): its first parameter
                is ``list[T]``, its context a :class:`~meshlink.BatchContext`, and
                ``concurrency`` counts batches (see :mod:`meshlink.batch`).

        Raises:
            ConfigurationError: on a duplicate handler, an unannotated payload, a
                non-async function, or a bad setting.
        """
        if not destination:
            raise ConfigurationError("destination", "must be a non-empty string")
        policies = resolve(
            self.defaults,
            retry=retry,
            timeout=timeout,
            concurrency=concurrency,
            bulkhead=bulkhead,
            breaker=breaker,
            idempotency=idempotency,
            unit_of_work=unit_of_work,
        )

        if batch is not None:
            per_message = (
                ("idempotency", policies.idempotency, idempotency),
                ("unit_of_work", policies.unit_of_work, unit_of_work),
            )
            for setting, value, given in per_message:
                if value is not None:
                    how = (
                        f"pass {setting}=None to this batch handler (the mesh's defaults set one)"
                        if isinstance(given, Unset)
                        else f"leave {setting} off this batch handler"
                    )
                    raise ConfigurationError(
                        setting, f"works per message and a batch handler handles many at once; {how}"
                    )

        def register(fn: F) -> F:
            handler_name: str = name or str(getattr(fn, "__name__", repr(fn)))
            payload_type, wants_context = inspect_handler(fn, name=handler_name, batch=batch is not None)
            the_group = group or self.service
            for other in self.handlers:
                if other.name == handler_name:
                    raise ConfigurationError("handler", f"a handler named {handler_name!r} exists already")
                if (other.destination, other.group) == (destination, the_group):
                    raise ConfigurationError(
                        "group",
                        f"{handler_name!r} and {other.name!r} both consume {destination!r} in group "
                        f"{the_group!r}; give one of them another group= to receive every message",
                    )
            if self._started:
                raise ConfigurationError("handler", f"{handler_name!r} registered after the mesh started")
            self.handlers.append(
                HandlerSpec(
                    name=handler_name,
                    destination=destination,
                    group=the_group,
                    fn=fn,
                    payload_type=payload_type,
                    wants_context=wants_context,
                    policies=policies,
                    dead_letter=dead_letter or f"{destination}.{the_group}.dlq",
                    retry_destination=f"{destination}.{the_group}.retry",
                    middleware=tuple(middleware),
                    options=dict(options or {}),
                    batch=batch,
                )
            )
            return fn

        return register

    def on_start(self, hook: H) -> H:
        """Decorator: run ``async def hook()`` once the mesh has started (handlers running)."""
        self._on_start.append(hook)
        return hook

    def on_stop(self, hook: H) -> H:
        """Decorator: run ``async def hook()`` after the mesh has stopped and closed."""
        self._on_stop.append(hook)
        return hook

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener`` with every :mod:`~meshlink.events` event this mesh emits."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener``."""
        self._listeners.remove(listener)

    @property
    def has_listeners(self) -> bool:
        """Whether any listener is registered (lets hot paths skip building events)."""
        return bool(self._listeners)

    def emit(self, event: Event) -> None:
        """Send ``event`` to every listener; a failing listener is logged and skipped."""
        for listener in tuple(self._listeners):  # a listener may remove itself meanwhile
            try:
                listener(event)
            except Exception:
                _log.exception("event listener failed", listener=repr(listener))

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (failing fast if the broker is unreachable) and start every handler."""
        async with self._lifecycle:
            await self._start()

    async def _start(self) -> None:
        if self._started:
            return
        await self.transport.connect()
        self._started = True
        try:
            for spec in self.handlers:
                await self.transport.declare(spec.dead_letter, DEAD_LETTER_GROUP)
            for spec in self.handlers:
                kind = Dispatcher if spec.batch is None else BatchDispatcher
                dispatcher = kind(
                    self,
                    spec,
                    self.middleware,
                    breaker=shared_breaker(
                        self.breakers, spec.policies.breaker, spec.name, clock=self.clock, emit=self.emit
                    ),
                )
                self.dispatchers.append(dispatcher)
                await dispatcher.start()
            for breaker in self.breakers.values():
                await breaker.start()
            for hook in self._on_start:
                await hook()
        except BaseException:
            await self._stop()
            raise
        _log.info(
            "mesh started",
            service=self.service,
            transport=redact_url(self.transport.describe()),
            handlers=[h.name for h in self.handlers],
        )

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Stop fetching, let running handlers finish (up to the drain timeout), close.

        Handlers still running at the deadline are cancelled and their messages go
        back to the broker; everything that finished was acked. Nothing is lost.
        """
        async with self._lifecycle:
            await self._stop(drain_timeout)

    async def _stop(self, drain_timeout: float | None = None) -> None:
        if not self._started:
            return
        self._started = False
        timeout = self.drain_timeout if drain_timeout is None else drain_timeout
        cancelled = 0
        try:
            for breaker in self.breakers.values():
                await breaker.stop()
            self.breakers.clear()
            for d in self.dispatchers:
                await d.stop_fetching()
            self.emit(MeshDraining(service=self.service, in_flight=self.in_flight, deadline=timeout))
            deadline = asyncio.get_running_loop().time() + timeout
            for d in self.dispatchers:
                cancelled += await d.drain(deadline)
            await self.transport.close()
        finally:  # a transport that fails to close must not leave stale dispatchers for a restart
            self.dispatchers.clear()
            self.breakers.clear()
        _log.info("mesh stopped", service=self.service, cancelled_in_flight=cancelled)
        for hook in self._on_stop:
            await hook()

    @property
    def started(self) -> bool:
        """Whether the mesh is running."""
        return self._started

    @property
    def in_flight(self) -> int:
        """Handler tasks running right now."""
        return sum(len(d.tasks) for d in self.dispatchers)

    async def __aenter__(self) -> Mesh:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def request_stop(self) -> None:
        """Ask :meth:`serve` to stop (what SIGINT and SIGTERM do)."""
        if self._stop_requested is not None:
            self._stop_requested.set()

    async def serve(self) -> None:
        """Start, run until :meth:`request_stop` or SIGINT/SIGTERM, then stop gracefully."""
        self._stop_requested = asyncio.Event()
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self.request_stop)
                installed.append(sig)
            except (NotImplementedError, RuntimeError):  # pragma: no cover - not main thread / Windows
                pass
        try:
            await self.start()
            await self._stop_requested.wait()
            _log.info("stop requested; draining", service=self.service)
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await self.stop()

    def run(self) -> None:
        """Run the mesh in a new event loop until SIGINT or SIGTERM."""
        asyncio.run(self.serve())
