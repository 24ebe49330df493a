"""Sagas: declarative definitions, a persistent coordinator, compensation and timeouts."""

from meshlink.saga.coordinator import H_SAGA_ID, H_SAGA_STEP, H_SAGA_TOKEN, SagaCoordinator
from meshlink.saga.definition import Command, LocalStep, RemoteStep, Saga
from meshlink.saga.events import SagaStepChanged
from meshlink.saga.store import (
    HistoryEntry,
    MemorySagaStore,
    SagaInstance,
    SagaStatus,
    SagaStore,
    StaleSagaError,
)

__all__ = [
    "Command",
    "H_SAGA_ID",
    "H_SAGA_STEP",
    "H_SAGA_TOKEN",
    "HistoryEntry",
    "LocalStep",
    "MemorySagaStore",
    "RemoteStep",
    "Saga",
    "SagaCoordinator",
    "SagaInstance",
    "SagaStatus",
    "SagaStepChanged",
    "SagaStore",
    "StaleSagaError",
]
