"""Shared test setup."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

# shared test helpers (``waiting``) import by name, whatever pytest's import mode
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """Examples and the CLI configure structlog for the process: undo it after each test."""
    yield
    structlog.reset_defaults()
