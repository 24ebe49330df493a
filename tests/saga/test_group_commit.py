"""Group commit and per-saga locks: the coordinator's saving machinery."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from meshlink.saga import MemorySagaStore, SagaInstance, StaleSagaError
from meshlink.saga.commit import GroupCommit
from meshlink.saga.contract import instance
from meshlink.saga.locks import KeyedLocks
from meshlink.saga.store import Saved, Transition


class CountingStore(MemorySagaStore):
    """A memory store that records the batches it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[str]] = []

    async def save_many(self, transitions: Sequence[Transition]) -> list[Saved]:
        self.batches.append([i.saga_id for i, _ in transitions])
        return await super().save_many(transitions)


async def test_transitions_ready_at_once_are_saved_in_one_batch() -> None:
    store = CountingStore()
    commit = GroupCommit(store)
    saved = await asyncio.gather(*(commit.save(instance(f"s{i}")) for i in range(10)))
    assert [s.version for s in saved] == [1] * 10
    assert store.batches == [[f"s{i}" for i in range(10)]]


async def test_transitions_arriving_during_a_save_go_in_the_next_batch() -> None:
    class Slow(CountingStore):
        def __init__(self) -> None:
            super().__init__()
            self.entered, self.release = asyncio.Event(), asyncio.Event()

        async def save_many(self, transitions: Sequence[Transition]) -> list[Saved]:
            self.entered.set()
            await self.release.wait()
            return await super().save_many(transitions)

    store = Slow()
    commit = GroupCommit(store)
    first = asyncio.ensure_future(commit.save(instance("a")))
    await store.entered.wait()  # "a" is being saved
    later = [asyncio.ensure_future(commit.save(instance(f"b{i}"))) for i in range(3)]
    store.release.set()
    await asyncio.gather(first, *later)
    assert store.batches == [["a"], ["b0", "b1", "b2"]]


async def test_a_stale_transition_fails_alone() -> None:
    store = CountingStore()
    commit = GroupCommit(store)
    await commit.save(instance("old"))
    results = await asyncio.gather(
        commit.save(instance("old")), commit.save(instance("new")), return_exceptions=True
    )
    assert isinstance(results[0], StaleSagaError)
    assert isinstance(results[1], SagaInstance)
    assert await store.load("new") == results[1]


async def test_one_saga_is_never_twice_in_a_batch() -> None:
    store = CountingStore()
    commit = GroupCommit(store)
    one = instance("x")
    results = await asyncio.gather(
        commit.save(one), commit.save(one), commit.save(instance("y")), return_exceptions=True
    )
    assert store.batches == [["x", "y"], ["x"]]
    assert isinstance(results[1], StaleSagaError), "the second copy of version 0 is stale"


async def test_an_error_of_the_batch_reaches_every_caller_in_it() -> None:
    class Down(MemorySagaStore):
        async def save_many(self, transitions: Sequence[Transition]) -> list[Saved]:
            raise ConnectionError("database down")

    commit = GroupCommit(Down())
    results = await asyncio.gather(
        commit.save(instance("a")), commit.save(instance("b")), return_exceptions=True
    )
    assert all(isinstance(r, ConnectionError) for r in results)


async def test_a_keys_lock_excludes_and_is_dropped_when_unused() -> None:
    locks = KeyedLocks()
    inside: list[str] = []

    async def hold(name: str, gate: asyncio.Event) -> None:
        async with locks("k"):
            inside.append(name)
            await gate.wait()
            inside.remove(name)

    gate = asyncio.Event()
    tasks = [asyncio.ensure_future(hold(n, gate)) for n in ("a", "b")]
    for _ in range(5):
        await asyncio.sleep(0)
    assert inside == ["a"], "the second waits for the first"
    assert len(locks) == 1
    gate.set()
    await asyncio.gather(*tasks)
    assert len(locks) == 0, "no lock is kept for a key nobody uses"


def test_max_batch_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        GroupCommit(MemorySagaStore(), max_batch=0)
