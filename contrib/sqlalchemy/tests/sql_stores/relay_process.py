"""A relay run as a child process by the SIGKILL test.

It prints ``PUBLISHED <n>`` once the broker has confirmed its first batch and
then blocks before marking the rows sent, so the test kills it at exactly that
point (on progress, never on wall time).

Usage: python relay_process.py STORE_URL BROKER_URL BATCH_SIZE
"""

from __future__ import annotations

import asyncio
import sys
import time

from meshlink.events import Event
from meshlink.outbox import OutboxBatchPublished, Relay, stores_from_url
from meshlink.transport.registry import transport_from_url


async def main(store_url: str, broker_url: str, batch_size: int) -> None:
    stores = stores_from_url(store_url)
    transport = transport_from_url(broker_url)
    await transport.connect()

    def at_fault_point(event: Event) -> None:
        if isinstance(event, OutboxBatchPublished):
            print(f"PUBLISHED {len(event.ids)}", flush=True)
            time.sleep(3600)  # blocks the loop: the rows are confirmed but never marked sent

    relay = Relay(stores.outbox, transport, batch_size=batch_size, lease="2s", emit=at_fault_point)
    await relay.start()
    print("STARTED", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
