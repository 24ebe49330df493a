"""Fixtures: SQL stores on real SQLite and PostgreSQL (unique table prefixes, dropped after), RabbitMQ."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshlink.transport.base import Transport
from meshlink.transport.registry import transport_from_url
from meshlink_sqlalchemy import SqlStores

from .helpers import PG_URL, RABBIT_URL, require, unique, with_prefix


@pytest.fixture
def pg_url() -> str:
    """A PostgreSQL store URL with a table prefix private to this test."""
    require(PG_URL, 5432, "PostgreSQL")
    return with_prefix(PG_URL, unique() + "_")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"


async def _stores(url: str) -> AsyncIterator[SqlStores]:
    stores = SqlStores(url)
    await stores.init()
    try:
        yield stores
    finally:
        await stores.drop()
        await stores.close()


@pytest.fixture
async def pg_stores(pg_url: str) -> AsyncIterator[SqlStores]:
    async for s in _stores(pg_url):
        yield s


@pytest.fixture
async def sqlite_stores(sqlite_url: str) -> AsyncIterator[SqlStores]:
    async for s in _stores(sqlite_url):
        yield s


@pytest.fixture(params=["sqlite", "postgresql"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlStores]:
    """Each test on both backends."""
    if request.param == "postgresql":
        require(PG_URL, 5432, "PostgreSQL")
        url = with_prefix(PG_URL, unique() + "_")
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    async for s in _stores(url):
        yield s


@pytest.fixture
def rabbit_url() -> str:
    require(RABBIT_URL, 5672, "RabbitMQ")
    return RABBIT_URL


@pytest.fixture
async def rabbit(rabbit_url: str) -> AsyncIterator[Transport]:
    """A connected RabbitMQ transport (its test's queues are exclusive names, deleted by the test)."""
    transport = transport_from_url(rabbit_url)
    await transport.connect()
    yield transport
    await transport.close()
