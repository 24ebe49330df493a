"""SQL stores for meshlink on SQLAlchemy 2 async Core: outbox, inbox and saga state.

* :class:`SqlStores` — the family on one database, from a URL (also found through
  the ``meshlink.stores`` entry points ``sqlite+aiosqlite`` and ``postgresql+asyncpg``);
* :class:`SqlOutboxStore` — the outbox (PostgreSQL: ``FOR UPDATE SKIP LOCKED``
  claims by several relays, ``LISTEN/NOTIFY``; SQLite: one relay, polling);
* :class:`SqlInbox` — idempotency keys, and :class:`UnitOfWork`, the middleware
  that puts the inbox record, the handler's writes and its outgoing messages in
  one transaction;
* :class:`SqlSagaStore` — versioned saga state with history, and
  :class:`SqlSagaInstanceStore`, the saga coordinator's store on it (state and
  commands in one transaction, through the outbox);
* :data:`metadata` / :func:`build_tables` — the tables, for Alembic.
"""

from meshlink_sqlalchemy.engine import is_connection_error, make_engine, with_retry
from meshlink_sqlalchemy.inbox import SqlInbox
from meshlink_sqlalchemy.outbox import SqlOutboxStore
from meshlink_sqlalchemy.saga import SagaHistoryEntry, SagaState, SqlSagaStore, StaleSagaError
from meshlink_sqlalchemy.saga_instances import SqlSagaInstanceStore
from meshlink_sqlalchemy.stores import SqlStores
from meshlink_sqlalchemy.tables import DEFAULT_PREFIX, Tables, build_tables, metadata
from meshlink_sqlalchemy.unit_of_work import UnitOfWork

__all__ = [
    "DEFAULT_PREFIX",
    "SagaHistoryEntry",
    "SagaState",
    "SqlInbox",
    "SqlOutboxStore",
    "SqlSagaInstanceStore",
    "SqlSagaStore",
    "SqlStores",
    "StaleSagaError",
    "Tables",
    "UnitOfWork",
    "build_tables",
    "is_connection_error",
    "make_engine",
    "metadata",
    "with_retry",
]
