"""The tables, as SQLAlchemy ``MetaData``: put them in your own Alembic migrations, or ``meshlink db init``.

:func:`build_tables` makes one set under a name prefix (``meshlink_`` by default)
and an optional schema; :data:`metadata` is the default set. Times are Unix
seconds (double precision) written from the callers' clocks.

* ``<prefix>outbox`` — messages waiting to be (or recently) published; a key's
  order is the order of ``id``. Partial indexes keep the unsent rows cheap to scan
  however many sent rows are retained.
* ``<prefix>outbox_failed`` — rows moved aside after their attempt budget, with the reason.
* ``<prefix>inbox`` — processed (``done``) and in-progress (``pending``) idempotency keys.
* ``<prefix>saga`` / ``<prefix>saga_history`` — saga state (versioned) and its history.

On PostgreSQL the outbox gets a statement-level trigger that runs
``pg_notify('<prefix>outbox', '')`` after inserts; notifications are delivered
at commit (never for a rolled-back transaction) and collapse within one
transaction, so relays wake up once per committing writer.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import (
    DDL,
    BigInteger,
    Column,
    Double,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    event,
    text,
)

__all__ = ["DEFAULT_PREFIX", "Tables", "build_tables", "metadata"]

DEFAULT_PREFIX = "meshlink_"
_Id = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER PRIMARY KEY only


@dataclass(frozen=True)
class Tables:
    """One set of meshlink tables."""

    metadata: MetaData
    outbox: Table
    outbox_failed: Table
    inbox: Table
    saga: Table
    saga_history: Table
    prefix: str
    schema: str | None

    @property
    def channel(self) -> str:
        """The PostgreSQL notification channel of the outbox."""
        return f"{self.prefix}outbox"


def build_tables(prefix: str = DEFAULT_PREFIX, *, schema: str | None = None) -> Tables:
    """Define the tables under ``prefix`` (and ``schema``) in a new ``MetaData``."""
    if not prefix.replace("_", "").isalnum():
        raise ValueError(f"table prefix must be letters, digits and underscores, got {prefix!r}")
    md = MetaData(schema=schema)
    p = prefix
    unsent = text("sent_at IS NULL")
    outbox = Table(
        f"{p}outbox",
        md,
        Column("id", _Id, primary_key=True, autoincrement=True),
        Column("destination", String(255), nullable=False),
        Column("msg_key", String(255), nullable=True),
        Column("headers", Text, nullable=False),
        Column("body", LargeBinary, nullable=False),
        Column("created_at", Double, nullable=False),
        Column("deliver_at", Double, nullable=True),
        Column("attempts", Integer, nullable=False, server_default="0"),
        Column("claimed_by", String(128), nullable=True),
        Column("lease_until", Double, nullable=True),
        Column("retry_at", Double, nullable=True),
        Column("sent_at", Double, nullable=True),
        Column("last_error", Text, nullable=True),
        # SQLite reuses the largest deleted rowid without AUTOINCREMENT: a second row moved
        # aside under a reused id would collide in the failed table, and stay stuck for good
        sqlite_autoincrement=True,
    )
    Index(f"ix_{p}outbox_unsent", outbox.c.id, postgresql_where=unsent, sqlite_where=unsent)
    Index(
        f"ix_{p}outbox_key_unsent",
        outbox.c.msg_key,
        outbox.c.id,
        postgresql_where=unsent,
        sqlite_where=unsent,
    )
    sent = text("sent_at IS NOT NULL")
    Index(f"ix_{p}outbox_sent", outbox.c.sent_at, postgresql_where=sent, sqlite_where=sent)
    failed = Table(
        f"{p}outbox_failed",
        md,
        Column("id", _Id, primary_key=True, autoincrement=False),
        Column("destination", String(255), nullable=False),
        Column("msg_key", String(255), nullable=True),
        Column("headers", Text, nullable=False),
        Column("body", LargeBinary, nullable=False),
        Column("created_at", Double, nullable=False),
        Column("attempts", Integer, nullable=False),
        Column("reason", Text, nullable=False),
        Column("failed_at", Double, nullable=False),
    )
    inbox = Table(
        f"{p}inbox",
        md,
        Column("key", String(512), primary_key=True),
        Column("state", String(16), nullable=False),
        Column("token", String(64), nullable=False),
        Column("expires_at", Double, nullable=False),
        Column("created_at", Double, nullable=False),
        Index(f"ix_{p}inbox_expires", "expires_at"),
    )
    saga = Table(
        f"{p}saga",
        md,
        Column("saga_id", String(128), primary_key=True),
        Column("name", String(128), nullable=False),
        Column("state", String(64), nullable=False),
        Column("data", Text, nullable=False),
        Column("version", Integer, nullable=False),
        Column("created_at", Double, nullable=False),
        Column("updated_at", Double, nullable=False),
        Column("wake_at", Double, nullable=True),  # when a coordinator's sweep must look at it
        Index(f"ix_{p}saga_name_state", "name", "state"),
        Index(f"ix_{p}saga_wake", "wake_at"),
    )
    history = Table(
        f"{p}saga_history",
        md,
        Column("id", _Id, primary_key=True, autoincrement=True),
        Column("saga_id", String(128), nullable=False),
        Column("version", Integer, nullable=False),
        Column("state", String(64), nullable=False),
        Column("event", String(128), nullable=False),
        Column("data", Text, nullable=False),
        Column("at", Double, nullable=False),
        Index(f"ix_{p}saga_history_saga", "saga_id", "version"),
    )
    _notify_trigger(outbox, prefix=p, schema=schema)
    return Tables(md, outbox, failed, inbox, saga, history, prefix, schema)


def _notify_trigger(outbox: Table, *, prefix: str, schema: str | None) -> None:
    qualified = f'"{schema}".' if schema else ""
    fn = f'{qualified}"{prefix}outbox_notify"'
    table = f'{qualified}"{outbox.name}"'
    statements = [
        f"CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM pg_notify('{prefix}outbox', ''); RETURN NULL; END $$",
        f'DROP TRIGGER IF EXISTS "{prefix}outbox_notify" ON {table}',
        f'CREATE TRIGGER "{prefix}outbox_notify" AFTER INSERT ON {table} '
        f"FOR EACH STATEMENT EXECUTE FUNCTION {fn}()",
    ]
    for sql in statements:
        event.listen(outbox, "after_create", _ddl(sql).execute_if(dialect="postgresql"))
    drop = _ddl(f"DROP FUNCTION IF EXISTS {fn}() CASCADE")
    event.listen(outbox, "after_drop", drop.execute_if(dialect="postgresql"))


def _ddl(sql: str) -> DDL:
    return DDL(sql)  # type: ignore[no-untyped-call]


_default = build_tables()
metadata = _default.metadata
"""The default tables (prefix ``meshlink_``, no schema), for Alembic's ``target_metadata``."""
