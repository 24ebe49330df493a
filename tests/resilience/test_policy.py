"""The recoverability decision is a pure function of the failure and the policy."""

from __future__ import annotations

import pytest

from meshlink import ConfigurationError, DecodeError, Reject, RetryLater
from meshlink.resilience.policy import (
    DeadLetterNow,
    Failure,
    Redeliver,
    Retry,
    RetryNow,
    decide,
    parse_duration,
)


def fail(attempt: int, error: BaseException | None = None, *, first: float = 0, now: float = 0) -> Failure:
    return Failure(error=error or RuntimeError("db down"), attempt=attempt, first_failed_at=first, now=now)


def test_schedule_is_immediate_tries_then_redeliveries_then_dead_letter() -> None:
    policy = Retry(attempts=3, backoff=0.5, max_backoff=0.75, redeliver=("5s", "1m"))
    assert policy.budget == 9
    actions = [decide(fail(n), policy) for n in range(1, 10)]
    assert actions[:8] == [
        RetryNow(0.5),
        RetryNow(0.75),  # doubled, capped by max_backoff
        Redeliver(5.0),
        RetryNow(0.5),
        RetryNow(0.75),
        Redeliver(60.0),
        RetryNow(0.5),
        RetryNow(0.75),
    ]
    assert isinstance(actions[8], DeadLetterNow)
    assert "budget of 9 exhausted" in actions[8].reason


@pytest.mark.parametrize(
    "error",
    [DecodeError("bad body"), Reject("blocked"), ValueError("refused")],
)
def test_permanent_errors_are_dead_lettered_at_once(error: BaseException) -> None:
    policy = Retry(permanent=(ValueError,))
    action = decide(fail(1, error), policy)
    assert isinstance(action, DeadLetterNow)
    assert action.reason.startswith("permanent error")


def test_only_configured_transient_types_are_retried() -> None:
    policy = Retry(transient=(ConnectionError,))
    assert isinstance(decide(fail(1, ConnectionError()), policy), RetryNow)
    assert isinstance(decide(fail(1, KeyError("x")), policy), DeadLetterNow)


def test_retry_later_redelivers_after_the_asked_delay_within_the_budget() -> None:
    policy = Retry(attempts=2, redeliver=("1s",))
    assert decide(fail(1, RetryLater(after=42)), policy) == Redeliver(42)
    assert isinstance(decide(fail(4, RetryLater(after=42)), policy), DeadLetterNow)


def test_time_budget_counts_from_the_first_failure() -> None:
    policy = Retry(max_elapsed="10m")
    assert isinstance(decide(fail(1, first=0, now=599), policy), RetryNow)
    assert isinstance(decide(fail(1, first=0, now=600), policy), DeadLetterNow)


def test_no_retry_policy_dead_letters_the_first_failure() -> None:
    assert isinstance(decide(fail(1), Retry.none()), DeadLetterNow)


def test_durations_and_bad_settings_name_the_setting() -> None:
    assert parse_duration("250ms", setting="x") == 0.25
    assert parse_duration("2m", setting="x") == 120
    assert parse_duration(1.5, setting="x") == 1.5
    with pytest.raises(ConfigurationError, match=r"retry\.redeliver"):
        Retry(redeliver=("soon",))
    with pytest.raises(ConfigurationError, match=r"retry\.attempts"):
        Retry(attempts=0)
