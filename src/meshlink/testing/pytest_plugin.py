"""pytest plugin (registered through the ``pytest11`` entry point): meshlink fixtures.

* ``fake_clock`` — a :class:`~meshlink.clock.FakeClock`;
* ``memory_url`` — a ``memory://`` URL private to the test;
* ``mesh_harness`` — a factory: ``h = await mesh_harness(mesh)`` starts the mesh
  in a :class:`~meshlink.testing.MeshHarness` and stops it after the test
  (needs pytest-asyncio).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from meshlink.app import Mesh
from meshlink.clock import FakeClock
from meshlink.testing.harness import MeshHarness


@pytest.fixture
def fake_clock() -> FakeClock:
    """A :class:`~meshlink.clock.FakeClock` that moves only when the test advances it."""
    return FakeClock()


@pytest.fixture
def memory_url() -> str:
    """A ``memory://`` URL naming a broker private to this test."""
    return f"memory://test-{uuid.uuid4().hex[:12]}"


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the harness fixture needs pytest-asyncio
    pass
else:

    @pytest_asyncio.fixture
    async def mesh_harness() -> AsyncIterator[Callable[[Mesh], Awaitable[MeshHarness]]]:
        """Factory fixture: ``h = await mesh_harness(mesh)``; stopped at teardown."""
        started: list[MeshHarness] = []

        async def start(mesh: Mesh) -> MeshHarness:
            harness = MeshHarness(mesh)
            await harness.__aenter__()
            started.append(harness)
            return harness

        yield start
        for harness in reversed(started):
            await harness.__aexit__(None, None, None)
