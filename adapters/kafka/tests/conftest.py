"""A Kafka-protocol broker for the whole session.

``MESHLINK_KAFKA_BOOTSTRAP`` points the tests at an existing cluster; otherwise
a local broker is started on a free port by ``scripts/kafka_broker.py`` and
stopped at the end. Under ``CI=true`` a broker that cannot be started or reached
fails the tests; elsewhere they are skipped with the reason.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# pytest may import this directory as a namespace package (no __init__.py, so that its module
# names cannot clash with other test directories): make the shared helpers importable by name
sys.path.insert(0, str(Path(__file__).parent))

from kafka_helpers import ENV, broker_script, unavailable


def _reachable(bootstrap: str) -> bool:
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=3):
            return True
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """``host:port`` of the broker under test."""
    given = os.environ.get(ENV)
    if given:
        if not _reachable(given):
            unavailable(f"{ENV}={given} does not accept connections")
        yield given
        return
    try:
        broker = broker_script().LocalBroker.launch()
    except Exception as exc:
        unavailable(f"could not start the local broker: {exc}")
        raise
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test here that needs a broker with ``kafka``."""
    here = Path(__file__).parent
    for item in items:
        needs_broker = {"kafka_bootstrap", "proxied_bootstrap"} & set(getattr(item, "fixturenames", ()))
        if here in Path(str(item.fspath)).parents and needs_broker:
            item.add_marker(pytest.mark.kafka)
