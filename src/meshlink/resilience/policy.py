"""The retry policy and the recoverability decision.

One :class:`Retry` policy describes the whole schedule of a handler's failures:
``attempts`` tries in process per round (with exponential backoff and jitter),
then a new round after each ``redeliver`` delay through the broker, then the
dead-letter destination. The ``attempt`` header counts handler executions
across every round, every replica and every restart, so the budget is
``attempts * (1 + len(redeliver))`` executions — one number, never multiplied by
a hidden layer.

:func:`decide` is a pure function of the failure (error, attempt, first-failure
time) and the policy to one :class:`Action`; it is tested without a broker, and
the mesh lowers its answer to the transport (``RetryNow`` stays in process,
``Redeliver`` is a delayed publish to the group's retry destination,
``DeadLetter`` a confirmed publish to the dead-letter destination).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from meshlink.errors import (
    ConfigurationError,
    DuplicateInProgressError,
    HandlerTimeoutError,
    RetryLater,
    is_retryable,
)

__all__ = [
    "Action",
    "DeadLetterNow",
    "Failure",
    "Redeliver",
    "Retry",
    "RetryNow",
    "decide",
    "parse_duration",
]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(value: float | str, *, setting: str) -> float:
    """Seconds from ``1.5``, ``"500ms"``, ``"5s"``, ``"1m"``, ``"2h"``; a bad value names ``setting``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ConfigurationError(setting, f"not a duration: {value!r} (try 1.5, '500ms', '5s', '1m')")
        seconds = float(match[1]) * _UNITS[match[2] or "s"]
    if seconds < 0:
        raise ConfigurationError(setting, f"must be >= 0, got {value!r}")
    return seconds


@dataclass(frozen=True, kw_only=True)
class Retry:
    """How a handler's failures are retried. Defaults: 3 tries, then 3 redeliveries, then DLQ."""

    attempts: int = 3
    """Tries per round, in process (1 = no immediate retry)."""
    backoff: float | str = 0.1
    """Wait before the first immediate retry; doubles each retry (exponential)."""
    max_backoff: float | str = 5.0
    """Longest wait between immediate retries."""
    jitter: float | str = 0.1
    """Up to this many seconds of random jitter added to each immediate wait."""
    redeliver: Sequence[float | str] = ("5s", "30s", "2m")
    """Delays of the broker redelivery rounds after a round of immediate tries failed."""
    max_elapsed: float | str | None = None
    """Give up (dead-letter) once this long has passed since the first failure."""
    permanent: tuple[type[BaseException], ...] = ()
    """Exception types never retried (besides meshlink's own non-retryable ones)."""
    transient: tuple[type[BaseException], ...] = (Exception,)
    """Exception types that are retried; anything else is permanent."""
    _delays: tuple[float, ...] = field(init=False, repr=False)
    _limits: tuple[float, float, float, float | None] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigurationError("retry.attempts", f"must be >= 1, got {self.attempts}")
        delays = tuple(parse_duration(d, setting="retry.redeliver") for d in self.redeliver)
        object.__setattr__(self, "_delays", delays)
        elapsed = (
            None
            if self.max_elapsed is None
            else parse_duration(self.max_elapsed, setting="retry.max_elapsed")
        )
        limits = (
            parse_duration(self.backoff, setting="retry.backoff"),
            parse_duration(self.max_backoff, setting="retry.max_backoff"),
            parse_duration(self.jitter, setting="retry.jitter"),
            elapsed,
        )
        object.__setattr__(self, "_limits", limits)

    @classmethod
    def none(cls) -> Retry:
        """No retries at all: the first failure is dead-lettered."""
        return cls(attempts=1, redeliver=())

    @property
    def delays(self) -> tuple[float, ...]:
        """Redelivery delays in seconds."""
        return self._delays

    @property
    def backoff_s(self) -> float:
        return self._limits[0]

    @property
    def max_backoff_s(self) -> float:
        return self._limits[1]

    @property
    def jitter_s(self) -> float:
        return self._limits[2]

    @property
    def max_elapsed_s(self) -> float | None:
        return self._limits[3]

    @property
    def budget(self) -> int:
        """Most handler executions a message gets before it is dead-lettered."""
        return self.attempts * (1 + len(self._delays))

    def is_transient(self, error: BaseException) -> bool:
        """Whether retrying could help with ``error`` under this policy."""
        if not is_retryable(error) or isinstance(error, self.permanent):
            return False
        # meshlink's own transient outcomes stay transient whatever ``transient`` lists: the
        # user's types narrow what *their* handler raises, not what the policies raise
        return isinstance(error, (*self.transient, *_ALWAYS_TRANSIENT))

    def describe(self) -> str:
        """One line for ``meshlink check``."""
        rounds = ", ".join(f"{d:g}s" for d in self._delays) or "none"
        return (
            f"{self.attempts} tries per round (backoff {self.backoff_s:g}s x2 up to {self.max_backoff_s:g}s, "
            f"jitter {self.jitter_s:g}s), redeliveries after {rounds}; budget {self.budget} executions"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Failure:
    """What is known about one failed execution."""

    error: BaseException
    attempt: int
    """The execution that failed (1-based, across all rounds)."""
    first_failed_at: float
    """Wall time of the first failure of this message (from its headers, or now)."""
    now: float


@dataclass(frozen=True, slots=True)
class RetryNow:
    """Try again in process after ``wait`` seconds."""

    wait: float


@dataclass(frozen=True, slots=True)
class Redeliver:
    """Hand the message back to the broker, deliverable again after ``delay`` seconds."""

    delay: float
    spend: bool = True
    """Whether the redelivered copy counts as a new attempt (a duplicate that waited for its
    twin never ran the handler: it spends nothing)."""


@dataclass(frozen=True, slots=True)
class DeadLetterNow:
    """Move the message to the dead-letter destination with ``reason``."""

    reason: str


Action = RetryNow | Redeliver | DeadLetterNow


def decide(failure: Failure, policy: Retry) -> Action:
    """The recoverability decision: a pure function of the failure and the policy.

    The wait of a :class:`RetryNow` is the backoff without jitter (the retry
    layer adds jitter), so the decision is deterministic.
    """
    error = failure.error
    if isinstance(error, DuplicateInProgressError) and not isinstance(error, policy.permanent):
        # the handler did not run: wait for the twin without spending the budget (bounded
        # by the claim's lease, after which the key is free or done)
        return Redeliver(policy.delays[0] if policy.delays else _DUPLICATE_WAIT, spend=False)
    if not policy.is_transient(error):
        return DeadLetterNow(f"permanent error: {error}" if str(error) else type(error).__name__)
    limit = policy.max_elapsed_s
    if limit is not None and failure.now - failure.first_failed_at >= limit:
        return DeadLetterNow(f"gave up after {limit:g}s: {error}")
    if failure.attempt >= policy.budget:
        return DeadLetterNow(f"attempt budget of {policy.budget} exhausted: {error}")
    if isinstance(error, RetryLater):
        return Redeliver(error.after)
    try_in_round = (failure.attempt - 1) % policy.attempts + 1
    if try_in_round < policy.attempts:
        wait = min(policy.max_backoff_s, policy.backoff_s * 2 ** (try_in_round - 1))
        return RetryNow(wait)
    round_done = (failure.attempt - 1) // policy.attempts
    return Redeliver(policy.delays[round_done])


_ALWAYS_TRANSIENT = (RetryLater, HandlerTimeoutError, DuplicateInProgressError)
#: Seconds a duplicate waits for its twin when the policy has no redelivery delays.
_DUPLICATE_WAIT = 1.0
