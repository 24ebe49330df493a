"""Quickstart: one handler, one publish, on memory:// (set MESHLINK_URL to use a broker)."""

import asyncio
import os

from pydantic import BaseModel

from meshlink import Context, Mesh


class OrderPlaced(BaseModel):
    order_id: str
    amount: float


mesh = Mesh(os.environ.get("MESHLINK_URL", "memory://"), service="billing")
done = asyncio.Event()


@mesh.handler("orders.placed")
async def charge(event: OrderPlaced, ctx: Context) -> None:
    print(f"charging {event.amount:.2f} for order {event.order_id}")
    await ctx.publish("payments.captured", {"order_id": event.order_id})


@mesh.handler("payments.captured", group="shipping")
async def ship(payment: dict[str, str]) -> None:
    print(f"shipping order {payment['order_id']}")
    done.set()


async def main() -> None:
    async with mesh:
        await mesh.publish("orders.placed", OrderPlaced(order_id="o-1", amount=42.0))
        await asyncio.wait_for(done.wait(), timeout=30)


if __name__ == "__main__":
    asyncio.run(main())
