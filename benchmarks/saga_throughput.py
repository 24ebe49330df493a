"""Sagas per second: a three-step checkout saga with three participant services.

    python benchmarks/saga_throughput.py [N] [--starters K]
        (MESHLINK_URL selects the broker, MESHLINK_SAGA_STORE the database; SQLite by default)

Sagas are started by K concurrent tasks (default 100, like a service's request
handlers; ``--starters 1`` starts them one after another, each ``start`` awaiting
its first save). Prints sagas/s and CPU ms per saga (coordinator and participants
in this one process, so the CPU figure is the whole system's).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))

from meshlink.logs import configure
from meshlink.saga import SagaStatus, SagaStepChanged


async def run(n: int, starters: int) -> None:
    example = importlib.import_module("03_checkout_saga")
    for handler in (example.reserve, example.release, example.charge, example.refund, example.schedule):
        handler.__globals__["print"] = lambda *a, **k: None  # silence the example's narration
    await example.stores.init()
    finished = 0
    done = asyncio.Event()

    def on_event(event: object) -> None:
        nonlocal finished
        if isinstance(event, SagaStepChanged) and event.status in ("completed", "compensated", "failed"):
            finished += 1
            if finished == n:
                done.set()

    example.orders.add_listener(on_event)
    services = [example.inventory, example.payment, example.shipping, example.orders]
    for mesh in services:
        await mesh.start()
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        orders = iter(range(n))

        async def starter() -> None:
            for i in orders:
                amount = 250.0 if i % 10 == 0 else 25.0  # one in ten is declined and compensates
                order = example.Order(order_id=f"B-{i}", amount=amount)
                await example.coordinator.start(example.checkout, order)

        await asyncio.gather(*(starter() for _ in range(starters)))
        await asyncio.wait_for(done.wait(), 600)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        for mesh in reversed(services):
            await mesh.stop()
    statuses = [i.status for i in await example.coordinator.store.find(limit=n)]
    store = example.stores.engine.url.render_as_string(hide_password=True)
    print(f"{n} checkout sagas (3 remote steps, 10% compensated) on {example.orders.transport.describe()}")
    print(f"  started by {starters} concurrent task(s)")
    print(f"  saga state and commands in {store} (outbox + relay)")
    print(f"  {n / wall:,.0f} sagas/s   {cpu / n * 1e3:.2f} CPU ms/saga")
    completed, compensated = statuses.count(SagaStatus.COMPLETED), statuses.count(SagaStatus.COMPENSATED)
    print(f"  completed {completed}, compensated {compensated}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("n", nargs="?", type=int, default=2000)
    parser.add_argument("--starters", type=int, default=100, help="concurrent tasks starting sagas")
    args = parser.parse_args()
    configure("CRITICAL")
    asyncio.run(run(args.n, max(1, args.starters)))


if __name__ == "__main__":
    main()
