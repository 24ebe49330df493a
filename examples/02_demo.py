"""`make demo`: a small billing service that handles orders, replies, and shows failures.

Runs on memory:// by default; set MESHLINK_URL (e.g. amqp://guest:guest@localhost/)
to run the very same code on a broker.
"""

from __future__ import annotations

import asyncio
import os

from pydantic import BaseModel, PositiveFloat

from meshlink import Context, Event, Mesh, Reject
from meshlink.events import HandlerFailed, MessageDeadLettered, MessageHandled, MessagePublished
from meshlink.logs import configure
from meshlink.testing import MeshHarness


class OrderPlaced(BaseModel):
    order_id: str
    amount: PositiveFloat


class PaymentCaptured(BaseModel):
    order_id: str
    amount: float


mesh = Mesh(os.environ.get("MESHLINK_URL", "memory://demo"), service="billing")


@mesh.handler("orders.placed")
async def charge(order: OrderPlaced, ctx: Context) -> None:
    if order.order_id == "o-3":
        raise Reject("card declined")
    await ctx.publish("payments.captured", PaymentCaptured(order_id=order.order_id, amount=order.amount))


@mesh.handler("payments.captured", group="shipping")
async def ship(payment: PaymentCaptured) -> None:
    pass


def narrate(event: Event) -> None:
    """A listener: one readable line per thing that happened."""
    if isinstance(event, MessagePublished):
        print(f"  published  {event.message.type or 'message':<16} to {event.destination}")
    elif isinstance(event, MessageHandled):
        print(f"  handled    {event.message.type:<16} by {event.handler}: {event.payload!r}")
    elif isinstance(event, HandlerFailed):
        print(f"  FAILED     {event.message.type:<16} in {event.handler}: {event.error}")
    elif isinstance(event, MessageDeadLettered):
        print(f"  parked     {event.message.type:<16} in {event.dead_letter_destination}")


async def main() -> None:
    configure("CRITICAL")  # the narration below replaces the service's own log lines
    mesh.add_listener(narrate)
    print(f"billing service on {mesh.transport.describe()}")
    async with MeshHarness(mesh, timeout=30) as h:
        await h.publish("orders.placed", OrderPlaced(order_id="o-1", amount=30))
        await h.publish("orders.placed", OrderPlaced(order_id="o-2", amount=12.5))
        await h.publish("orders.placed", OrderPlaced(order_id="o-3", amount=99))
        await h.publish("orders.placed", {"order_id": "o-4", "amount": -5}, type="OrderPlaced")
        await h.wait_for(lambda h: len(h.handled) + len(h.dead_lettered) == 6)
    print(
        f"done: {len(h.handled)} handled, {len(h.failed)} failed, "
        f"{len(h.dead_lettered)} dead-lettered with their reasons in x-meshlink-* headers"
    )


if __name__ == "__main__":
    asyncio.run(main())
