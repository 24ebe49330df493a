"""Dead-lettering: move a failed message aside with the reason in its headers.

The dead-lettered copy keeps the original id, body, key and envelope, and adds
the failure headers below, so that ``meshlink dlq`` (or any tool reading the
broker) can tell what failed, where and how often, and replay it unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from meshlink.message import FAILURE_PREFIX, Message

__all__ = [
    "ERROR_MESSAGE",
    "ERROR_TYPE",
    "FAILED_ATTEMPTS",
    "FIRST_FAILED_AT",
    "HANDLER",
    "LAST_FAILED_AT",
    "ORIGINAL_DESTINATION",
    "ORIGINAL_GROUP",
    "DeadLetter",
    "failure_headers",
    "original_location",
]

ERROR_TYPE = FAILURE_PREFIX + "error-type"
ERROR_MESSAGE = FAILURE_PREFIX + "error-message"
HANDLER = FAILURE_PREFIX + "handler"
FAILED_ATTEMPTS = FAILURE_PREFIX + "attempts"
FIRST_FAILED_AT = FAILURE_PREFIX + "first-failed-at"
LAST_FAILED_AT = FAILURE_PREFIX + "last-failed-at"
ORIGINAL_DESTINATION = FAILURE_PREFIX + "original-destination"
ORIGINAL_GROUP = FAILURE_PREFIX + "original-group"
_MAX_ERROR_TEXT = 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter:
    """Where and why a message is dead-lettered."""

    destination: str
    """The dead-letter destination."""
    reason: str
    """Human-readable reason (the error text)."""


def original_location(message: Message, location: Mapping[str, str]) -> dict[str, str]:
    """``x-meshlink-original-<name>`` headers for where ``message`` was first consumed.

    A redelivered copy already carries them (from its first delivery): those are kept,
    so that a dead-letter after redeliveries names the original topic, partition and
    offset rather than the retry copy's.
    """
    return {
        name: message.headers.get(name, value)
        for name, value in ((f"{FAILURE_PREFIX}original-{k}", v) for k, v in location.items())
    }


def failure_headers(
    message: Message,
    *,
    error: BaseException,
    handler: str,
    destination: str,
    group: str,
    location: Mapping[str, str],
    attempts: int | None = None,
    now: datetime | None = None,
    first_failed_at: str | None = None,
) -> dict[str, str]:
    """The ``x-meshlink-*`` headers describing why ``message`` failed.

    ``first-failed-at`` is kept from an earlier failure if the message carries one,
    else ``first_failed_at`` (the first failure of this delivery's in-process
    retries), else now: so the time budget spans every layer and replica.
    """
    when = (now or datetime.now(UTC)).isoformat()
    text = str(error) or type(error).__name__
    headers = {
        ERROR_TYPE: f"{type(error).__module__}.{type(error).__qualname__}",
        ERROR_MESSAGE: text[:_MAX_ERROR_TEXT],
        HANDLER: handler,
        FAILED_ATTEMPTS: str(attempts if attempts is not None else message.attempt),
        FIRST_FAILED_AT: message.headers.get(FIRST_FAILED_AT) or first_failed_at or when,
        LAST_FAILED_AT: when,
        ORIGINAL_DESTINATION: destination,
        ORIGINAL_GROUP: group,
    }
    headers.update(original_location(message, location))
    return headers
