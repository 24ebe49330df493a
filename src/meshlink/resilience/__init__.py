"""Failure handling policies: one module per policy, each usable on its own.

Order around a handler, outermost first: settle (the recoverability decision) →
decode → idempotency → circuit breaker → bulkhead → retry → timeout → handler.
Defaults: :mod:`meshlink.resilience.defaults`.
"""

from meshlink.resilience.breaker import Breaker, CircuitBreaker
from meshlink.resilience.bulkhead import Bulkhead
from meshlink.resilience.deadletter import DeadLetter, failure_headers
from meshlink.resilience.defaults import DEFAULTS, Policies
from meshlink.resilience.idempotency import (
    Claim,
    Idempotency,
    IdempotencyStore,
    MemoryIdempotencyStore,
    RedisIdempotencyStore,
)
from meshlink.resilience.policy import Retry, decide
from meshlink.resilience.timeout import Timeout

__all__ = [
    "Breaker",
    "Bulkhead",
    "CircuitBreaker",
    "Claim",
    "DEFAULTS",
    "DeadLetter",
    "Idempotency",
    "IdempotencyStore",
    "MemoryIdempotencyStore",
    "Policies",
    "RedisIdempotencyStore",
    "Retry",
    "Timeout",
    "decide",
    "failure_headers",
]
