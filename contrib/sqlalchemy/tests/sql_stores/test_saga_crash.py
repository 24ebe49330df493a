"""Saga coordinator killed with SIGKILL at points of progress, on PostgreSQL and RabbitMQ.

Every saga must end completed or compensated as its input dictates, no participant
side effect may be applied twice (a unique constraint on the effect rows would
refuse it, and the rows are counted), and no saga may be left running.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import Table, func, select

from meshlink.saga import SagaInstance, SagaStatus
from meshlink_sqlalchemy import SqlSagaInstanceStore, SqlStores

from .helpers import PG_URL, RABBIT_URL, require, unique, with_prefix
from .saga_crash_app import effects_table, participants, price_of

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(900)]
APP = Path(__file__).with_name("saga_crash_app.py")


class Coordinator:
    """The coordinator child process, killed and restarted by the test.

    A reader task drains its stdout continuously (a full pipe would block the
    child's event loop) and counts its ``SAVED`` lines: the test's points of progress.
    """

    def __init__(self, store_url: str, ns: str, n: int, *, progress: asyncio.Event | None = None) -> None:
        self.args = [sys.executable, str(APP), store_url, RABBIT_URL, ns, str(n)]
        self.proc: asyncio.subprocess.Process | None = None
        self.saves = 0
        self.exited = False
        self._progress = progress or asyncio.Event()  # shared by replicas: any one's progress wakes
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(APP.parent)}
        self.proc = await asyncio.create_subprocess_exec(
            *self.args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=env
        )
        self.exited = False
        self._reader = asyncio.create_task(self._read(self.proc))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            if line.strip() == b"SAVED":
                self.saves += 1
                self._progress.set()
        self.exited = True
        self._progress.set()

    async def run_until(self, saves: int) -> None:
        """Wait until it has saved ``saves`` more times."""
        target = self.saves + saves
        while self.saves < target:
            assert not self.exited, "the coordinator exited on its own"
            self._progress.clear()
            await self._progress.wait()

    async def kill(self) -> None:
        """SIGKILL the child (a no-op when it is not running)."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        if self._reader is not None:
            await self._reader


@pytest.fixture
async def store_url() -> AsyncIterator[str]:
    require(PG_URL, 5432, "PostgreSQL")
    require(RABBIT_URL, 5672, "RabbitMQ")
    url = with_prefix(PG_URL, unique() + "_")
    s = SqlStores(url)
    await s.init()
    await s.close()
    yield url
    s = SqlStores(url)
    await s.drop()
    await s.close()


async def test_killed_coordinators_leave_every_saga_finished_and_no_effect_twice(store_url: str) -> None:
    stores = SqlStores(store_url)
    try:
        await _scenario(stores, store_url)
    finally:
        await stores.close()


async def _scenario(stores: SqlStores, store_url: str) -> None:
    n = 500
    ns = unique("c")
    effects = effects_table(ns)
    async with stores.engine.begin() as conn:
        await conn.run_sync(effects.metadata.create_all)
    partners = participants(RABBIT_URL, stores, ns, effects)
    coordinator = Coordinator(store_url, ns, n)
    rng = random.Random(11)
    await partners.start()
    try:
        kills = 0
        for _ in range(5):  # five SIGKILLs at random points of progress
            await coordinator.start()
            # a saga takes about three saves (each reply's transition is one): 500 sagas ~ 1,500
            await asyncio.wait_for(coordinator.run_until(rng.randrange(25, 200)), 120)
            await coordinator.kill()
            kills += 1
        await coordinator.start()
        await _until_all_finished(stores, n, coordinator)
    finally:
        await coordinator.kill()  # never leave a child behind, whatever happened
        await partners.stop()

    counts = await _check_outcome(stores, ns, n, effects)
    print(f"\n{n} sagas, {kills} coordinator kills, effects {counts}")


async def test_two_coordinator_processes_share_the_work(store_url: str) -> None:
    stores = SqlStores(store_url)
    n = 1000
    ns = unique("r")
    effects = effects_table(ns)
    try:
        async with stores.engine.begin() as conn:
            await conn.run_sync(effects.metadata.create_all)
        partners = participants(RABBIT_URL, stores, ns, effects)
        progress = asyncio.Event()
        replicas = [Coordinator(store_url, ns, n, progress=progress) for _ in range(2)]
        await partners.start()
        try:
            for replica in replicas:
                await replica.start()
            await _until_all_finished(stores, n, *replicas)
        finally:
            for replica in replicas:
                await replica.kill()
            await partners.stop()
        counts = await _check_outcome(stores, ns, n, effects)
        print(f"\n{n} sagas by two coordinator processes, effects {counts}")
    finally:
        await stores.close()


async def _until_all_finished(stores: SqlStores, n: int, *coordinators: Coordinator) -> None:
    """Follow the coordinators' progress until all ``n`` sagas exist and none is unfinished."""
    saga_store = SqlSagaInstanceStore(stores)
    progress = coordinators[0]._progress
    unfinished: list[SagaInstance] = []
    try:
        async with asyncio.timeout(600):
            while True:
                progress.clear()  # before looking: a save while we look still wakes the wait
                unfinished = await saga_store.unfinished()
                if len(await saga_store.find(limit=n + 1)) == n and not unfinished:
                    return
                assert not all(c.exited for c in coordinators), "every coordinator exited on its own"
                await progress.wait()
    except TimeoutError:
        stuck = [(u.saga_id, u.status.value, u.history[-1].step, u.history[-1].event) for u in unfinished[:5]]
        raise AssertionError(f"{len(unfinished)} sagas unfinished, e.g. {stuck}") from None


async def _check_outcome(stores: SqlStores, ns: str, n: int, effects: Table) -> dict[str, int]:
    sagas = {s.saga_id: s for s in await SqlSagaInstanceStore(stores).find(limit=n + 1)}
    assert len(sagas) == n
    for i in range(n):
        want = SagaStatus.COMPENSATED if price_of(i) > 100 else SagaStatus.COMPLETED
        assert sagas[f"{ns}-{i}"].status is want, f"saga {i}: {sagas[f'{ns}-{i}'].status}"
    async with stores.engine.connect() as conn:
        rows = (await conn.execute(select(effects.c.action, func.count()).group_by(effects.c.action))).all()
    counts: dict[str, int] = {action: int(count) for action, count in rows}
    refused = sum(1 for i in range(n) if price_of(i) > 100)
    assert counts == {"book": n, "pay": n - refused, "cancel": refused}, "a side effect was lost or doubled"
    async with stores.engine.begin() as conn:
        await conn.run_sync(effects.metadata.drop_all)
    return counts
