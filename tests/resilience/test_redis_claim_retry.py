"""The Redis idempotency store recognises its own claim when a ``SET NX`` is sent again.

The fault: Redis executes the claim's ``SET NX``, then the connection resets before the reply
arrives. redis-py's own retry sends the ``SET NX`` again on a new connection, and that second
send finds the value the first one stored (127.0.0.1:6379).

redis-py retries only when its client is configured to (``Redis.from_url(url)`` alone retries
nothing): the store configures its client to, and these tests use the store's own client.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio
import redis.exceptions

from meshlink import Idempotency, Mesh, Retry
from meshlink.context import Context
from meshlink.resilience import Claim, RedisIdempotencyStore
from meshlink.testing import MeshHarness

pytestmark = pytest.mark.usefixtures("redis_url")


class LostSetReply:
    """Once armed, the next ``SET`` runs in Redis and then its connection resets before the reply."""

    def __init__(self) -> None:
        self.armed = False
        self.fired = 0

    def arm(self) -> None:
        self.armed = True

    def connection_class(self) -> type[redis.asyncio.Connection]:
        fault = self

        class Connection(redis.asyncio.Connection):
            command = ""

            async def send_command(self, *args: Any, **kwargs: Any) -> None:
                self.command = str(args[0]).upper() if args else ""
                await super().send_command(*args, **kwargs)

            async def read_response(self, *args: Any, **kwargs: Any) -> Any:
                response = await super().read_response(*args, **kwargs)  # Redis has executed it
                if fault.armed and self.command == "SET":
                    fault.armed = False
                    fault.fired += 1
                    raise redis.exceptions.ConnectionError("Connection reset by peer")
                return response

        return Connection


@pytest.fixture
def fault() -> LostSetReply:
    return LostSetReply()


@pytest.fixture
async def store(fault: LostSetReply, redis_url: str) -> AsyncIterator[RedisIdempotencyStore]:
    """The store as built, whose connections lose one ``SET`` reply when ``fault`` is armed."""
    s = RedisIdempotencyStore(redis_url, prefix=f"meshlink-test:{uuid.uuid4().hex}:")
    s._redis.connection_pool.connection_class = fault.connection_class()  # before any connection
    yield s
    await s.close()


async def claim_with_lost_reply(
    store: RedisIdempotencyStore, fault: LostSetReply, key: str, token: str
) -> Claim:
    fault.arm()
    claim = await store.claim(key, token=token, lease=300)
    assert fault.fired == 1, "the fault did not happen"
    return claim


async def test_a_claim_sent_again_with_its_own_token_is_claimed(store: RedisIdempotencyStore) -> None:
    assert await store.claim("k", token="mine", lease=300) is Claim.CLAIMED
    assert await store.claim("k", token="mine", lease=300) is Claim.CLAIMED  # a retry after a lost reply


async def test_a_claim_whose_set_reply_was_lost_and_retried_by_redis_py_is_claimed(
    store: RedisIdempotencyStore, fault: LostSetReply
) -> None:
    assert await claim_with_lost_reply(store, fault, "k", "mine") is Claim.CLAIMED


async def test_after_a_retried_claim_another_token_is_in_progress_and_a_completed_key_is_done(
    store: RedisIdempotencyStore, fault: LostSetReply
) -> None:
    assert await claim_with_lost_reply(store, fault, "k", "mine") is Claim.CLAIMED
    assert await store.claim("k", token="theirs", lease=300) is Claim.IN_PROGRESS
    await store.complete("k", token="mine", ttl=60)
    assert await store.claim("k", token="theirs", lease=300) is Claim.DONE
    assert await store.claim("k", token="mine", lease=300) is Claim.DONE


async def test_a_retried_claim_is_released_by_its_own_token(
    store: RedisIdempotencyStore, fault: LostSetReply
) -> None:
    assert await claim_with_lost_reply(store, fault, "k", "mine") is Claim.CLAIMED
    await store.release("k", token="mine")
    assert await store.claim("k", token="next", lease=300) is Claim.CLAIMED


async def test_a_handler_whose_claim_reply_was_lost_runs_once_and_is_not_dead_lettered(
    store: RedisIdempotencyStore, fault: LostSetReply, memory_url: str
) -> None:
    mesh = Mesh(memory_url, service="billing")
    runs = 0

    @mesh.handler("orders", idempotency=Idempotency(store=store), retry=Retry(attempts=1, redeliver=[]))
    async def charge(body: dict[str, int], ctx: Context) -> None:
        nonlocal runs
        runs += 1

    async with MeshHarness(mesh) as h:
        fault.arm()  # the next SET is the claim's
        await h.publish("orders", {"n": 1})
        await h.idle()
        assert fault.fired == 1
        assert h.dead_lettered == []
    assert runs == 1
