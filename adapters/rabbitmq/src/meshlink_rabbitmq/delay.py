"""Delayed delivery on a stock RabbitMQ (no delayed-message plugin).

The route of a message published with ``delay=s``::

    publish ──► <prefix>           headers exchange; matches header meshlink-delay = <ms>
            ──► <prefix>.<ms>      durable classic queue, x-message-ttl = <ms>, no consumer
    (expiry) ─► <prefix>.return    headers exchange (the queue's dead-letter exchange);
                                   matches header meshlink-delay-destination = <destination>
            ──► <destination>      the destination's own exchange (exchange-to-exchange
                                   binding), routed by the original routing key (the key)

One TTL queue per distinct delay serves every destination, and every message in
it has the same TTL, so it expires strictly in arrival order (per-message TTLs in
one queue would block behind a longer head). Header names do not start with
``x-``: a headers exchange ignores those when matching.

Never early: the delay is rounded *up* to whole milliseconds, then up to
``delay_digits`` significant digits (so a handful of queues serve any set of
delays, each at most 1% late with the default of 3 digits), after adding
``delay_pad`` for the publish round trip (the TTL starts when the broker
enqueues, shortly before the confirm reaches the caller).
"""

from __future__ import annotations

import math
from typing import Any

from meshlink_rabbitmq.settings import RabbitSettings

__all__ = ["H_DELAY", "H_DELAY_DESTINATION", "delay_ms", "delay_queue_arguments"]

H_DELAY = "meshlink-delay"
"""Header carrying the delay in ms; routes the message into its TTL queue."""
H_DELAY_DESTINATION = "meshlink-delay-destination"
"""Header carrying the destination the message returns to after its delay."""


def delay_ms(delay: float, settings: RabbitSettings) -> int:
    """The TTL, in ms, that delivers no earlier than ``delay`` seconds from now."""
    ms = max(1, math.ceil((delay + settings.delay_pad) * 1000))
    step = 10 ** max(0, len(str(ms)) - settings.delay_digits)
    rounded: int = -(-ms // step) * step
    return rounded


def entry_exchange(settings: RabbitSettings) -> str:
    """The exchange delayed messages are published to."""
    return settings.delay_prefix


def return_exchange(settings: RabbitSettings) -> str:
    """The exchange expired messages are dead-lettered to."""
    return f"{settings.delay_prefix}.return"


def queue_name(ms: int, settings: RabbitSettings) -> str:
    """The TTL queue of one delay."""
    return f"{settings.delay_prefix}.{ms}"


def delay_queue_arguments(ms: int, settings: RabbitSettings) -> dict[str, Any]:
    """Arguments of the TTL queue for ``ms``."""
    return {"x-message-ttl": ms, "x-dead-letter-exchange": return_exchange(settings)}
