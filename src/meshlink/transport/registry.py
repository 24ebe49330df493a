"""Find a transport by URL scheme through the ``meshlink.transports`` entry-point group.

A distribution registers a factory (usually the transport class) per scheme::

    [project.entry-points."meshlink.transports"]
    amqp = "meshlink_rabbitmq:RabbitTransport"

Core registers ``memory`` the same way, so the discovery path is always exercised.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any
from urllib.parse import urlsplit

from meshlink.errors import ConfigurationError
from meshlink.transport.base import Transport

__all__ = ["ENTRY_POINT_GROUP", "available_schemes", "transport_from_url"]

ENTRY_POINT_GROUP = "meshlink.transports"
#: Distributions to suggest when a well-known scheme is not installed.
_HINTS = {
    "amqp": "meshlink-rabbitmq",
    "amqps": "meshlink-rabbitmq",
    "kafka": "meshlink-kafka",
    "kafka+ssl": "meshlink-kafka",
}


@cache
def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_schemes() -> list[str]:
    """The URL schemes of every installed transport, sorted."""
    return sorted(_entry_points())


def transport_from_url(url: str, **options: Any) -> Transport:
    """Build (not connect) the transport registered for ``url``'s scheme.

    Raises:
        ConfigurationError: ``url`` has no scheme, or no installed transport serves it.
    """
    scheme = urlsplit(url).scheme
    if not scheme:
        raise ConfigurationError("url", "a broker URL needs a scheme, e.g. memory:// or amqp://")
    ep = _entry_points().get(scheme)
    if ep is None:
        hint = f"; install {_HINTS[scheme]}" if scheme in _HINTS else ""
        raise ConfigurationError(
            "url",
            f"no transport for scheme {scheme!r}{hint} (installed: {', '.join(available_schemes())})",
        )
    factory: Callable[..., Transport] = ep.load()
    return factory(url, **options)
