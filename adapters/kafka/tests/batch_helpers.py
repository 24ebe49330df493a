"""Shared pieces of the Kafka batch handler tests: payloads, publishing, a recording batch
handler, and the order and shape checks."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kafka_helpers import Progress
from pydantic import BaseModel

from meshlink import BatchContext
from meshlink.message import Message
from meshlink.transport.base import Outgoing, Transport


class Item(BaseModel):
    key: str
    seq: int


@dataclass
class Done:
    """One message handled by a batch handler (in the order handlers finished)."""

    id: str
    key: str
    seq: int
    partition: int
    offset: int
    member: str


def items(count: int, keys: int) -> list[Message]:
    """``count`` messages round-robin over ``keys`` keys, ``seq`` counting per key."""
    seq: dict[str, int] = defaultdict(int)
    out = []
    for i in range(count):
        key = f"k{i % keys}"
        body = Item(key=key, seq=seq[key]).model_dump_json().encode()
        out.append(Message(body=body, type="Item", key=key))
        seq[key] += 1
    return out


async def publish(t: Transport, topic: str, messages: list[Message], chunk: int = 250) -> None:
    for i in range(0, len(messages), chunk):
        await t.publish_many([Outgoing(destination=topic, message=m) for m in messages[i : i + chunk]])


def options(ns: str, partitions: int) -> dict[str, Any]:
    # delay topics and relay group per test: a fresh relay group each time (see the conformance suite)
    return {"partitions": partitions, "delay_topic_prefix": f"{ns}.delay", "delay_group": f"{ns}.delay"}


#: every batch a recorder received: (member, [(partition, offset), ...])
Shape = list[tuple[str, list[tuple[int, int]]]]


def recorder(
    done: list[Done],
    member: str,
    progress: Progress,
    rng: random.Random | None = None,
    max_delay: float = 0.0,
    shapes: Shape | None = None,
) -> Callable[..., Any]:
    """A batch handler body: small random work, then record each message of the batch."""

    async def handle(batch: list[Item], ctx: BatchContext) -> None:
        locs = [(int(d.location["partition"]), int(d.location["offset"])) for d in ctx.deliveries]
        if shapes is not None:
            shapes.append((member, locs))
        if rng is not None:
            await asyncio.sleep(rng.random() * max_delay)
        for x, d, (partition, offset) in zip(batch, ctx.deliveries, locs, strict=True):
            done.append(Done(d.message.id, x.key, x.seq, partition, offset, member))
        progress.poke()

    return handle


def shape_violations(shapes: Shape, max_size: int) -> list[str]:
    """A native Kafka batch: 1..max_size records of one partition, in offset order."""
    bad = []
    for member, locs in shapes:
        partitions = {p for p, _ in locs}
        offsets = [o for _, o in locs]
        if not 1 <= len(locs) <= max_size or len(partitions) != 1 or offsets != sorted(set(offsets)):
            bad.append(f"{member}: {locs[:5]}... ({len(locs)} records)")
    return bad


def order_violations(done: list[Done]) -> list[str]:
    """Per member and key, handled seqs must not go back, except for a message handled before
    (a re-handled duplicate after a rebalance or restart)."""
    seen: set[str] = set()
    top: dict[tuple[str, str], int] = {}
    bad = []
    for h in done:
        mk = (h.member, h.key)
        if mk in top and h.seq < top[mk] and h.id not in seen:
            bad.append(f"{h.member}: key {h.key} seq {h.seq} after {top[mk]} (first handling)")
        top[mk] = max(top.get(mk, -1), h.seq)
        seen.add(h.id)
    return bad


def first_handlings_in_order(done: list[Done]) -> list[str]:
    """The first handling of each message, per key, follows the produced order."""
    seen: set[str] = set()
    per_key: dict[str, list[int]] = defaultdict(list)
    for h in done:
        if h.id not in seen:
            seen.add(h.id)
            per_key[h.key].append(h.seq)
    return [f"key {k}: {seqs[:20]}..." for k, seqs in per_key.items() if seqs != list(range(len(seqs)))]
