"""Idempotency: a message whose key was already processed is acked without running again.

The store contract is claim-before-run: :meth:`IdempotencyStore.claim` atomically
marks a key *in progress* (so two concurrent deliveries of one key never both
run — a RabbitMQ consumer timeout can redeliver a message while its first
handler still runs), :meth:`~IdempotencyStore.complete` records success for
``ttl`` seconds, :meth:`~IdempotencyStore.release` forgets a failed claim so the
message can be retried. A claim expires by itself after ``lease`` seconds, so a
crashed consumer does not block its key forever.

Stores: :class:`MemoryIdempotencyStore` (bounded, per process) and
:class:`RedisIdempotencyStore` (shared). The SQL store that writes the record in
the handler's own transaction lives in ``meshlink-sqlalchemy``.
"""

from __future__ import annotations

import enum
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from meshlink.clock import Clock, SystemClock
from meshlink.context import Context
from meshlink.errors import ConfigurationError, DuplicateInProgressError
from meshlink.events import DuplicateSkipped
from meshlink.pipeline import Handler
from meshlink.resilience.policy import parse_duration

__all__ = [
    "Claim",
    "Idempotency",
    "IdempotencyMiddleware",
    "IdempotencyStore",
    "MemoryIdempotencyStore",
    "RedisIdempotencyStore",
]


class Claim(enum.Enum):
    """The answer of :meth:`IdempotencyStore.claim`."""

    CLAIMED = "claimed"
    """The caller owns the key now and must complete or release it."""
    DONE = "done"
    """The key was processed already: skip."""
    IN_PROGRESS = "in-progress"
    """Someone else holds the key right now: try again later."""


@runtime_checkable
class IdempotencyStore(Protocol):
    """Where processed keys are remembered. Every method is atomic per key."""

    async def claim(self, key: str, *, token: str, lease: float) -> Claim:
        """Claim ``key`` for ``lease`` seconds under ``token``, unless done or held."""
        ...

    async def complete(self, key: str, *, token: str, ttl: float) -> None:
        """Record ``key`` as processed for ``ttl`` seconds."""
        ...

    async def release(self, key: str, *, token: str) -> None:
        """Forget the claim on ``key`` if ``token`` still holds it."""
        ...


class MemoryIdempotencyStore:
    """A bounded in-process store: past ``max_keys``, the oldest recorded (or expired) keys are
    forgotten; a claim still held is kept, so the bound may be exceeded by the claims running."""

    def __init__(self, *, max_keys: int = 100_000, clock: Clock | None = None) -> None:
        if max_keys < 1:
            raise ConfigurationError("idempotency.max_keys", f"must be >= 1, got {max_keys}")
        self.max_keys = max_keys
        self.clock = clock or SystemClock()
        # key -> (state, token, expires_at); insertion order = age, for eviction
        self._keys: OrderedDict[str, tuple[str, str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    async def claim(self, key: str, *, token: str, lease: float) -> Claim:
        now = self.clock.monotonic()
        entry = self._keys.get(key)
        if entry is not None and entry[2] > now:
            return Claim.DONE if entry[0] == "done" else Claim.IN_PROGRESS
        self._keys[key] = ("pending", token, now + lease)
        self._keys.move_to_end(key)
        excess = len(self._keys) - self.max_keys
        if excess > 0:
            # oldest first, but never a claim still held: evicting one would let a duplicate
            # run beside it (held claims are at most the handlers running, so the scan is short)
            victims = []
            for old, (state, _, expires) in self._keys.items():
                if state == "done" or expires <= now:
                    victims.append(old)
                    if len(victims) == excess:
                        break
            for old in victims:
                del self._keys[old]
        return Claim.CLAIMED

    async def complete(self, key: str, *, token: str, ttl: float) -> None:
        self._keys[key] = ("done", token, self.clock.monotonic() + ttl)
        self._keys.move_to_end(key)

    async def release(self, key: str, *, token: str) -> None:
        entry = self._keys.get(key)
        if entry is not None and entry[0] == "pending" and entry[1] == token:
            del self._keys[key]


class RedisIdempotencyStore:
    """A store shared by every replica, in Redis (``SET NX PX`` claims, token-checked release)."""

    _RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, prefix: str = "meshlink:idem:") -> None:
        try:
            import redis.asyncio  # optional dependency
        except ImportError as exc:
            raise ConfigurationError(
                "idempotency.store", "RedisIdempotencyStore needs redis: pip install 'meshlink[redis]'"
            ) from exc

        from redis.asyncio.retry import Retry as RedisRetry
        from redis.backoff import ExponentialBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        # ``from_url`` alone retries nothing: a reply lost to a reset link would fail the
        # claim, and the next try (a new token) would find its own claim in progress.
        # Retried with the same token, a SET NX that did land is recognised (see claim).
        self._redis = redis.asyncio.Redis.from_url(
            url,
            retry=RedisRetry(ExponentialBackoff(cap=1.0, base=0.05), 3),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        self.prefix = prefix

    async def claim(self, key: str, *, token: str, lease: float) -> Claim:
        """Claim ``key``; a pending value under ``token`` is ours already.

        That happens when redis-py retries a ``SET NX`` whose reply was lost after
        Redis had executed it: the retry finds the value the first send stored.
        """
        name, mine, px = self.prefix + key, f"pending:{token}", max(1, int(lease * 1000))
        for _ in range(2):  # a second time only if the key expired between the two calls
            if await self._redis.set(name, mine, nx=True, px=px):
                return Claim.CLAIMED
            value = await self._redis.get(name)
            if value is not None:
                if value == mine.encode():
                    return Claim.CLAIMED
                return Claim.DONE if value == b"done" else Claim.IN_PROGRESS
        return Claim.IN_PROGRESS

    async def complete(self, key: str, *, token: str, ttl: float) -> None:
        await self._redis.set(self.prefix + key, "done", px=max(1, int(ttl * 1000)))

    async def release(self, key: str, *, token: str) -> None:
        await self._redis.eval(self._RELEASE, 1, self.prefix + key, f"pending:{token}")

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()


@dataclass(frozen=True, kw_only=True)
class Idempotency:
    """Idempotency settings for a handler."""

    store: IdempotencyStore
    """Where processed keys are kept."""
    key: Callable[[Any], str] | None = None
    """Key from the decoded payload; default: the message's ``idempotency-key`` header."""
    ttl: float | str = "24h"
    """How long a processed key is remembered."""
    lease: float | str = "5m"
    """How long a claim lasts if its holder dies without completing or releasing."""

    def __post_init__(self) -> None:
        if parse_duration(self.ttl, setting="idempotency.ttl") <= 0:
            raise ConfigurationError("idempotency.ttl", "must be > 0")
        if parse_duration(self.lease, setting="idempotency.lease") <= 0:
            raise ConfigurationError("idempotency.lease", "must be > 0")


class IdempotencyMiddleware:
    """Claim the key before running; complete on success, release on failure."""

    def __init__(self, config: Idempotency) -> None:
        self.config = config
        self.store = config.store
        self._ttl = parse_duration(config.ttl, setting="idempotency.ttl")
        self._lease = parse_duration(config.lease, setting="idempotency.lease")

    def key_of(self, ctx: Context) -> str:
        """The idempotency key of the message in ``ctx``."""
        if self.config.key is not None:
            return f"{ctx.handler}:{self.config.key(ctx.payload)}"
        return f"{ctx.handler}:{ctx.message.idempotency_key}"

    def __call__(self, next_: Handler) -> Handler:
        async def once(ctx: Context) -> None:
            key = self.key_of(ctx)
            token = uuid.uuid4().hex
            try:
                claim = await self.store.claim(key, token=token, lease=self._lease)
            except BaseException:
                # cancelled (or failed) after the claim may have landed: never leave it held
                # for the lease (release only removes a claim under this token)
                await self.store.release(key, token=token)
                raise
            if claim is Claim.DONE:
                ctx.emit(DuplicateSkipped(handler=ctx.handler, message=ctx.message, key=key))
                return
            if claim is Claim.IN_PROGRESS:
                raise DuplicateInProgressError("the same key is being handled now", key=key)
            try:
                await next_(ctx)
            except BaseException:
                await self.store.release(key, token=token)
                raise
            await self.store.complete(key, token=token, ttl=self._ttl)

        return once

    def __repr__(self) -> str:
        return f"Idempotency(store={type(self.store).__name__}, ttl={self._ttl:g}s)"
