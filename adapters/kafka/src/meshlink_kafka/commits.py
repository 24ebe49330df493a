"""Committing what was settled: per partition, the first offset not yet settled, never a bare commit.

A bare ``commit()`` commits the *fetched* position and, with concurrent
handlers, loses records still in flight. Each commit here is explicit: for
every partition still assigned, :attr:`OffsetTracker.position` with the
progress metadata of :mod:`meshlink_kafka.progress`. A commit refused because
the group moved on (rebalance) only means "will be redelivered".
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import structlog
from aiokafka import TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    IllegalStateError,
    KafkaError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)

from meshlink_kafka.delivery import PartitionState
from meshlink_kafka.progress import LEDGER, Progress, encode

__all__ = ["REBALANCE_ERRORS", "Committer", "commit_settled"]

_log = structlog.get_logger("meshlink.kafka")

#: Commit errors that mean the group moved on: the records will be redelivered, nothing to fix.
REBALANCE_ERRORS = (
    CommitFailedError,
    RebalanceInProgressError,
    IllegalGenerationError,
    UnknownMemberIdError,
    IllegalStateError,
)


async def commit_settled(
    consumer: Any, parts: Iterable[PartitionState], *, bootstrap: str, group_id: str
) -> bool:
    """Commit each assigned partition's settled position, with the handed-out mark as metadata.

    Returns whether anything was sent (successfully or not): the caller's
    "settled since the last commit" count starts again.
    """
    assignment = consumer.assignment()
    offsets: dict[TopicPartition, tuple[int, str]] = {}
    marks: dict[PartitionState, tuple[int, int, int]] = {}
    for part in parts:
        pos = part.tracker.position
        if pos is None or part.tp not in assignment:
            continue
        ahead = part.tracker.done_ahead()
        mark = (pos, part.handed_out, len(ahead))
        if mark == part.committed:
            continue
        progress = Progress(part.handed_out, ahead)
        offsets[part.tp] = (pos, encode(pos, progress))
        marks[part] = mark
        LEDGER[(bootstrap, group_id, part.tp)] = progress
    if not offsets:
        return False
    try:
        await consumer.commit(offsets)
    except REBALANCE_ERRORS as exc:
        _log.info(
            "kafka commit refused by a rebalance; records will be redelivered",
            group=group_id,
            error=repr(exc),
        )
        return True
    except KafkaError as exc:
        _log.warning("kafka commit failed; retried at the next commit", group=group_id, error=repr(exc))
        return True
    for part, mark in marks.items():
        part.committed = mark
    return True


class Committer:
    """Batched commits of one subscription: every ``commit_interval`` seconds, or early after
    ``commit_every`` settlements; one commit at a time.

    Args:
        client: the subscription's current aiokafka consumer (it may be replaced).
        parts: the subscription's current partition states.
        closed: whether the subscription is closed (no commit any more).
    """

    def __init__(
        self,
        *,
        interval: float,
        every: int,
        bootstrap: str,
        group_id: str,
        client: Callable[[], Any],
        parts: Callable[[], Iterable[PartitionState]],
        closed: Callable[[], bool],
    ) -> None:
        self._interval = interval
        self._every = every
        self._bootstrap = bootstrap
        self._group_id = group_id
        self._client = client
        self._parts = parts
        self._closed = closed
        self._since = 0
        self._now = asyncio.Event()
        self._lock = asyncio.Lock()

    def settled(self, count: int = 1) -> None:
        """``count`` more deliveries settled for good: commit early once ``every`` have been."""
        self._since += count
        if self._since >= self._every:
            self._now.set()

    async def run(self) -> None:
        """Commit every interval (or early) until the subscription is closed."""
        while not self._closed():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._now.wait(), self._interval)
            self._now.clear()
            try:
                await self.commit(list(self._parts()))
            except Exception as exc:  # never end the committer: nothing would be committed again
                _log.error(
                    "kafka commit raised; retried at the next commit", group=self._group_id, error=repr(exc)
                )

    async def commit(self, parts: list[PartitionState]) -> None:
        """Commit the settled position of each of ``parts`` that is assigned."""
        async with self._lock:
            if self._closed():
                return
            if await commit_settled(
                self._client(), parts, bootstrap=self._bootstrap, group_id=self._group_id
            ):
                self._since = 0
