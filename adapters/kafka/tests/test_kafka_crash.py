"""Member faults on a real broker: a member killed with SIGKILL mid-stream, and a handler that
holds its message for longer than ``max_poll_interval_ms``.

Faults are triggered on progress (after N handled messages, after the poll loop was seen
polling across two poll intervals), never on wall time.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from kafka_helpers import (
    Handled,
    Progress,
    Worker,
    committed_offsets,
    keyed_messages,
    publish_all,
    transport,
    unique,
)

from meshlink.transport.base import Delivery, SubscriptionSpec
from meshlink_kafka.consumer import KafkaSubscription
from meshlink_kafka.delivery import PartitionState

MEMBER = Path(__file__).with_name("kafka_crash_member.py")


def _ends(handled: Iterable[Handled], partitions: int) -> dict[int, int]:
    """Each partition's log end, from the records handled: the offsets must be ``0 .. end - 1``.

    (Not ``end_offsets()``: Tansu 0.6.0 answers ListOffsets(latest) with the base offset of the
    partition's last batch + 1, not its high watermark.)"""
    offsets: dict[int, set[int]] = {p: set() for p in range(partitions)}
    for h in handled:
        offsets[h.partition].add(h.offset)
    ends = {p: max(seen, default=-1) + 1 for p, seen in offsets.items()}
    for p, seen in offsets.items():
        assert seen == set(range(ends[p])), f"partition {p}: offsets handled are not 0..{ends[p] - 1}"
    return ends


def _assert_per_key_order(handled: Iterable[Handled], who: str) -> None:
    """Within one member, each key's handlings are in produced order, none twice."""
    per_key: dict[str, list[int]] = defaultdict(list)
    for h in handled:
        per_key[h.key].append(h.seq)
    for key, seqs in per_key.items():
        assert all(a < b for a, b in itertools.pairwise(seqs)), f"{who}: key {key} out of order"


# -- 1. kill -9 of a group member ------------------------------------------------------------

CRASH_MESSAGES = 3_000
CRASH_KEYS = 60
CRASH_PARTITIONS = 6
CRASH_PREFETCH = 16
CRASH_COMMIT_INTERVAL = 0.05
KILL_AFTER = 1_000


def _parse(line: bytes) -> Handled | None:
    fields = line.decode().split()
    if len(fields) != 6 or fields[0] != "HANDLED":
        return None
    _, mid, key, seq, partition, offset = fields
    return Handled(mid, key, int(seq), int(partition), int(offset), run=0)


@pytest.mark.chaos
async def test_kill_9_of_a_member_rehandles_only_what_its_last_commit_did_not_cover(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A child process consuming through KafkaTransport (commits every 50 ms) is killed with SIGKILL
    after 1,000 handled messages; a survivor in this process takes the group over once the dead
    member is evicted (session timeout) and consumes everything."""
    topic, group = unique("crash"), "shipping"
    opts = {"partitions": CRASH_PARTITIONS, "commit_interval": CRASH_COMMIT_INTERVAL}
    sent = keyed_messages(CRASH_MESSAGES, CRASH_KEYS)
    everything = {m.id for m in sent}
    child_handled: list[Handled] = []
    producer = transport(kafka_bootstrap, **opts)
    await producer.connect()
    try:
        await producer.declare(topic, group)  # the new group is seeded at the (empty) log end
        group_id = producer.settings.group_id(topic, group)

        # the member to be killed: a child process consuming through KafkaTransport
        with (tmp_path / "member.stderr").open("wb") as stderr:
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                str(MEMBER),
                kafka_bootstrap,
                topic,
                group,
                str(CRASH_PARTITIONS),
                str(CRASH_PREFETCH),
                str(CRASH_COMMIT_INTERVAL),
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
            )
        assert child.stdout is not None
        try:
            async with asyncio.timeout(60):
                while (line := await child.stdout.readline()) != b"READY\n":
                    assert line, f"member exited before joining: {(tmp_path / 'member.stderr').read_text()}"
            publishing = asyncio.create_task(publish_all(producer, topic, sent, chunk=500))
            async with asyncio.timeout(60):
                while len(child_handled) < KILL_AFTER:
                    line = await child.stdout.readline()
                    assert line, f"member exited early: {(tmp_path / 'member.stderr').read_text()}"
                    if (h := _parse(line)) is not None:
                        child_handled.append(h)
            child.send_signal(signal.SIGKILL)  # on progress: after KILL_AFTER handled lines
            killed_at = len(child_handled)
            async with asyncio.timeout(30):
                # lines written before the kill are still in the pipe: they were handled too
                while line := await child.stdout.readline():
                    if (h := _parse(line)) is not None:
                        child_handled.append(h)
                await child.wait()
            await publishing
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
        assert child.returncode == -signal.SIGKILL

        # nothing commits for the dead member any more: this is its last commit
        last = await committed_offsets(kafka_bootstrap, group_id, topic, CRASH_PARTITIONS)
        committed = {p: max(offset, 0) for p, offset in last.items()}  # the helper gives -1 for 0

        # the survivor joins the same group once the dead member is evicted (session timeout)
        progress = Progress()
        worker = Worker(run=1, on_progress=progress.poke)
        survivor = transport(kafka_bootstrap, **opts)
        await survivor.connect()
        loop = asyncio.get_running_loop()
        join_started = loop.time()
        try:
            spec = SubscriptionSpec(destination=topic, group=group, prefetch=CRASH_PREFETCH)
            sub = await survivor.subscribe(spec, worker)
            assert isinstance(sub, KafkaSubscription)
            joined_after = loop.time() - join_started

            def finished() -> bool:
                union = {h.id for h in worker.handled} | {h.id for h in child_handled}
                if not union >= everything:
                    return False
                # and every partition settled up to its end (or committed there before the kill)
                for p, end in _ends(worker.handled + child_handled, CRASH_PARTITIONS).items():
                    part = sub._parts.get(TopicPartition(topic, p))
                    position = part.tracker.position if part is not None else None
                    if position != end and not (position is None and committed[p] >= end):
                        return False
                return True

            await progress.until(finished, timeout=120)
            await worker.crash_handlers()
        finally:
            await survivor.close()
    finally:
        await producer.close()

    child_ids = {h.id for h in child_handled}
    survivor_ids = [h.id for h in worker.handled]
    # every message handled at least once across both members
    assert child_ids | set(survivor_ids) == everything, "a message was lost"
    ends = _ends(worker.handled + child_handled, CRASH_PARTITIONS)
    assert sum(ends.values()) == CRASH_MESSAGES
    # the survivor re-handled only records at or after the dead member's last commit
    rehandled = [h for h in worker.handled if h.id in child_ids]
    early = [h for h in rehandled if h.offset < committed[h.partition]]
    assert not early, f"re-handled before the last commit {committed}: {early[:5]}"
    # per key, each member handled in produced order; the survivor handled nothing twice
    _assert_per_key_order(child_handled, "killed member")
    _assert_per_key_order(worker.handled, "survivor")
    assert len(survivor_ids) == len(set(survivor_ids))
    assert KILL_AFTER <= len(child_handled) < CRASH_MESSAGES, "the kill did not land mid-stream"
    print(
        f"\nkill -9: {CRASH_MESSAGES} messages, {CRASH_KEYS} keys, {CRASH_PARTITIONS} partitions; "
        f"killed after {killed_at} handled lines ({len(child_handled)} handled by the killed member); "
        f"committed at the kill {dict(sorted(committed.items()))} of ends {dict(sorted(ends.items()))}; "
        f"survivor joined after {joined_after:.1f}s, handled {len(worker.handled)}; "
        f"duplicates: {len(rehandled)}"
    )


# -- 2. a handler slower than the poll interval ----------------------------------------------

SLOW_MESSAGES = 400
SLOW_KEYS = 10
SLOW_PARTITIONS = 3
POLL_INTERVAL_MS = 6_000
SLOW_OPTIONS: dict[str, Any] = {
    "partitions": SLOW_PARTITIONS,
    "max_poll_interval_ms": POLL_INTERVAL_MS,
    "rebalance_timeout_ms": 6_000,
    "max_buffered": 20,
    "commit_interval": 0.05,
}


@pytest.mark.chaos
async def test_a_handler_slower_than_the_poll_interval_does_not_lose_its_partition(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One handler holds its message for more than two poll intervals; the key's later records
    fill the buffer (``max_buffered``), so the poll loop holds, then pauses and keeps polling.

    Progress signal: ``AIOKafkaConsumer.getmany`` calls (each poll-loop iteration), wrapped to wake
    the test. ``max_poll_interval_ms`` is itself a clock quantity (aiokafka leaves the group once
    ``fetcher_idle_time``, time outside ``getmany``, reaches it), so the test waits, poll by poll,
    until a poll ended two intervals after the handler blocked, on the loop clock; no sleeping."""
    topic, group = unique("slow"), "reports"
    sent = keyed_messages(SLOW_MESSAGES, SLOW_KEYS)
    blocked_id = sent[2 * SLOW_KEYS].id  # key-0, seq 2: its later records pile up behind it
    loop = asyncio.get_running_loop()
    progress = Progress()
    release = asyncio.Event()
    handled: list[Handled] = []
    tasks: set[asyncio.Task[None]] = set()
    blocked: dict[str, Any] = {}
    polls: list[tuple[float, float, str | None]] = []  # (start, end, idle reason at the start)
    revoked: list[set[TopicPartition]] = []
    assigned: list[set[TopicPartition]] = []
    sub: KafkaSubscription | None = None

    async def handle(delivery: Delivery) -> None:
        loc = delivery.location
        tp = TopicPartition(topic, int(loc["partition"]))
        if delivery.message.id == blocked_id:
            assert sub is not None
            blocked.update(at=loop.time(), tp=tp, part=sub._parts[tp])
            progress.poke()
            await release.wait()
        key, _, seq = delivery.message.body.decode().partition(":")
        handled.append(Handled(delivery.message.id, key, int(seq), tp.partition, int(loc["offset"]), 0))
        await delivery.ack()
        progress.poke()

    async def on_delivery(delivery: Delivery) -> None:
        task = loop.create_task(handle(delivery))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    producer = transport(kafka_bootstrap, **SLOW_OPTIONS)
    consumer = transport(kafka_bootstrap, **SLOW_OPTIONS)
    await producer.connect()
    await consumer.connect()
    try:
        await producer.declare(topic, group)

        # instrument: every poll-loop iteration (getmany) and every commit wakes the test; the
        # class is patched so that the poll loop's very first getmany is seen too (no other
        # consumer in this test polls)
        real_getmany, real_commit = AIOKafkaConsumer.getmany, AIOKafkaConsumer.commit

        async def getmany(self: AIOKafkaConsumer, *args: Any, **kwargs: Any) -> Any:
            start, reason = loop.time(), sub.idle_reason() if sub is not None else None
            try:
                return await real_getmany(self, *args, **kwargs)
            finally:
                polls.append((start, loop.time(), reason))
                progress.poke()

        async def commit(self: AIOKafkaConsumer, *args: Any, **kwargs: Any) -> Any:
            try:
                return await real_commit(self, *args, **kwargs)
            finally:
                progress.poke()

        monkeypatch.setattr(AIOKafkaConsumer, "getmany", getmany)
        monkeypatch.setattr(AIOKafkaConsumer, "commit", commit)

        spec = SubscriptionSpec(destination=topic, group=group, prefetch=8)
        subscription = await consumer.subscribe(spec, on_delivery)
        assert isinstance(subscription, KafkaSubscription)
        sub = subscription
        client = sub.client
        generation = client._coordinator.generation
        parts_before: dict[TopicPartition, PartitionState] = dict(sub._parts)
        assert len(parts_before) == SLOW_PARTITIONS

        # every rebalance callback after the first assignment is recorded
        real_revoked, real_assigned = sub.on_revoked, sub.on_assigned

        async def on_revoked(tps: set[TopicPartition]) -> None:
            revoked.append(set(tps))
            await real_revoked(tps)

        async def on_assigned(tps: set[TopicPartition], listener: Any) -> None:
            assigned.append(set(tps))
            await real_assigned(tps, listener)

        monkeypatch.setattr(sub, "on_revoked", on_revoked)
        monkeypatch.setattr(sub, "on_assigned", on_assigned)

        await publish_all(producer, topic, sent)
        window = 2 * POLL_INTERVAL_MS / 1000

        def two_intervals_polled() -> bool:
            return "at" in blocked and any(end >= blocked["at"] + window for _, end, _ in polls)

        await progress.until(two_intervals_polled, timeout=window + 30)
        held_for = loop.time() - blocked["at"]
        in_window = [p for p in polls if p[1] >= blocked["at"]]
        reasons = Counter(reason for _, _, reason in in_window)
        # longest time outside getmany since the poll loop started (aiokafka's idle time, which
        # must stay below the poll interval), including the full-buffer hold
        idle = max(b[0] - a[1] for a, b in itertools.pairwise(polls))
        assert not revoked, f"revoked while the handler held its message: {revoked}"
        assert reasons["buffer full"], f"the buffer never filled behind the held message: {reasons}"
        assert idle < POLL_INTERVAL_MS / 1000, f"the poll loop stopped polling for {idle:.1f}s"
        release.set()

        def committed_to_the_end() -> bool:
            if len(handled) < SLOW_MESSAGES:
                return False
            ends = _ends(handled, SLOW_PARTITIONS)
            return all(
                (part := sub._parts.get(TopicPartition(topic, p))) is not None
                and part.committed is not None
                and part.committed[0] == end
                for p, end in ends.items()
            )

        await progress.until(committed_to_the_end, timeout=60)
        ends = _ends(handled, SLOW_PARTITIONS)
        assert sum(ends.values()) == SLOW_MESSAGES
        # no rebalance at all: same generation, same partition state objects, no callbacks
        assert not revoked, f"revoked: {revoked}"
        assert not assigned, f"re-assigned: {assigned}"
        assert sub.client is client, "the client was replaced"
        assert client._coordinator.generation == generation
        assert sub._parts == parts_before
        assert all(sub._parts[tp] is part for tp, part in parts_before.items())
        assert sub._parts[blocked["tp"]] is blocked["part"]
        assert blocked["part"].active
    finally:
        await consumer.close()
        await producer.close()

    counts = Counter(h.id for h in handled)
    assert set(counts) == {m.id for m in sent}, "a message was lost"
    assert all(n == 1 for n in counts.values()), "a message was handled twice"
    _assert_per_key_order(handled, "member")
    final = await committed_offsets(kafka_bootstrap, sub.group_id, topic, SLOW_PARTITIONS)
    assert {p: max(offset, 0) for p, offset in final.items()} == ends  # the helper gives -1 for 0
    print(
        f"\nslow handler: held {held_for:.1f}s with max_poll_interval {POLL_INTERVAL_MS / 1000:.0f}s; "
        f"{len(in_window)} polls meanwhile (idle reasons {dict(reasons)}), longest gap {idle:.1f}s; "
        f"{SLOW_MESSAGES} handled exactly once, committed {dict(sorted(ends.items()))}; duplicates: 0"
    )
