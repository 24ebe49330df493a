"""Saga state: optimistic versions and history."""

from __future__ import annotations

import pytest

from meshlink_sqlalchemy import SqlStores, StaleSagaError


async def test_a_saga_moves_by_version_and_keeps_its_history(stores: SqlStores) -> None:
    sagas = stores.sagas
    created = await sagas.create("s1", "checkout", "started", {"order": "o1"})
    moved = await sagas.update(created, state="charged", event="payment.captured")
    assert (moved.version, moved.state, dict(moved.data)) == (2, "charged", {"order": "o1"})
    with pytest.raises(StaleSagaError):
        await sagas.update(created, state="cancelled", event="late")  # read at version 1
    assert (await sagas.load("s1")) == moved
    history = [(h.version, h.event) for h in await sagas.history("s1")]
    assert history == [(1, "created"), (2, "payment.captured")]
    assert [s.saga_id for s in await sagas.find(name="checkout", state="charged")] == ["s1"]
