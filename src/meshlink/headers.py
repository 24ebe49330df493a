"""The names of the envelope's wire headers (DESIGN §3): CloudEvents binary-mode attributes
and meshlink's own. :mod:`meshlink.message` re-exports them."""

from __future__ import annotations

__all__ = [
    "CE_ID",
    "CE_SOURCE",
    "CE_SPECVERSION",
    "CE_TIME",
    "CE_TYPE",
    "CONTENT_TYPE",
    "FAILURE_PREFIX",
    "H_ATTEMPT",
    "H_CAUSATION_ID",
    "H_CORRELATION_ID",
    "H_IDEMPOTENCY_KEY",
    "REPLY_ECHO",
    "REPLY_TO",
    "RESERVED_HEADERS",
]

CE_SPECVERSION = "ce_specversion"
CE_ID = "ce_id"
CE_TYPE = "ce_type"
CE_SOURCE = "ce_source"
CE_TIME = "ce_time"
CONTENT_TYPE = "content-type"
H_CORRELATION_ID = "correlation-id"
H_CAUSATION_ID = "causation-id"
H_IDEMPOTENCY_KEY = "idempotency-key"
H_ATTEMPT = "attempt"
FAILURE_PREFIX = "x-meshlink-"
REPLY_TO = "reply-to"
"""Where a reply to this message should go (see ``Context.reply``)."""
REPLY_ECHO = "reply-echo"
"""Comma-separated header names a reply must carry back."""
#: Header names a user may not set through ``headers=``: they are envelope fields.
RESERVED_HEADERS = frozenset(
    {
        CE_SPECVERSION,
        CE_ID,
        CE_TYPE,
        CE_SOURCE,
        CE_TIME,
        CONTENT_TYPE,
        H_CORRELATION_ID,
        H_CAUSATION_ID,
        H_IDEMPOTENCY_KEY,
        H_ATTEMPT,
    }
)
