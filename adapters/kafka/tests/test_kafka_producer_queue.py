"""Broker-free behaviour of the producer's queue: order, answers, deadlines, stopping.

The client is the stand-in of ``producer_fakes``: the broker paths are covered against the
real broker by the conformance suite; these are the orderings and failures a broker cannot
be made to show.
"""

from __future__ import annotations

import asyncio

import pytest
from producer_fakes import _Client, _producer, _record, _settle_all, _until

from meshlink.errors import PublishError, PublishTimeoutError


async def test_concurrent_publishes_reach_the_client_in_call_order_and_a_batch_answer_settles_them() -> None:
    client = _Client(capacity=10)
    producer = _producer(client)
    sends = [asyncio.ensure_future(producer.send(_record(b"%d" % i))) for i in range(50)]
    await _until(lambda: len(client.futures) == 5)
    assert client.sent == [b"%d" % i for i in range(50)]
    assert [len(batch.records) for _, _, batch in client.batches] == [10] * 5
    client.futures[2].set_exception(RuntimeError("broker said no"))
    for i, fut in enumerate(client.futures):
        if i != 2:
            fut.set_result(None)
    results = await asyncio.gather(*sends, return_exceptions=True)
    assert [i for i, r in enumerate(results) if r is not None] == list(range(20, 30))


async def test_a_record_too_large_for_a_request_fails_alone() -> None:
    client = _Client()
    producer = _producer(client, max_request_size=1_000)
    big = asyncio.ensure_future(producer.send(_record(b"x" * 2_000)))
    good = asyncio.ensure_future(producer.send(_record(b"good")))
    await _until(lambda: len(client.futures) == 1)
    client.futures[0].set_result(None)
    await good
    with pytest.raises(PublishError, match="max_request_size") as caught:
        await big
    assert caught.value.retryable is False
    assert client.sent == [b"good"]


async def test_a_topic_without_metadata_fails_only_its_own_records() -> None:
    client = _Client()
    client.unknown.add("gone")
    producer = _producer(client)
    results = await asyncio.gather(
        producer.send_many([_record(b"a", topic="gone"), _record(b"b"), _record(b"c", topic="gone")]),
        _settle_all(client, 1),
    )
    first, second, third = results[0]
    assert isinstance(first, PublishError)
    assert second is None
    assert isinstance(third, PublishError)


async def test_a_publish_that_times_out_while_queued_is_never_handed_to_the_client() -> None:
    client = _Client()
    client.held.add(0)  # the client holds the first batch: what comes next waits on the lane
    producer = _producer(client, publish_timeout=0.05)
    first = asyncio.ensure_future(producer.send(_record(b"first")))
    await _until(lambda: client.waiting == 1)
    second = asyncio.ensure_future(producer.send(_record(b"second")))
    with pytest.raises(PublishTimeoutError):
        await second
    with pytest.raises(PublishTimeoutError):
        await first  # its own deadline passed while the client held it: outcome unknown
    client.release(0)
    await _until(lambda: len(client.futures) == 1)
    third = asyncio.ensure_future(producer.send(_record(b"third")))
    await _until(lambda: len(client.futures) == 2)
    assert client.sent == [b"first", b"third"]  # the timed-out one waiting on the lane was left out
    client.futures[1].set_result(None)
    await third


async def test_send_many_past_its_deadline_reports_every_unanswered_record_as_unknown() -> None:
    client = _Client(capacity=2)
    producer = _producer(client, publish_timeout=0.05)
    many = asyncio.ensure_future(producer.send_many([_record(b"%d" % i) for i in range(4)]))
    await _until(lambda: len(client.futures) == 2)
    client.futures[0].set_result(None)  # the first batch answered, the second never
    results = await many
    assert results[:2] == [None, None]
    assert all(isinstance(r, PublishTimeoutError) for r in results[2:])


async def test_a_batch_the_client_drops_is_an_unknown_outcome_not_a_cancel() -> None:
    client = _Client()
    producer = _producer(client)
    send = asyncio.ensure_future(producer.send(_record(b"x")))
    await _until(lambda: len(client.futures) == 1)
    client.futures[0].cancel()
    with pytest.raises(PublishTimeoutError):
        await send
    assert not send.cancelled()


async def test_records_queued_when_the_producer_stops_fail_with_a_publish_error() -> None:
    client = _Client(capacity=1)
    client.held.add(0)
    producer = _producer(client)
    sends = [asyncio.ensure_future(producer.send(_record(b"%d" % i))) for i in range(3)]
    await _until(lambda: client.waiting == 1)  # the first is being handed over, two wait on the lane
    producer._producer = None  # stopped: the lane cannot hand over the rest
    client.release(0)
    await _until(lambda: len(client.futures) == 1)
    client.futures[0].set_result(None)
    results = await asyncio.gather(*sends, return_exceptions=True)
    assert results[0] is None
    assert all(isinstance(r, PublishError) for r in results[1:])


async def test_stop_fails_what_the_client_never_took_and_leaves_the_rest_to_the_broker() -> None:
    client = _Client(capacity=1)
    producer = _producer(client, close_timeout=0.05)
    first = asyncio.ensure_future(producer.send(_record(b"first")))
    await _until(lambda: len(client.futures) == 1)
    client.held.add(0)  # the first batch never goes out: the client waits with the second
    rest = [asyncio.ensure_future(producer.send(_record(b"%d" % i))) for i in range(3)]
    await _until(lambda: client.waiting == 1)  # one of them in a batch the client holds back
    await producer.stop()
    assert client.stopped
    results = await asyncio.gather(*rest, return_exceptions=True)
    assert all(isinstance(r, PublishError) and "before sending" in str(r) for r in results)
    assert not first.done()  # handed over: only the broker's answer settles it
    client.futures[0].set_result(None)
    await first
    with pytest.raises(PublishError, match="closed"):
        await producer.send(_record(b"late"))


async def test_two_stops_at_once_are_one_and_a_restarted_producer_sends_on_every_lane() -> None:
    client = _Client()
    client.held.add(0)
    producer = _producer(client, close_timeout=1e-9)  # stop cancels whatever still runs, at once
    send = asyncio.ensure_future(producer.send(_record(b"lost")))
    await _until(lambda: any(lane.task for r in producer._routes.values() for lane in r.lanes.values()))
    await asyncio.gather(producer.stop(), producer.stop())  # the second waits for the first
    assert client.stopped
    with pytest.raises(PublishError, match="before sending"):
        await send
    # every lane is free again, whether its task was cancelled before or after its first step
    assert producer._flusher is None
    assert all(lane.task is None for r in producer._routes.values() for lane in r.lanes.values())
    client.release(0)
    producer._producer = client  # what start() does with a new client
    producer._closing = False
    await asyncio.gather(producer.send(_record(b"after")), _settle_all(client, 1))
    assert client.sent == [b"after"]


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
