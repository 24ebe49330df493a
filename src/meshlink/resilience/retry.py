"""Immediate retries in process, on tenacity, steered by the recoverability decision.

tenacity drives the loop (exponential wait plus random jitter, an injectable
sleep so tests move a fake clock instead of waiting); :func:`decide` says
whether a failure is retried now at all. When it says anything else the error
propagates, and the settle stage lowers the same decision to a redelivery or a
dead-letter.
"""

from __future__ import annotations

from datetime import UTC, datetime

import tenacity

from meshlink.context import Context
from meshlink.errors import CircuitOpenError
from meshlink.events import RetryScheduled
from meshlink.message import Message
from meshlink.pipeline import Handler
from meshlink.resilience.deadletter import FIRST_FAILED_AT
from meshlink.resilience.policy import Failure, Retry, RetryNow, decide

__all__ = ["RetryMiddleware", "failure_of", "first_failed_at"]


def first_failed_at(message: Message, default: float) -> float:
    """Wall time of the message's first failure, from its headers (or ``default``)."""
    raw = message.headers.get(FIRST_FAILED_AT)
    if raw:
        try:
            return datetime.fromisoformat(raw).timestamp()
        except ValueError:
            pass
    return default


def retry_now(ctx: Context, error: BaseException, policy: Retry) -> bool:
    """Whether the failed try is retried in process now. Never on an open circuit: the
    message goes back to the broker without spending its budget (see recoverability)."""
    if isinstance(error, CircuitOpenError):
        return False
    return isinstance(decide(failure_of(ctx, error), policy), RetryNow)


def failure_of(ctx: Context, error: BaseException) -> Failure:
    """The :class:`Failure` of the execution ``ctx`` just ran."""
    now = ctx.clock.time()
    if ctx.first_failed_at is None:
        ctx.first_failed_at = first_failed_at(ctx.message, now)
    return Failure(error=error, attempt=ctx.attempt, first_failed_at=ctx.first_failed_at, now=now)


class _RetryIfDecided(tenacity.retry_base):
    """tenacity predicate: retry exactly when the decision is ``RetryNow``."""

    def __init__(self, ctx: Context, policy: Retry) -> None:
        self.ctx = ctx
        self.policy = policy

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        outcome = retry_state.outcome
        if outcome is None or not outcome.failed:
            return False
        error = outcome.exception()
        assert error is not None
        return retry_now(self.ctx, error, self.policy)


class RetryMiddleware:
    """Retry a failed try in process while the policy says ``RetryNow``."""

    def __init__(self, policy: Retry) -> None:
        self.policy = policy
        self._wait = tenacity.wait_exponential(
            multiplier=policy.backoff_s, max=policy.max_backoff_s, exp_base=2
        ) + tenacity.wait_random(0, policy.jitter_s)

    def __call__(self, next_: Handler) -> Handler:
        policy = self.policy
        if policy.attempts == 1:
            return next_
        wait = self._wait

        async def retrying(ctx: Context) -> None:
            # Fast path: most tries succeed, and tenacity costs ~40 µs to set up, so the
            # first try runs bare and tenacity is built only once a retry is due.
            try:
                await next_(ctx)
                return
            except Exception as exc:
                if not retry_now(ctx, exc, policy):
                    raise
                replay = [exc]

            async def attempt(ctx: Context) -> None:
                if replay:  # tenacity's first attempt is the try that already failed
                    raise replay.pop()
                await next_(ctx)

            def before_sleep(state: tenacity.RetryCallState) -> None:
                error = state.outcome.exception() if state.outcome else None
                ctx.emit(
                    RetryScheduled(
                        handler=ctx.handler,
                        message=ctx.message,
                        attempt=ctx.attempt,
                        wait=state.upcoming_sleep,
                        error=error,
                    )
                )
                ctx.attempt += 1

            retrying_ = tenacity.AsyncRetrying(
                sleep=ctx.clock.sleep,
                stop=tenacity.stop_never,  # the decision stops it: the budget lives in `decide`
                wait=wait,
                retry=_RetryIfDecided(ctx, policy),
                before_sleep=before_sleep,
                reraise=True,
            )
            await retrying_(attempt, ctx)

        return retrying

    def __repr__(self) -> str:
        p = self.policy
        return f"Retry({p.attempts} tries x {1 + len(p.delays)} rounds = budget {p.budget})"


def iso(ts: float) -> str:
    """ISO-8601 UTC text of a Unix time."""
    return datetime.fromtimestamp(ts, UTC).isoformat()
