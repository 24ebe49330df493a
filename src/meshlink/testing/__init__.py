"""Testing helpers shipped as public API.

* :class:`MeshHarness` — run a mesh in a test, publish, await idle, inspect.
* :mod:`meshlink.testing.conformance` — the transport conformance suite.
* the pytest plugin (loaded automatically): fixtures ``fake_clock``,
  ``memory_url`` and ``mesh_harness``.
"""

from meshlink.testing.harness import MeshHarness

__all__ = ["MeshHarness"]
