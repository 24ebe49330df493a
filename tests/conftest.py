"""Shared test setup."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """Examples and the CLI configure structlog for the process: undo it after each test."""
    yield
    structlog.reset_defaults()
