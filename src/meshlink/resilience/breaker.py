"""Circuit breaker: stop consuming while a dependency is failing.

The state model (closed → open after ``failures`` consecutive failures →
half-open after ``reset`` → closed on a successful trial, open again on a
failed one) and its optional Redis storage are pybreaker's. What pybreaker
cannot do for asyncio is written here: its own async path needs Tornado, its
open → half-open move reads the wall clock, and its Redis storage blocks. So:

* outcomes are recorded through pybreaker's synchronous ``call`` (in a worker
  thread when the storage is Redis, so the event loop never blocks on I/O);
* the open → half-open move is driven by the injected clock;
* with Redis, a watcher task notices state changes made by other processes.

While the breaker is open, every subscription attached to it is **paused** (no
fetching) and messages already in flight go back to the broker without
spending their retry budget. Half-open resumes consumption for exactly one
trial message, then pauses again until the trial's outcome is known.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import pybreaker

from meshlink.clock import Clock
from meshlink.context import Context
from meshlink.errors import CircuitOpenError, ConfigurationError, is_retryable
from meshlink.events import BreakerStateChanged, Event
from meshlink.pipeline import Handler
from meshlink.resilience.policy import parse_duration

__all__ = ["Breaker", "CircuitBreaker", "Pausable", "shared_breaker"]

T = TypeVar("T")
CLOSED, OPEN, HALF_OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN
_NEVER = 10.0**9  # pybreaker must never move to half-open by itself: our clock does it


@dataclass(frozen=True, kw_only=True)
class Breaker:
    """Circuit breaker settings for a handler (or several, through ``name``)."""

    failures: int = 5
    """Consecutive failures that open the circuit."""
    reset: float | str = "30s"
    """Time the circuit stays open before a half-open trial."""
    name: str | None = None
    """Handlers whose breakers have the same name share one breaker."""
    redis_url: str | None = None
    """Share the state with other processes through Redis (e.g. ``redis://localhost:6379/0``)."""
    watch_interval: float | str = "1s"
    """With Redis: how often to look for state changes made by other processes."""

    def __post_init__(self) -> None:
        if self.failures < 1:
            raise ConfigurationError("breaker.failures", f"must be >= 1, got {self.failures}")
        if parse_duration(self.reset, setting="breaker.reset") <= 0:
            raise ConfigurationError("breaker.reset", "must be > 0")
        parse_duration(self.watch_interval, setting="breaker.watch_interval")


class Pausable(Protocol):
    """What a breaker pauses: a subscription."""

    async def pause(self) -> None: ...
    async def resume(self) -> None: ...


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, owner: CircuitBreaker) -> None:
        self.owner = owner

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        old = old_state.name if old_state is not None else CLOSED
        self.owner._state_changed_threadsafe(old, new_state.name)


class CircuitBreaker:
    """A running breaker. A middleware, and a wrapper for any coroutine function."""

    def __init__(
        self,
        config: Breaker,
        *,
        name: str,
        clock: Clock,
        emit: Callable[[Event], None] = lambda e: None,
    ) -> None:
        self.config = config
        self.name = name
        self.clock = clock
        self._emit = emit
        self._reset = parse_duration(config.reset, setting="breaker.reset")
        self._shared = config.redis_url is not None
        storage: pybreaker.CircuitBreakerStorage | None = None
        if config.redis_url is not None:
            try:
                import redis  # optional dependency: only for breakers shared across processes
            except ImportError as exc:
                raise ConfigurationError(
                    "breaker.redis_url", "a shared breaker needs redis: pip install 'meshlink[redis]'"
                ) from exc

            client = redis.Redis.from_url(config.redis_url)
            storage = pybreaker.CircuitRedisStorage(CLOSED, client, namespace=f"meshlink:{name}")
        self._cb = pybreaker.CircuitBreaker(
            fail_max=config.failures,
            reset_timeout=_NEVER,
            name=name,
            state_storage=storage,
            listeners=[_Listener(self)],
            throw_new_error_on_trip=False,
        )
        self.state: str = self._cb.current_state
        self._trial_taken = False
        self._subscriptions: list[Pausable] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.Task[None] | None = None
        # Pausing and resuming await the broker: one change at a time, or a resume could
        # run inside a pause and leave the subscriptions paused with the circuit closed.
        self._switching = asyncio.Lock()

    # -- wiring --------------------------------------------------------------------------

    def attach(self, subscription: Pausable) -> None:
        """Pause and resume ``subscription`` with this breaker."""
        self._subscriptions.append(subscription)
        if self._loop is None:
            # a subscription may deliver (and its failures open the circuit) before start():
            # state changes need the loop from the first delivery on, or they are dropped
            with contextlib.suppress(RuntimeError):
                self._loop = asyncio.get_running_loop()

    async def start(self) -> None:
        """Begin watching (shared breakers) and apply the current state."""
        self._loop = asyncio.get_running_loop()
        if self._shared:
            self.state = await asyncio.to_thread(lambda: self._cb.current_state)
            self._spawn(self._watch())
        if self.state != CLOSED:
            await self._apply(self.state)

    async def stop(self) -> None:
        """Stop timers and watchers. What is attached stays attached: a breaker started again
        (an outbox relay restarted while the broker was down) pauses and resumes it again."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- the gate ------------------------------------------------------------------------------

    def before_call(self) -> None:
        """Raise CircuitOpenError unless a call may go through now."""
        if self.state == CLOSED:
            return
        if self.state == HALF_OPEN and not self._trial_taken:
            self._trial_taken = True
            self._spawn(self._hold_for_trial())  # one trial: hold everything else back
            return
        raise CircuitOpenError(f"circuit {self.name!r} is {self.state}", breaker=self.name)

    async def record(self, error: BaseException | None) -> None:
        """Feed one outcome to the state model (permanent errors are not the dependency's fault)."""
        if isinstance(error, CircuitOpenError):
            return  # refused by the re-check: the dependency was not called
        if error is not None and not is_retryable(error):
            error = None
        if error is None and self.state == CLOSED and not self._shared and self._cb.fail_counter == 0:
            return  # nothing to reset: skip the call (keeps the hot path cheap)

        def feed() -> None:
            def outcome() -> None:
                if error is not None:
                    raise error

            with contextlib.suppress(BaseException):
                self._cb.call(outcome)

        if self._shared:
            await asyncio.to_thread(feed)
        else:
            feed()

    async def run(self, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        """Await ``fn(*args)`` through the breaker."""
        self.before_call()
        try:
            result = await fn(*args)
        except Exception as exc:
            await self.record(exc)
            raise
        await self.record(None)
        return result

    def __call__(self, next_: Handler) -> Handler:
        async def guarded(ctx: object) -> None:
            await self.run(next_, ctx)

        return guarded

    def recheck(self, next_: Handler) -> Handler:
        """Middleware further in: refuse a message that passed the gate while the circuit was
        closed and then waited (for a bulkhead slot, or a retry's backoff) while it opened."""

        async def rechecked(ctx: Context) -> None:
            if self.state == OPEN:
                raise CircuitOpenError(f"circuit {self.name!r} is {self.state}", breaker=self.name)
            await next_(ctx)

        return rechecked

    # -- state changes ----------------------------------------------------------------------

    def _state_changed_threadsafe(self, old: str, new: str) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._on_state(old, new)
        else:
            loop.call_soon_threadsafe(self._on_state, old, new)

    def _on_state(self, old: str, new: str) -> None:
        if new == self.state:
            return
        previous, self.state = self.state, new
        self._emit(BreakerStateChanged(breaker=self.name, state=new, previous=previous))
        self._spawn(self._apply(new))

    async def _hold_for_trial(self) -> None:
        async with self._switching:
            if self.state == HALF_OPEN and self._trial_taken:  # not already decided
                await self._pause_all()

    async def _apply(self, state: str) -> None:
        async with self._switching:
            await self._switch_to(state)

    async def _switch_to(self, state: str) -> None:
        if self._timer is not None and self._timer is not asyncio.current_task():
            self._timer.cancel()
            self._timer = None
        if state == OPEN:
            await self._pause_all()
            self._timer = self._spawn(self._half_open_later())
        elif state == HALF_OPEN:
            self._trial_taken = False
            await self._resume_all()
        else:
            self._trial_taken = False
            await self._resume_all()

    async def _half_open_later(self) -> None:
        await self.clock.sleep(self._reset)
        if self._shared:
            await asyncio.to_thread(self._cb.half_open)
        else:
            self._cb.half_open()

    async def _watch(self) -> None:
        interval = parse_duration(self.config.watch_interval, setting="breaker.watch_interval")
        while True:
            await self.clock.sleep(interval)
            state = await asyncio.to_thread(lambda: self._cb.current_state)
            if state != self.state:
                self._on_state(self.state, state)

    async def _pause_all(self) -> None:
        for sub in self._subscriptions:
            with contextlib.suppress(Exception):
                await sub.pause()

    async def _resume_all(self) -> None:
        for sub in self._subscriptions:
            with contextlib.suppress(Exception):
                await sub.resume()

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker({self.name!r}, opens after {self.config.failures} failures, "
            f"half-open after {self._reset:g}s{', shared via Redis' if self._shared else ''})"
        )


def shared_breaker(
    breakers: dict[str, CircuitBreaker],
    config: Breaker | None,
    handler: str,
    *,
    clock: Clock,
    emit: Callable[[Event], None],
) -> CircuitBreaker | None:
    """The breaker of a handler from a mesh's registry ``breakers``: one per name (the
    handler's unless ``config.name`` is given), shared by every handler that names it."""
    if config is None:
        return None
    name = config.name or handler
    existing = breakers.get(name)
    if existing is not None:
        if existing.config != config:
            raise ConfigurationError("breaker", f"breaker {name!r} is declared twice with other settings")
        return existing
    breaker = breakers[name] = CircuitBreaker(config, name=name, clock=clock, emit=emit)
    return breaker
