"""Fixtures of the outbox tests."""

from __future__ import annotations

import pytest

from .helpers import Recorder, ScriptedTransport


@pytest.fixture
def transport() -> ScriptedTransport:
    return ScriptedTransport()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()
