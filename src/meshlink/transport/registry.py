"""Find a transport by URL scheme through the ``meshlink.transports`` entry-point group.

A distribution registers a factory (usually the transport class) per scheme::

    [project.entry-points."meshlink.transports"]
    amqp = "meshlink_rabbitmq:RabbitTransport"

Core registers ``memory`` the same way, so the discovery path is always exercised.
"""

from __future__ import annotations

from typing import Any

from meshlink import plugins
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


def available_schemes() -> list[str]:
    """The URL schemes of every installed transport, sorted."""
    return plugins.schemes(ENTRY_POINT_GROUP)


def transport_from_url(url: str, **options: Any) -> Transport:
    """Build (not connect) the transport registered for ``url``'s scheme.

    Raises:
        ConfigurationError: ``url`` has no scheme, or no installed transport serves it.
    """
    transport: Transport = plugins.from_url(ENTRY_POINT_GROUP, url, setting="url", hints=_HINTS, **options)
    return transport
