"""Testing helpers shipped as public API: the harness, the pytest plugin, the conformance suite."""
