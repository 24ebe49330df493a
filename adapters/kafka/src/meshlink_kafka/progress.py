"""What a partition's committed offset cannot say, carried in the commit metadata.

A Kafka commit is one position: "everything before this is done". With
concurrent handlers, records *after* that position may be done too (settled
while an earlier one was still running), and records may have been handed out
without being settled. When the partition moves to another member (rebalance,
restart, graceful shutdown with a stuck handler), both facts matter:

* records already **done** must not run again — the new owner skips them;
* records **handed out** before are flagged ``redelivered``.

Both travel in the commit's metadata string (Apache Kafka keeps up to
``offset.metadata.max.bytes``, 4096 by default), relative to the committed
position: ``h=<handed-out mark>;d=<ranges of done offsets>``. A process also
keeps the latest progress of each partition in :data:`LEDGER`, for brokers that
do not keep commit metadata. Progress that would not fit is left out: the
records are then redelivered — at-least-once, never a loss.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import TopicPartition

__all__ = ["LEDGER", "MAX_METADATA", "Progress", "decode", "encode", "previous_progress"]

_log = structlog.get_logger("meshlink.kafka")

MAX_METADATA = 3_000
"""Longest metadata string written (below Kafka's 4096-byte default limit)."""


@dataclass(frozen=True)
class Progress:
    """Beyond-the-position facts about one partition."""

    handed_out: int = -1
    """Highest offset handed out to a subscriber."""
    done: frozenset[int] = field(default_factory=frozenset)
    """Offsets at or after the committed position that were settled for good."""

    def merge(self, other: Progress) -> Progress:
        """Both sets of facts (each is true of the group)."""
        return Progress(max(self.handed_out, other.handed_out), self.done | other.done)


#: (bootstrap servers, group id, partition) -> progress last committed by a member in this process.
LEDGER: dict[tuple[str, str, TopicPartition], Progress] = {}


def encode(position: int, progress: Progress) -> str:
    """The metadata string for a commit at ``position`` (empty when there is nothing to say)."""
    if progress.handed_out < position and not progress.done:
        return ""
    text = f"h={progress.handed_out - position}"
    ranges = _ranges(sorted(o - position for o in progress.done if o >= position))
    if ranges:
        full = f"{text};d={ranges}"
        if len(full) <= MAX_METADATA:
            text = full
    return text


def decode(position: int, text: str) -> Progress:
    """Read a metadata string written by :func:`encode` (anything else gives no progress)."""
    handed_out = -1
    done: set[int] = set()
    try:
        for part in text.split(";"):
            name, _, value = part.partition("=")
            if name == "h":
                handed_out = position + int(value)
            elif name == "d" and value:
                for span in value.split(","):
                    lo, _, hi = span.partition("-")
                    done.update(range(position + int(lo), position + int(hi or lo) + 1))
    except ValueError:
        return Progress()
    return Progress(handed_out, frozenset(done))


async def previous_progress(
    consumer: Any, bootstrap: str, group_id: str, tps: set[TopicPartition]
) -> dict[TopicPartition, Progress]:
    """What earlier owners of ``tps`` did past the committed offsets: commit metadata and :data:`LEDGER`."""
    out = {tp: LEDGER.get((bootstrap, group_id, tp), Progress()) for tp in tps}
    # aiokafka's public committed() drops the commit metadata, so its coordinator is asked
    fetch = getattr(getattr(consumer, "_coordinator", None), "fetch_committed_offsets", None)
    if fetch is None or not tps:
        return out
    try:
        committed = await fetch(set(tps))
    except Exception as exc:  # a lookup that fails must not leave the (paused) assignment stuck
        _log.warning("kafka progress lookup failed; committed offsets alone apply", error=repr(exc))
        return out
    for tp, meta in committed.items():
        text = getattr(meta, "metadata", "") or ""
        offset = getattr(meta, "offset", -1)
        if text and offset >= 0:
            out[tp] = out.get(tp, Progress()).merge(decode(offset, text))
    return out


def _ranges(offsets: Iterable[int]) -> str:
    spans: list[str] = []
    start = prev = None
    for o in offsets:
        if start is None:
            start = prev = o
        elif prev is not None and o == prev + 1:
            prev = o
        else:
            spans.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = o
    if start is not None:
        spans.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ",".join(spans)
