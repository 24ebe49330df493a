"""The transactional outbox: write messages in the caller's transaction, relay them to the broker.

* :class:`Outbox` — the writer: ``await outbox.publish(session, destination, payload, key=...)``.
* :class:`Relay` — the worker that claims, publishes (with confirmation, per-key
  order) and marks rows sent; embeddable in a :class:`~meshlink.Mesh`
  (:meth:`Relay.attach`) or run as ``meshlink outbox relay``.
* :class:`OutboxStore` — the store contract (see :mod:`meshlink.outbox.store`);
  :class:`MemoryOutboxStore` here, SQL stores in ``meshlink-sqlalchemy``.
"""

from meshlink.outbox.events import (
    OutboxBatchPublished,
    OutboxBrokerUnavailable,
    OutboxRowFailed,
    OutboxRowMovedAside,
    OutboxStoreUnavailable,
)
from meshlink.outbox.memory import MemoryOutboxStore, MemoryStores, MemoryTransaction
from meshlink.outbox.registry import STORES_ENTRY_POINT_GROUP, available_store_schemes, stores_from_url
from meshlink.outbox.relay import Relay, RelayCounters, decode_row
from meshlink.outbox.store import (
    FailedRow,
    OutboxEntry,
    OutboxRow,
    OutboxStats,
    OutboxStore,
    RowFailure,
    Stores,
    Watch,
)
from meshlink.outbox.writer import Outbox

__all__ = [
    "FailedRow",
    "MemoryOutboxStore",
    "MemoryStores",
    "MemoryTransaction",
    "Outbox",
    "OutboxBatchPublished",
    "OutboxBrokerUnavailable",
    "OutboxEntry",
    "OutboxRow",
    "OutboxRowFailed",
    "OutboxRowMovedAside",
    "OutboxStats",
    "OutboxStore",
    "OutboxStoreUnavailable",
    "Relay",
    "RelayCounters",
    "RowFailure",
    "STORES_ENTRY_POINT_GROUP",
    "Stores",
    "Watch",
    "available_store_schemes",
    "decode_row",
    "stores_from_url",
]
