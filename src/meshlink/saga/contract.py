"""The saga store contract as runnable checks: the memory and SQL stores (and third parties') run them.

Give each check a :class:`SagaStoreHarness` over a fresh, empty store::

    @pytest.mark.parametrize("check", contract.CHECKS, ids=lambda c: c.__name__)
    async def test_contract(check, harness):
        await check(harness)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from meshlink.message import Message
from meshlink.saga.store import SagaInstance, SagaStatus, SagaStore, StaleSagaError

__all__ = ["CHECKS", "SagaStoreHarness", "instance"]

NOW = 1_700_000_000.0


class SagaStoreHarness(Protocol):
    """A fresh store, and the commands its committed saves sent (or will send)."""

    store: SagaStore

    async def sent(self) -> list[tuple[str, Message]]: ...


def instance(saga_id: str, *, wake_at: float | None = NOW + 10) -> SagaInstance:
    """A new (unsaved) running instance."""
    return SagaInstance(
        saga_id=saga_id,
        name="checkout",
        definition_version=1,
        status=SagaStatus.RUNNING,
        state={"order": saga_id, "lines": [1, 2]},
        step=0,
        created_at=NOW,
        updated_at=NOW,
        wake_at=wake_at,
    ).log(NOW, "", "started")


def command(n: int) -> tuple[str, Message]:
    return ("inventory.reserve", Message(body=str(n).encode(), type="Reserve", key=f"k{n}"))


async def _refused(save: Awaitable[object], error: type[Exception]) -> Exception:
    try:
        await save
    except error as exc:
        return exc
    raise AssertionError(f"expected {error.__name__}")


async def _bodies(h: SagaStoreHarness) -> list[int]:
    return sorted(int(m.body) for _, m in await h.sent())


async def a_saved_instance_loads_back_as_saved(h: SagaStoreHarness) -> None:
    saved = await h.store.save(instance("s1"), [command(1)])
    assert saved.version == 1
    assert await h.store.load("s1") == saved
    moved = saved.evolve(step=1, waiting=True, token="t1", due_at=NOW + 5, completed=(0,)).log(
        NOW, "a", "sent"
    )
    moved = await h.store.save(moved)
    assert moved.version == 2
    assert await h.store.load("s1") == moved
    assert await h.store.load("nope") is None
    assert await _bodies(h) == [1]


async def a_stale_save_is_refused_and_sends_nothing(h: SagaStoreHarness) -> None:
    first = await h.store.save(instance("s1"))
    # created twice (starting is idempotent)
    await _refused(h.store.save(instance("s1"), [command(1)]), StaleSagaError)
    await h.store.save(first.log(NOW, "a", "sent"), [command(2)])
    await _refused(h.store.save(first.log(NOW, "a", "other"), [command(3)]), StaleSagaError)  # read at v1
    loaded = await h.store.load("s1")
    assert loaded is not None
    assert (loaded.version, loaded.history[-1].event) == (2, "sent")
    assert await _bodies(h) == [2]


async def save_many_checks_each_transition_on_its_own(h: SagaStoreHarness) -> None:
    a = await h.store.save(instance("a"))
    b = await h.store.save(instance("b"))
    await h.store.save(instance("d"))
    await h.store.save(b.log(NOW, "x", "moved"))  # b's copy is now stale
    results = await h.store.save_many(
        [
            (a.log(NOW, "x", "sent"), [command(1)]),
            (b.log(NOW, "x", "late"), [command(2)]),
            (instance("c"), [command(3), command(4)]),
            (instance("d"), [command(5)]),  # exists: stale
        ]
    )
    assert [type(r) for r in results] == [SagaInstance, StaleSagaError, SagaInstance, StaleSagaError]
    assert [r.version for r in results if isinstance(r, SagaInstance)] == [2, 1]
    loaded_a, loaded_b = await h.store.load("a"), await h.store.load("b")
    assert loaded_a is not None
    assert loaded_a.history[-1].event == "sent"
    assert loaded_b is not None
    assert loaded_b.history[-1].event == "moved"
    assert await h.store.load("c") == results[2]
    assert await _bodies(h) == [1, 3, 4], "only the saved transitions' commands"


async def save_many_refuses_a_saga_twice_in_one_batch(h: SagaStoreHarness) -> None:
    error = await _refused(h.store.save_many([(instance("a"), []), (instance("a"), [])]), ValueError)
    assert "twice" in str(error)
    assert await h.store.load("a") is None


async def the_sweep_finds_due_and_unfinished_sagas(h: SagaStoreHarness) -> None:
    await h.store.save(instance("soon", wake_at=NOW + 1))
    await h.store.save(instance("later", wake_at=NOW + 100))
    done = await h.store.save(instance("done"))
    await h.store.save(done.evolve(status=SagaStatus.COMPLETED, wake_at=None))
    assert [i.saga_id for i in await h.store.due(NOW + 2)] == ["soon"]
    assert sorted(i.saga_id for i in await h.store.unfinished()) == ["later", "soon"]
    assert [i.saga_id for i in await h.store.find(SagaStatus.COMPLETED)] == ["done"]
    assert len(await h.store.find()) == 3


CHECKS: list[Callable[[SagaStoreHarness], Awaitable[None]]] = [
    a_saved_instance_loads_back_as_saved,
    a_stale_save_is_refused_and_sends_nothing,
    save_many_checks_each_transition_on_its_own,
    save_many_refuses_a_saga_twice_in_one_batch,
    the_sweep_finds_due_and_unfinished_sagas,
]
