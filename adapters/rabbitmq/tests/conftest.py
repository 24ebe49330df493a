"""Fixtures for the RabbitMQ adapter tests: the broker URL, availability, clean-up.

Tests that need the broker use the ``rabbit_url`` fixture (or the ``cleanup``
fixture). When nothing listens at the broker address they are skipped, except
with ``CI=true``, where they fail: CI must never pass by skipping them.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika
import pytest

from meshlink_rabbitmq import RabbitTransport

# the tests import their shared helpers (rabbit_helpers) by name, as the Kafka adapter's do
sys.path.insert(0, str(Path(__file__).parent))

RABBIT_URL = os.environ.get("MESHLINK_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "localhost", parts.port or 5672), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def _rabbit_up() -> bool:
    return _reachable(RABBIT_URL)


@pytest.fixture
def rabbit_url(_rabbit_up: bool) -> str:
    """The broker URL; skip (fail under ``CI=true``) when RabbitMQ is unreachable."""
    if not _rabbit_up:
        message = f"RabbitMQ is not reachable at {urlsplit(RABBIT_URL).hostname}:{urlsplit(RABBIT_URL).port}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return RABBIT_URL


class Cleanup:
    """Tracks transports (and extra names) of one test; deletes what they declared."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.transports: list[RabbitTransport] = []
        self.queues: set[str] = set()
        self.exchanges: set[str] = set()

    def track(self, transport: RabbitTransport) -> RabbitTransport:
        self.transports.append(transport)
        return transport

    def transport(self, url: str | None = None, **options: object) -> RabbitTransport:
        return self.track(RabbitTransport(url or self.url, **options))

    async def run(self) -> None:
        prefix = "meshlink.delay"  # shared delay queues and exchanges stay: few and bounded
        for t in self.transports:
            await t.close()
            for rec in t.topology.explain():
                name = rec.get("name", "")
                if not name or name.startswith(prefix):
                    continue
                if rec["kind"] == "queue":
                    self.queues.add(name)
                elif rec["kind"] == "exchange":
                    self.exchanges.add(name)
        if not (self.queues or self.exchanges):
            return
        conn = await aio_pika.connect(self.url)
        try:
            for name in sorted(self.queues):
                channel = await conn.channel()
                await channel.queue_delete(name)
                await channel.close()
            for name in sorted(self.exchanges):
                channel = await conn.channel()
                await channel.exchange_delete(name)
                await channel.close()
        finally:
            await conn.close()


@pytest.fixture
async def cleanup(rabbit_url: str) -> AsyncIterator[Cleanup]:
    """Make transports through this; their queues and exchanges are deleted after the test."""
    c = Cleanup(rabbit_url)
    yield c
    await asyncio.wait_for(c.run(), 30)
