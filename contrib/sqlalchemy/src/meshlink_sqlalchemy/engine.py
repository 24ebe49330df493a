"""Engines from store URLs, and the bounded retry of store operations on connection-class errors.

Store URLs are SQLAlchemy async URLs plus two options of ours, removed before
the URL reaches the driver: ``table_prefix`` (default ``meshlink_``) and
``schema``. For example ``postgresql+asyncpg://app@db/app?table_prefix=svc_``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from meshlink.errors import ConfigurationError
from meshlink_sqlalchemy.tables import DEFAULT_PREFIX

__all__ = ["StoreUrl", "is_connection_error", "make_engine", "parse_store_url", "with_retry"]

T = TypeVar("T")
#: SQLSTATE classes / codes that mean "the connection is gone, try again on a new one":
#: 08 connection exception, 57P01-57P03 admin/crash shutdown, cannot connect now.
_RETRY_SQLSTATES = ("08", "57P01", "57P02", "57P03")


class StoreUrl:
    """A store URL split into the driver's URL and meshlink's options."""

    def __init__(self, url: str, prefix: str, schema: str | None) -> None:
        self.url = url
        self.prefix = prefix
        self.schema = schema


def parse_store_url(url: str) -> StoreUrl:
    """Separate ``table_prefix`` and ``schema`` from a store URL."""
    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError as exc:
        raise ConfigurationError("store", f"not a database URL: {exc}") from exc
    query = dict(parsed.query)
    prefix = str(query.pop("table_prefix", DEFAULT_PREFIX))
    schema = query.pop("schema", None)
    driver_url = parsed.set(query=query).render_as_string(hide_password=False)
    return StoreUrl(driver_url, prefix, str(schema) if schema else None)


def make_engine(url: str, **options: Any) -> AsyncEngine:
    """An async engine with sensible defaults per backend (``options`` override them)."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        memory = parsed.database in (None, "", ":memory:")
        defaults: dict[str, Any] = {"connect_args": {"timeout": 30}}
        if memory:
            defaults["poolclass"] = StaticPool  # one shared connection, or each one is a new empty DB
        engine = create_async_engine(url, **{**defaults, **options})
        if not memory:
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    if backend == "postgresql":
        defaults = {"pool_pre_ping": True, "pool_size": 10, "max_overflow": 20}
        return create_async_engine(url, **{**defaults, **options})
    return create_async_engine(url, **options)


def _sqlite_pragmas(dbapi_connection: Any, record: Any) -> None:
    # WAL lets readers (the relay's stats, consumers) run while a writer commits.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlstate(exc: BaseException | None) -> str:
    while exc is not None:
        state = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
        if isinstance(state, str):
            return state
        exc = exc.__cause__
    return ""


def is_connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` means "connection lost or unusable" (worth a retry on a new connection)."""
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated or isinstance(exc, sa_exc.InterfaceError):
            return True
        state = _sqlstate(exc.orig)
        if state.startswith(_RETRY_SQLSTATES):
            return True
        # SQLite reports a busy database as OperationalError("database is locked"): told by its
        # result code (SQLITE_BUSY / SQLITE_LOCKED), not by a word any message may contain
        return isinstance(exc, sa_exc.OperationalError) and _sqlite_busy(exc.orig)
    return isinstance(exc, ConnectionError | sa_exc.DisconnectionError)


def _sqlite_busy(error: object) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED (primary codes)
    return str(error).startswith(("database is locked", "database table is locked"))


async def with_retry(op: Callable[[], Awaitable[T]], *, attempts: int = 5) -> T:
    """Run ``op`` (a whole transaction), again on a connection-class error, at most ``attempts`` times."""
    async for attempt in AsyncRetrying(
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=0.05, max=1.0),
        retry=retry_if_exception(is_connection_error),
        reraise=True,
    ):
        with attempt:
            return await op()
    raise AssertionError("unreachable")  # pragma: no cover - AsyncRetrying returns or raises
