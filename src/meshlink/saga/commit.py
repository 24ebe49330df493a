"""Group commit: the transitions of many sagas that are ready at once, saved together.

A coordinator handles many replies concurrently; each reply's transition waits
for its save. :class:`GroupCommit` puts the transitions that arrive while a save
is in flight into the next one, so a busy coordinator writes one transaction
per batch instead of one per transition, and an idle one still saves each
transition at once (no timer, no added latency)::

    save → [queue] → flusher: store.save_many(batch) → each caller gets its own result

Each transition keeps its own optimistic version check: a stale one fails alone
(its caller gets the :class:`~meshlink.saga.StaleSagaError`) and the others
commit. A batch never holds two transitions of one saga (the second waits for the
next batch). An error of the whole batch (the database is down) goes to every
caller in it; nothing of that batch was saved.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from meshlink.saga.store import Outgoing, SagaInstance, SagaStore, StaleSagaError

__all__ = ["GroupCommit"]


@dataclass(slots=True)
class _Pending:
    instance: SagaInstance
    outgoing: Sequence[Outgoing]
    done: asyncio.Future[SagaInstance]


class GroupCommit:
    """Saves saga transitions in batches through :meth:`SagaStore.save_many`.

    Args:
        store: where the transitions are saved.
        max_batch: most transitions in one batch.
    """

    def __init__(self, store: SagaStore, *, max_batch: int = 256) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.store = store
        self.max_batch = max_batch
        self._queue: deque[_Pending] = deque()
        self._flusher: asyncio.Task[None] | None = None

    async def save(self, instance: SagaInstance, outgoing: Sequence[Outgoing] = ()) -> SagaInstance:
        """Save ``instance`` with ``outgoing`` in the next batch; its own result or error."""
        loop = asyncio.get_running_loop()
        pending = _Pending(instance, outgoing, loop.create_future())
        self._queue.append(pending)
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush(), name="saga group commit")
            self._flusher.add_done_callback(self._flusher_done)
        return await pending.done

    def _flusher_done(self, task: asyncio.Task[None]) -> None:
        # a flusher cancelled before its first step never ran its own clean-up: the
        # transitions it would have saved are cancelled here, or their callers would wait for good
        if task.cancelled():
            for p in self._queue:
                p.done.cancel()
            self._queue.clear()

    async def _flush(self) -> None:
        batch: list[_Pending] = []
        try:
            await asyncio.sleep(0)  # let the transitions made ready by the same event join this batch
            while self._queue:
                batch = self._take()
                if not batch:
                    continue
                await self._save(batch)
                batch = []
        except asyncio.CancelledError:
            for p in (*batch, *self._queue):
                p.done.cancel()  # the coordinator is stopping: nobody knows what was saved
            self._queue.clear()
            raise

    async def _save(self, batch: list[_Pending]) -> None:
        try:
            results = await self.store.save_many([(p.instance, p.outgoing) for p in batch])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if len(batch) > 1:
                # one transition the store refuses (a value too long for its column...) must not
                # fail the others batched with it: nothing of the batch was saved, so each
                # is saved alone and gets its own outcome
                for p in batch:
                    await self._save([p])
                return
            for p in batch:
                if not p.done.done():
                    p.done.set_exception(exc)
            return
        for p, result in zip(batch, results, strict=True):
            if p.done.done():
                continue  # its caller was cancelled; the save stands
            if isinstance(result, StaleSagaError):
                p.done.set_exception(result)
            else:
                p.done.set_result(result)

    def _take(self) -> list[_Pending]:
        """Up to ``max_batch`` queued transitions, at most one per saga (the rest stay queued, in order)."""
        batch: list[_Pending] = []
        seen: set[str] = set()
        later: list[_Pending] = []
        while self._queue and len(batch) < self.max_batch:
            p = self._queue.popleft()
            if p.done.done():
                continue  # cancelled before it was saved: drop it
            if p.instance.saga_id in seen:
                later.append(p)
            else:
                seen.add(p.instance.saga_id)
                batch.append(p)
        self._queue.extendleft(reversed(later))
        return batch

    async def close(self) -> None:
        """Wait for the batch in flight and the queued ones."""
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
