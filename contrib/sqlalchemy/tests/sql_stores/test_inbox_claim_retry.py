"""The inbox recognises its own claim when a lost COMMIT answer makes the bounded retry run it again.

The fault: the claim's transaction commits in the database, then the driver reports the
connection lost. :func:`~meshlink_sqlalchemy.engine.with_retry` runs the claim again, and that
second run finds the row the first one wrote.
"""

from __future__ import annotations

from typing import Any

import pytest

from meshlink import Idempotency, Mesh, Retry
from meshlink.context import Context
from meshlink.resilience.idempotency import Claim
from meshlink.testing import MeshHarness
from meshlink_sqlalchemy import SqlStores


class LostCommitAnswer:
    """Once armed, the next COMMIT reaches the database, then its connection drops.

    The error is the driver's own for a closed connection, so SQLAlchemy invalidates the
    connection as it would on a real drop; PostgreSQL's connection is really terminated.
    """

    def __init__(self, stores: SqlStores, monkeypatch: pytest.MonkeyPatch) -> None:
        self.dialect = stores.engine.dialect
        self._commit = self.dialect.do_commit
        self.armed = False
        self.fired = 0
        monkeypatch.setattr(self.dialect, "do_commit", self._do_commit)

    def arm(self) -> None:
        self.armed = True

    def _do_commit(self, dbapi_connection: Any) -> None:
        self._commit(dbapi_connection)  # committed: the row is in the database
        if not self.armed:
            return
        self.armed = False
        self.fired += 1
        dbapi = self.dialect.loaded_dbapi
        if self.dialect.name == "postgresql":
            dbapi_connection.driver_connection.terminate()  # asyncpg: close the socket now
            raise dbapi.InterfaceError("connection is closed")
        raise dbapi.OperationalError("connection closed")  # aiosqlite's words for a lost connection


@pytest.fixture
def lost_commit(stores: SqlStores, monkeypatch: pytest.MonkeyPatch) -> LostCommitAnswer:
    return LostCommitAnswer(stores, monkeypatch)  # monkeypatch puts do_commit back


async def claim_with_lost_commit(
    stores: SqlStores, lost_commit: LostCommitAnswer, key: str, token: str
) -> Claim:
    lost_commit.arm()
    claim = await stores.inbox.claim(key, token=token, lease=300)
    assert lost_commit.fired == 1, "the fault did not happen"
    return claim


async def test_a_claim_retried_after_its_commit_answer_was_lost_is_claimed_by_its_own_token(
    stores: SqlStores, lost_commit: LostCommitAnswer
) -> None:
    assert await claim_with_lost_commit(stores, lost_commit, "k", "mine") is Claim.CLAIMED


async def test_after_a_retried_claim_another_token_is_in_progress_and_a_completed_key_is_done(
    stores: SqlStores, lost_commit: LostCommitAnswer
) -> None:
    assert await claim_with_lost_commit(stores, lost_commit, "k", "mine") is Claim.CLAIMED
    assert await stores.inbox.claim("k", token="theirs", lease=300) is Claim.IN_PROGRESS
    await stores.inbox.complete("k", token="mine", ttl=60)
    assert await stores.inbox.claim("k", token="theirs", lease=300) is Claim.DONE
    assert await stores.inbox.claim("k", token="mine", lease=300) is Claim.DONE


async def test_a_retried_claim_is_released_by_its_own_token(
    stores: SqlStores, lost_commit: LostCommitAnswer
) -> None:
    assert await claim_with_lost_commit(stores, lost_commit, "k", "mine") is Claim.CLAIMED
    await stores.inbox.release("k", token="mine")
    assert await stores.inbox.claim("k", token="next", lease=300) is Claim.CLAIMED


async def test_a_handler_whose_claim_commit_answer_was_lost_runs_once_and_is_not_dead_lettered(
    stores: SqlStores, lost_commit: LostCommitAnswer, memory_url: str
) -> None:
    mesh = Mesh(memory_url, service="billing")
    runs = 0

    @mesh.handler(
        "orders", idempotency=Idempotency(store=stores.inbox), retry=Retry(attempts=1, redeliver=[])
    )
    async def charge(body: dict[str, int], ctx: Context) -> None:
        nonlocal runs
        runs += 1

    async with MeshHarness(mesh) as h:
        lost_commit.arm()  # the next commit is the claim's
        await h.publish("orders", {"n": 1})
        await h.idle()
        assert lost_commit.fired == 1
        assert h.dead_lettered == []
    assert runs == 1
