"""Logging: structlog everywhere, and no credential in any log line.

meshlink only *uses* structlog (``structlog.get_logger("meshlink...")``); the
application decides how logs are rendered. :func:`configure` is a sensible
default for ``meshlink run`` and examples. Whatever the configuration, broker
URLs are logged only through :func:`redact_url`, and :func:`redact_processor`
(installed by :func:`configure`) scrubs any ``user:password@`` left in a value.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import structlog

__all__ = ["configure", "redact_processor", "redact_url"]

_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@")


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (user name kept)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username}:***@{host}" if parts.username else f"***@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def _scrub(value: str) -> str:
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", value)


def redact_processor(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: scrub ``scheme://user:password@`` from every string value."""
    del logger, method_name
    for key, value in event_dict.items():
        if isinstance(value, str) and "://" in value:
            event_dict[key] = _scrub(value)
    return event_dict


def configure(level: str = "INFO", *, json: bool = False) -> None:
    """Configure structlog for a meshlink process (console or JSON lines on stderr)."""
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,  # True would pin loggers to the first configuration
    )
