"""Fixtures: SQL stores on SQLite and PostgreSQL (unique table prefixes, dropped after), RabbitMQ, Kafka."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

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


# -- Kafka (the relay → Kafka tests) ----------------------------------------------------------
# The same approach as adapters/kafka/tests/conftest.py: MESHLINK_KAFKA_BOOTSTRAP points at a
# cluster, otherwise scripts/kafka_broker.py starts a local Kafka-protocol broker for the session.

KAFKA_ENV = "MESHLINK_KAFKA_BOOTSTRAP"
_BROKER_SCRIPT = Path(__file__).resolve().parents[4] / "scripts" / "kafka_broker.py"


def _kafka_unavailable(reason: str) -> None:
    """Skip, or fail under ``CI=true`` (CI never passes by skipping)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"Kafka broker unavailable under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def _broker_script() -> ModuleType:
    name = "meshlink_kafka_broker_script"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _BROKER_SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """``host:port`` of the Kafka broker under test."""
    given = os.environ.get(KAFKA_ENV)
    if given:
        host, _, port = given.split(",")[0].rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=3):
                pass
        except (OSError, ValueError):
            _kafka_unavailable(f"{KAFKA_ENV}={given} does not accept connections")
        yield given
        return
    try:
        broker = _broker_script().LocalBroker.launch()
    except Exception as exc:
        _kafka_unavailable(f"could not start the local Kafka broker: {exc}")
        raise
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


#: Short group timings and fetch wait: every consumer start pays a JoinGroup wait, and the
#: test broker answers a waiting fetch only at its deadline (see adapters/kafka/tests).
KAFKA_TEST_OPTIONS: dict[str, Any] = {
    "session_timeout_ms": 6_000,
    "heartbeat_interval_ms": 500,
    "rebalance_timeout_ms": 6_000,
    "request_timeout_ms": 12_000,
    "max_poll_interval_ms": 60_000,
    "drain_timeout": 3.0,
    "fetch_max_wait_ms": 10,
    "commit_interval": 0.2,
    "linger_ms": 1,
}


@pytest.fixture
async def kafka(kafka_bootstrap: str) -> AsyncIterator[list[Transport]]:
    """Two connected Kafka transports: [0] consumes, [1] publishes for the relay."""
    made = [transport_from_url(f"kafka://{kafka_bootstrap}", **KAFKA_TEST_OPTIONS) for _ in range(2)]
    try:
        for t in made:
            await t.connect()
        yield made
    finally:
        for t in made:
            await t.close()
