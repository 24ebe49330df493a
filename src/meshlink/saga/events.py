"""Saga telemetry events (emitted through the mesh's listeners)."""

from __future__ import annotations

from dataclasses import dataclass

from meshlink.events import Event

__all__ = ["SagaStepChanged"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SagaStepChanged(Event):
    """A saga was saved after something happened to it."""

    saga_id: str
    saga: str
    status: str
    step: str
    event: str
