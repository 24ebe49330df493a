"""Policies shared across processes through Redis (127.0.0.1:6379)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from meshlink import FakeClock, Mesh, Message
from meshlink.errors import CircuitOpenError
from meshlink.events import BreakerStateChanged, Event, MessageHandled
from meshlink.resilience import Breaker, CircuitBreaker, Claim, RedisIdempotencyStore, Retry

pytestmark = pytest.mark.usefixtures("redis_url")


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisIdempotencyStore]:
    s = RedisIdempotencyStore(redis_url, prefix=f"meshlink-test:{uuid.uuid4().hex}:")
    yield s
    await s.close()


async def test_redis_store_claims_once_and_remembers_success(store: RedisIdempotencyStore) -> None:
    assert await store.claim("k", token="a", lease=5) is Claim.CLAIMED
    assert await store.claim("k", token="b", lease=5) is Claim.IN_PROGRESS
    await store.release("k", token="b")  # not the holder: no effect
    assert await store.claim("k", token="c", lease=5) is Claim.IN_PROGRESS
    await store.complete("k", token="a", ttl=60)
    assert await store.claim("k", token="d", lease=5) is Claim.DONE


async def test_redis_store_release_lets_a_retry_claim(store: RedisIdempotencyStore) -> None:
    assert await store.claim("k", token="a", lease=5) is Claim.CLAIMED
    await store.release("k", token="a")
    assert await store.claim("k", token="b", lease=5) is Claim.CLAIMED


async def test_concurrent_claims_of_one_key_admit_exactly_one(store: RedisIdempotencyStore) -> None:
    results = await asyncio.gather(*(store.claim("hot", token=str(i), lease=5) for i in range(20)))
    assert results.count(Claim.CLAIMED) == 1


async def test_breaker_opened_by_one_replica_is_seen_by_another(redis_url: str) -> None:
    name = f"dep-{uuid.uuid4().hex[:8]}"
    config = Breaker(failures=2, reset="30s", name=name, redis_url=redis_url, watch_interval=0.05)
    clock = FakeClock()
    seen: list[Event] = []
    a = CircuitBreaker(config, name=name, clock=clock)
    b = CircuitBreaker(config, name=name, clock=clock, emit=seen.append)
    await a.start()
    await b.start()
    try:
        for _ in range(2):
            await a.record(ConnectionError("down"))
        assert a.state == "open"
        async with asyncio.timeout(10):
            while b.state != "open":
                await clock.advance(0.05)
                await asyncio.sleep(0.01)  # the watcher reads Redis in a worker thread
        assert any(isinstance(e, BreakerStateChanged) and e.state == "open" for e in seen)
        with pytest.raises(CircuitOpenError):
            b.before_call()
    finally:
        await a.stop()
        await b.stop()


async def test_duplicates_across_two_meshes_run_once_with_the_redis_store(
    store: RedisIdempotencyStore, memory_url: str
) -> None:
    from meshlink import Idempotency

    runs: list[str] = []
    outcomes: list[Event] = []
    changed = asyncio.Event()

    def record(event: Event) -> None:
        if isinstance(event, MessageHandled):
            outcomes.append(event)
            changed.set()

    meshes = [Mesh(memory_url, service="idem") for _ in range(2)]
    for mesh in meshes:
        mesh.add_listener(record)

        @mesh.handler("pay", idempotency=Idempotency(store=store), retry=Retry(attempts=20, backoff=0.01))
        async def pay(message: Message) -> None:
            runs.append(message.id)
            await asyncio.sleep(0.05)  # stands for a slow side effect while the duplicates arrive

    async with meshes[0], meshes[1]:
        for _ in range(3):
            await meshes[0].publish("pay", {"amount": 5}, idempotency_key="payment-42")
        async with asyncio.timeout(30):
            while len(outcomes) < 3:
                changed.clear()
                await changed.wait()
    assert len(runs) == 1, "three deliveries, one execution"
