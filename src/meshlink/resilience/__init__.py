"""Failure handling policies: one module per policy, each usable on its own."""

from meshlink.resilience.deadletter import DeadLetter, failure_headers

__all__ = ["DeadLetter", "failure_headers"]
