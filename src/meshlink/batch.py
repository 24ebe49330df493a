"""Batch handlers: one call handles a list of messages.

::

    @mesh.handler("orders.placed", batch=Batch(max_size=500, max_wait="50ms"))
    async def store(orders: list[OrderPlaced], ctx: BatchContext) -> None:
        await db.insert_many(orders)

What a batch is: up to ``max_size`` messages of one subscription, in broker
order, gathered for at most ``max_wait`` (Kafka hands over what one partition
has fetched, at once). Messages of one key keep their order within a batch
and across batches.

The policies act on the whole batch: one timeout per try, one breaker outcome,
the bulkhead counts batches, and an immediate retry runs the whole batch
again. A body that cannot be decoded is dead-lettered on its own and the rest
of the batch runs. When the batch fails for good, every message in it is
settled by the handler's retry policy on its own budget: redelivered through
the retry destination (and batched again there) or dead-lettered with the
failure headers, like a message of a single-message handler.
Not available on batch handlers: an idempotency store and a unit of work
(both work per message), refused at registration.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshlink.context import Context
from meshlink.message import Message
from meshlink.resilience.policy import parse_duration
from meshlink.transport.base import Delivery
from meshlink.transport.batching import BatchLimits

if TYPE_CHECKING:
    from meshlink.app import Mesh

__all__ = ["Batch", "BatchContext"]


@dataclass(frozen=True, kw_only=True)
class Batch:
    """How a batch handler's batches are formed.

    Args:
        max_size: most messages per call.
        max_wait: longest a message waits for its batch to fill (``"50ms"``, ``0.05``);
            ``0`` hands over whatever has arrived.
    """

    max_size: int = 100
    max_wait: float | str = 0.05

    def limits(self) -> BatchLimits:
        """The transport-level limits (validated: a bad value names its setting)."""
        return BatchLimits(self.max_size, parse_duration(self.max_wait, setting="batch.max_wait"))

    def __post_init__(self) -> None:
        self.limits()


class BatchContext(Context):
    """What a batch handler knows about its batch (its optional second argument).

    ``message`` and ``delivery`` are the batch's first; ``payload`` is the list of
    decoded payloads, in the order of :attr:`deliveries`. :meth:`publish` and
    :meth:`reply` carry the first message's correlation.
    """

    __slots__ = ("deliveries",)

    def __init__(self, mesh: Mesh, deliveries: Sequence[Delivery], handler: str, attempt: int) -> None:
        super().__init__(mesh, deliveries[0], handler)
        self.deliveries: list[Delivery] = list(deliveries)
        """The deliveries whose payloads the handler receives (settled by the mesh)."""
        self.attempt = attempt

    @property
    def messages(self) -> list[Message]:
        """The envelopes of the batch, in the order of the payloads."""
        return [d.message for d in self.deliveries]

    @property
    def size(self) -> int:
        """How many messages the handler receives."""
        return len(self.deliveries)

    def __repr__(self) -> str:
        return f"BatchContext(handler={self.handler!r}, size={self.size}, attempt={self.attempt})"


def payload_item_type(annotation: Any) -> Any | None:
    """``T`` of ``list[T]`` / ``Sequence[T]``, or ``None`` if ``annotation`` is not one."""
    origin = typing.get_origin(annotation)
    if origin in (list, Sequence):  # typing.Sequence[T] has the same origin
        args = typing.get_args(annotation)
        return args[0] if args else None
    return None
