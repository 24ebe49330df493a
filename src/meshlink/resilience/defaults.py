"""Every default policy, in one place.

A handler that says nothing gets :data:`DEFAULTS`: 3 tries in process (0.1 s,
0.2 s apart, with jitter), then redeliveries after 5 s, 30 s and 2 min, then the
dead-letter destination ``<destination>.<group>.dlq``; a 60 s timeout per try
(well under RabbitMQ's 30 min consumer timeout and Kafka's 5 min poll interval);
16 messages at once (prefetch 16); no circuit breaker and no idempotency store
(both need a decision only the service can make: which dependency, which store).
Override per mesh with ``Mesh(defaults=Policies(...))`` or per handler with the
keywords of ``@mesh.handler``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshlink.errors import ConfigurationError
from meshlink.pipeline import Middleware
from meshlink.resilience.breaker import Breaker
from meshlink.resilience.bulkhead import Bulkhead
from meshlink.resilience.idempotency import Idempotency
from meshlink.resilience.policy import Retry, parse_duration

__all__ = ["DEFAULTS", "UNSET", "Policies", "Unset"]


@dataclass(frozen=True, kw_only=True)
class Policies:
    """The failure-handling policies of a handler."""

    retry: Retry = field(default_factory=Retry)
    """Immediate tries, redelivery delays, budget."""
    timeout: float | str | None = "60s"
    """Deadline of one try; ``None`` for none."""
    concurrency: int = 16
    """Bulkhead: most messages handled at once (and the transport prefetch)."""
    breaker: Breaker | None = None
    """Circuit breaker; ``None`` for none."""
    idempotency: Idempotency | None = None
    """Skip messages whose key was processed; ``None`` for no check."""
    unit_of_work: Middleware | None = None
    """Middleware run around each *try* (inside retry, outside timeout): e.g. the SQL
    unit of work, so every try gets its own transaction and a failed try leaves nothing."""
    max_body_bytes: int = 16 * 1024 * 1024
    """Bodies larger than this are dead-lettered before decoding; the mesh's ``defaults`` also
    refuse them on publish (``EncodeError``, before any transport)."""

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigurationError("concurrency", f"must be >= 1, got {self.concurrency}")
        if self.timeout is not None and parse_duration(self.timeout, setting="timeout") <= 0:
            raise ConfigurationError("timeout", "must be > 0")
        if self.max_body_bytes < 1:
            raise ConfigurationError("max_body_bytes", f"must be >= 1, got {self.max_body_bytes}")


DEFAULTS = Policies()


class Unset:
    """The type of :data:`UNSET`: "not given" where ``None`` means "none"."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET = Unset()


def resolve(
    defaults: Policies,
    *,
    retry: Retry | None = None,
    timeout: float | str | Unset | None = UNSET,
    concurrency: int | None = None,
    bulkhead: Bulkhead | None = None,
    breaker: Breaker | Unset | None = UNSET,
    idempotency: Idempotency | Unset | None = UNSET,
    unit_of_work: Middleware | Unset | None = UNSET,
) -> Policies:
    """A handler's policies: what it gives, the rest from ``defaults`` (see ``Mesh.handler``)."""
    if bulkhead is not None and concurrency is not None and bulkhead.concurrency != concurrency:
        raise ConfigurationError("concurrency", "give concurrency= or bulkhead=, not two different limits")
    d = defaults
    if bulkhead is not None:
        concurrency = bulkhead.concurrency
    return Policies(
        retry=retry if retry is not None else d.retry,
        timeout=d.timeout if isinstance(timeout, Unset) else timeout,
        concurrency=concurrency if concurrency is not None else d.concurrency,
        breaker=d.breaker if isinstance(breaker, Unset) else breaker,
        idempotency=d.idempotency if isinstance(idempotency, Unset) else idempotency,
        unit_of_work=d.unit_of_work if isinstance(unit_of_work, Unset) else unit_of_work,
        max_body_bytes=d.max_body_bytes,
    )
