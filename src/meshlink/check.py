"""``meshlink check``: what each handler's policy is, what it becomes on the broker, and
whether the settings contradict each other.

A contradiction is reported as a problem and makes the check fail; a setting that
is legal but likely to surprise is a warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshlink.app import Mesh
from meshlink.dispatch import policy_stack
from meshlink.handler import HandlerSpec
from meshlink.pipeline import Handler
from meshlink.resilience.bulkhead import Bulkhead
from meshlink.resilience.idempotency import MemoryIdempotencyStore
from meshlink.resilience.policy import parse_duration
from meshlink.transport.base import SubscriptionSpec, Transport

__all__ = ["HandlerReport", "check_mesh", "delivery_deadline"]


@dataclass
class HandlerReport:
    """What ``check`` found for one handler."""

    spec: HandlerSpec
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class _Named:
    """Stands for a stage by name (check builds no live breaker)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, next_: Handler) -> Handler:
        return next_

    def __repr__(self) -> str:
        return self.name


def _name(middleware: object) -> str:
    text = repr(middleware)
    if text.startswith("<function "):
        return getattr(middleware, "__qualname__", text)
    return text


def delivery_deadline(transport: Transport) -> tuple[float, str] | None:
    """The longest a handler may hold a message on this broker, and the setting that says so.

    Transports expose it as ``delivery_deadline`` (RabbitMQ's ``consumer_timeout``,
    Kafka's ``max_poll_interval_ms``); ``None`` where nothing limits it. A transport
    may also offer ``check_subscription(spec, budget) -> list[str]`` for broker-specific
    contradictions (a quorum delivery limit below the attempt budget…).
    """
    value = getattr(transport, "delivery_deadline", None)
    return value if isinstance(value, tuple) else None


def check_mesh(mesh: Mesh) -> list[HandlerReport]:
    """Describe every handler's effective policy and find contradictions."""
    reports = []
    deadline = delivery_deadline(mesh.transport)
    for spec in mesh.handlers:
        report = HandlerReport(spec)
        p = spec.policies
        breaker = _Named(f"Breaker({p.breaker.name or spec.name})") if p.breaker is not None else None
        stack = policy_stack(spec, breaker, Bulkhead(spec.concurrency))
        names = ["settle", "decode", *(_name(m) for m in [*mesh.middleware, *spec.middleware, *stack])]
        consumes = f"consumes   {spec.destination} as group {spec.group} (prefetch {spec.prefetch})"
        if spec.batch is not None:
            limits = spec.batch.limits()
            consumes += (
                f", in batches of up to {limits.max_size} (waiting at most {limits.max_wait:g}s), "
                f"{spec.concurrency} at once"
            )
        report.lines += [
            consumes,
            f"stack      {' -> '.join(names)} -> {spec.name}",
            f"retry      {p.retry.describe()}",
            f"redelivers through {spec.retry_destination} (delayed publish on {mesh.transport.describe()})",
            f"dead-letters to {spec.dead_letter}",
        ]
        check_subscription = getattr(mesh.transport, "check_subscription", None)
        if callable(check_subscription):
            spec_for_broker = SubscriptionSpec(
                destination=spec.destination,
                group=spec.group,
                prefetch=spec.prefetch,
                options=spec.options,
            )
            report.problems.extend(check_subscription(spec_for_broker, p.retry.budget))
        timeout = parse_duration(p.timeout, setting="timeout") if p.timeout is not None else None
        # how long one delivery's round of in-process tries can take, if bounded
        held = (
            None
            if timeout is None
            else p.retry.attempts * timeout + (p.retry.attempts - 1) * p.retry.max_backoff_s
        )
        if deadline is not None:
            limit, setting = deadline
            if timeout is None:
                report.warnings.append(
                    f"no timeout: a handler stuck past {setting}={limit:g}s "
                    "loses its message to another consumer"
                )
            elif held is not None and held >= limit:
                report.problems.append(
                    f"one round of {p.retry.attempts} tries can hold a message {held:g}s, "
                    f"beyond the broker's {setting}={limit:g}s: lower the timeout or the tries"
                )
        idem = p.idempotency
        if idem is not None:
            # the claim on a key is held for a delivery's whole round of tries (the
            # idempotency stage is outermost): a lease shorter than that lets a duplicate run
            lease = parse_duration(idem.lease, setting="idempotency.lease")
            if held is None:
                report.warnings.append(
                    f"no timeout: a handler running past idempotency.lease={lease:g}s "
                    "lets a duplicate of its message run beside it"
                )
            elif held >= lease:
                report.problems.append(
                    f"one round of {p.retry.attempts} tries can hold a key {held:g}s, beyond "
                    f"idempotency.lease={lease:g}s: a duplicate could run beside it; "
                    "raise the lease or lower the timeout or the tries"
                )
            ttl = parse_duration(idem.ttl, setting="idempotency.ttl")
            span = sum(p.retry.delays)
            if span >= ttl:
                report.problems.append(
                    f"redeliveries span {span:g}s but processed keys are kept only {ttl:g}s: "
                    "a late duplicate would run again"
                )
            if isinstance(idem.store, MemoryIdempotencyStore) and not mesh.transport.describe().startswith(
                "memory:"
            ):
                report.warnings.append(
                    "the in-memory idempotency store does not see other replicas: use a shared store"
                )
        if p.breaker is not None and timeout is not None:
            reset = parse_duration(p.breaker.reset, setting="breaker.reset")
            if reset < timeout:
                report.warnings.append(
                    f"breaker resets after {reset:g}s, shorter than one try's timeout ({timeout:g}s)"
                )
        reports.append(report)
    return reports
