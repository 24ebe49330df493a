"""Redis for the shared-state resilience tests (127.0.0.1:6379, or ``MESHLINK_REDIS_URL``)."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

import pytest


@pytest.fixture
def redis_url() -> str:
    """The Redis URL; skips the test without Redis, and fails it under ``CI=true``."""
    url = os.environ.get("MESHLINK_REDIS_URL", "redis://127.0.0.1:6379/0")
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    try:
        with socket.create_connection((host, port), timeout=2):
            return url
    except OSError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"Redis is not reachable at {host}:{port}")
        pytest.skip(f"Redis is not reachable at {host}:{port}")
