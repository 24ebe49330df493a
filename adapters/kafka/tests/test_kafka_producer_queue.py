"""Broker-free behaviour of the producer's queue of single publishes (the flusher).

The client here is a stand-in that records what it is handed and lets the test decide
each delivery's outcome: the broker paths are covered against the real broker by the
conformance suite; these are the orderings and failures a broker cannot be made to show.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from meshlink.errors import PublishError, PublishTimeoutError
from meshlink_kafka import KafkaSettings
from meshlink_kafka.producer import Producer, Record


class _Client:
    """Records sends in order; each returns a delivery future the test settles."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.futures: list[asyncio.Future[object]] = []
        self.refuse: set[bytes] = set()
        self.gate = asyncio.Event()
        self.gate.set()

    async def send(
        self, topic: str, value: bytes, *, key: bytes | None, headers: Any
    ) -> asyncio.Future[object]:
        await self.gate.wait()  # a full batch makes a real client wait here
        if value in self.refuse:
            raise ValueError(f"refused {value!r}")
        self.sent.append(value)
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self.futures.append(fut)
        return fut


def _producer(client: _Client, publish_timeout: float = 30.0) -> Producer:
    producer = Producer(KafkaSettings(publish_timeout=publish_timeout))
    producer._producer = client  # type: ignore[assignment]
    return producer


def _record(value: bytes) -> Record:
    return Record("t", None, value, [], value.decode())


async def _until(condition: Any) -> None:
    """Let the event loop run until ``condition()`` holds (progress, not time)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


async def test_concurrent_publishes_reach_the_client_in_call_order_and_each_gets_its_own_ack() -> None:
    client = _Client()
    producer = _producer(client)
    sends = [asyncio.ensure_future(producer.send(_record(b"%d" % i))) for i in range(50)]
    await _until(lambda: len(client.futures) == 50)
    assert client.sent == [b"%d" % i for i in range(50)]
    client.futures[7].set_exception(RuntimeError("broker said no"))
    for i, fut in enumerate(client.futures):
        if i != 7:
            fut.set_result(None)
    results = await asyncio.gather(*sends, return_exceptions=True)
    assert [i for i, r in enumerate(results) if r is not None] == [7]


async def test_a_record_the_client_refuses_fails_only_its_own_publish() -> None:
    client = _Client()
    client.refuse.add(b"bad")
    producer = _producer(client)
    bad = asyncio.ensure_future(producer.send(_record(b"bad")))
    good = asyncio.ensure_future(producer.send(_record(b"good")))
    await _until(lambda: len(client.futures) == 1)
    client.futures[0].set_result(None)
    await good
    with pytest.raises(ValueError, match="refused"):
        await bad


async def test_a_publish_that_times_out_while_queued_is_never_handed_to_the_client() -> None:
    client = _Client()
    client.gate.clear()  # the client blocks on the first record: the rest stay queued
    producer = _producer(client, publish_timeout=0.05)
    first = asyncio.ensure_future(producer.send(_record(b"first")))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(producer.send(_record(b"second")))
    with pytest.raises(PublishTimeoutError):
        await second
    client.gate.set()
    await _until(lambda: len(client.futures) == 1)
    assert client.sent == [b"first"]  # the timed-out one was skipped
    with pytest.raises(PublishTimeoutError):
        await first  # its own deadline passed while the client held it


async def test_a_delivery_the_client_drops_is_an_unknown_outcome_not_a_cancel() -> None:
    client = _Client()
    producer = _producer(client)
    send = asyncio.ensure_future(producer.send(_record(b"x")))
    await _until(lambda: len(client.futures) == 1)
    client.futures[0].cancel()
    with pytest.raises(PublishTimeoutError):
        await send
    assert not send.cancelled()


async def test_records_queued_when_the_producer_stops_fail_with_a_publish_error() -> None:
    client = _Client()
    client.gate.clear()
    producer = _producer(client)
    sends = [asyncio.ensure_future(producer.send(_record(b"%d" % i))) for i in range(3)]
    await _until(lambda: producer._flusher is not None)
    await asyncio.sleep(0)
    producer._producer = None  # stopped: the flusher cannot hand over the rest
    client.gate.set()
    await _until(lambda: len(client.futures) == 1)
    client.futures[0].set_result(None)
    results = await asyncio.gather(*sends, return_exceptions=True)
    assert results[0] is None
    assert all(isinstance(r, PublishError) for r in results[1:])


async def test_answered_publishes_leave_the_deadline_queue_and_one_timer_serves_them_all() -> None:
    """The deadlines of single publishes share one timer, and answered ones are forgotten
    (a steady stream of publishes holds no more than the unanswered ones)."""
    client = _Client()
    producer = _producer(client)
    for i in range(100):
        send = asyncio.ensure_future(producer.send(_record(b"%d" % i)))
        await _until(lambda n=i + 1: len(client.futures) == n)
        client.futures[i].set_result(None)
        await send
    deadlines = producer._deadlines
    assert deadlines is not None
    assert len(deadlines) <= 1  # answered ones have left
    assert deadlines._armed  # the one timer, armed for the oldest deadline


async def test_one_unanswered_publish_does_not_make_the_deadline_queue_keep_the_answered_ones() -> None:
    client = _Client()
    producer = _producer(client)
    stuck = asyncio.ensure_future(producer.send(_record(b"stuck")))
    await _until(lambda: len(client.futures) == 1)  # never answered: stays at the front
    for i in range(10_000):
        send = asyncio.ensure_future(producer.send(_record(b"%d" % i)))
        await _until(lambda n=i + 2: len(client.futures) == n)
        client.futures[i + 1].set_result(None)
        await send
    deadlines = producer._deadlines
    assert deadlines is not None
    assert len(deadlines) <= 4_096
    assert not stuck.done()
    client.futures[0].set_result(None)
    await stuck
