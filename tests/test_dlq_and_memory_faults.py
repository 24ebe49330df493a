"""Dead-letter tooling, the CLIs and the memory transport: each test failed before its fix.

(The DLQ order after list/show/replay, a bad --limit or --rate, an unreachable store, an
--error-type that matched other errors ending alike, the order of given-back deliveries.)
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from typer.testing import CliRunner

from meshlink.app import DEAD_LETTER_GROUP
from meshlink.cli import app
from meshlink.dlq import DeadLetterQueue
from meshlink.message import Message
from meshlink.resilience.deadletter import ERROR_TYPE, ORIGINAL_DESTINATION, ORIGINAL_GROUP
from meshlink.transport import MemoryTransport
from meshlink.transport.base import Delivery, SubscriptionSpec

runner = CliRunner()
GUARD = 5.0  # hang guard only


def _name() -> str:
    return f"review-{uuid.uuid4().hex[:10]}"


def _dead(n: int, *, dest: str = "orders", group: str = "billing", **headers: str) -> Message:
    return Message(
        body=str(n).encode(),
        type="T",
        headers={ORIGINAL_DESTINATION: dest, ORIGINAL_GROUP: group, **headers},
        attempt=5,
    )


async def _dlq_with(t: MemoryTransport, messages: list[Message], dlq: str = "orders.billing.dlq") -> None:
    await t.declare(dlq, DEAD_LETTER_GROUP)
    await t.declare("orders.billing.retry", "billing")
    for m in messages:
        await t.publish(dlq, m)


class _Collect:
    """An on_delivery callback that lets a test await a number of deliveries."""

    def __init__(self) -> None:
        self.got: list[Delivery] = []
        self._cond = asyncio.Condition()

    async def __call__(self, d: Delivery) -> None:
        self.got.append(d)
        async with self._cond:
            self._cond.notify_all()

    async def wait(self, n: int) -> None:
        async with self._cond:
            await asyncio.wait_for(self._cond.wait_for(lambda: len(self.got) >= n), GUARD)


# -- list / show / replay must not reorder the DLQ (memory) ------------------------------------


async def test_dlq_list_leaves_the_dead_letter_queue_in_its_order() -> None:
    t = MemoryTransport(f"memory://{_name()}")
    await t.connect()
    sent = [_dead(i) for i in range(5)]
    await _dlq_with(t, sent)
    q = DeadLetterQueue(t, "orders.billing.dlq", quiet=0.05)
    listed = await q.list()
    assert [m.id for m in listed] == [m.id for m in sent]
    after = t.broker.peek("orders.billing.dlq", DEAD_LETTER_GROUP)
    assert [m.id for m in after] == [m.id for m in sent], "dlq list reordered the dead-letter queue"
    await t.close()


async def test_dlq_list_with_a_limit_leaves_the_queue_in_its_order() -> None:
    t = MemoryTransport(f"memory://{_name()}")
    await t.connect()
    sent = [_dead(i) for i in range(5)]
    await _dlq_with(t, sent)
    q = DeadLetterQueue(t, "orders.billing.dlq", quiet=0.05)
    await q.list(limit=2)
    after = t.broker.peek("orders.billing.dlq", DEAD_LETTER_GROUP)
    assert [m.id for m in after] == [m.id for m in sent], "dlq list --limit reordered the dead-letter queue"
    await t.close()


async def test_replay_after_a_list_replays_in_dead_letter_order() -> None:
    """A list (or show) before a replay must not make the replay go newest-first."""
    t = MemoryTransport(f"memory://{_name()}")
    await t.connect()
    sent = [_dead(i) for i in range(4)]
    await _dlq_with(t, sent)
    q = DeadLetterQueue(t, "orders.billing.dlq", quiet=0.05)
    await q.show(sent[0].id)
    assert await q.replay() == 4
    replayed = t.broker.peek("orders.billing.retry", "billing")
    assert [m.id for m in replayed] == [m.id for m in sent], "replay went out of dead-letter order"
    assert all(m.attempt == 1 for m in replayed)
    await t.close()


async def test_filtered_replay_leaves_the_rest_in_order() -> None:
    t = MemoryTransport(f"memory://{_name()}")
    await t.connect()
    sent = [_dead(i) for i in range(5)]
    await _dlq_with(t, sent)
    q = DeadLetterQueue(t, "orders.billing.dlq", quiet=0.05)
    assert await q.replay(lambda m: m.id == sent[2].id) == 1
    left = t.broker.peek("orders.billing.dlq", DEAD_LETTER_GROUP)
    want = [m.id for m in sent if m.id != sent[2].id]
    assert [m.id for m in left] == want, "replay --id reordered what it left in the dead-letter queue"
    await t.close()


# -- memory transport: given-back messages keep their place (as RabbitMQ does) ------------


async def test_memory_nacked_deliveries_of_a_stopped_subscription_keep_their_order() -> None:
    """RabbitMQ requeues a nacked message at its original position; memory puts each at the
    head, so nacking held deliveries in order reverses them."""
    t = MemoryTransport(f"memory://{_name()}")
    await t.connect()
    first = _Collect()
    sub = await t.subscribe(SubscriptionSpec(destination="d", group="g", prefetch=5), first)
    sent = [Message(body=str(i).encode()) for i in range(5)]
    for m in sent:
        await t.publish("d", m)
    await first.wait(5)
    await sub.stop()
    for d in first.got:
        await d.nack(requeue=True)
    second = _Collect()
    await t.subscribe(SubscriptionSpec(destination="d", group="g", prefetch=5), second)
    await second.wait(5)
    assert all(d.redelivered for d in second.got)
    assert [d.message.id for d in second.got] == [m.id for m in sent], "nack requeue reordered the queue"
    await t.close()


async def test_memory_close_returns_unsettled_deliveries_in_their_order() -> None:
    """RabbitMQ gives unacked messages back in queue order on close; memory gives them back in
    the iteration order of a set."""
    name = _name()
    a = MemoryTransport(f"memory://{name}")
    await a.connect()
    held = _Collect()
    await a.subscribe(SubscriptionSpec(destination="d", group="g", prefetch=64), held)
    sent = [Message(body=str(i).encode()) for i in range(64)]
    for m in sent:
        await a.publish("d", m)
    await held.wait(64)
    b = MemoryTransport(f"memory://{name}")
    await b.connect()  # keeps the broker alive
    await a.close()
    back = b.broker.peek("d", "g")
    assert [m.id for m in back] == [m.id for m in sent], "close gave unsettled deliveries back out of order"
    await b.close()


# -- CLI: bad arguments and unreachable stores ----------------------------------------------


def _clean_failure(result: object) -> None:
    exit_code = result.exit_code  # type: ignore[attr-defined]
    exception = result.exception  # type: ignore[attr-defined]
    output = result.output  # type: ignore[attr-defined]
    assert exit_code == 2, (exit_code, output)
    assert exception is None or isinstance(exception, SystemExit), repr(exception)
    assert "error" in output.lower()  # ours ("error: ...") or the argument parser's usage error
    assert "Traceback" not in output


def test_cli_dlq_list_with_limit_zero_is_a_clear_error() -> None:
    result = runner.invoke(app, ["dlq", "list", "--broker", "memory://", "-d", "x.dlq", "--limit", "0"])
    _clean_failure(result)


def test_cli_dlq_replay_with_a_negative_limit_is_a_clear_error() -> None:
    result = runner.invoke(app, ["dlq", "replay", "--broker", "memory://", "-d", "x.dlq", "--limit", "-1"])
    _clean_failure(result)


def test_cli_dlq_replay_refuses_a_negative_rate() -> None:
    """``--rate -1`` silently replays at full speed (no limit) instead of refusing the argument."""
    result = runner.invoke(app, ["dlq", "replay", "--broker", "memory://", "-d", "x.dlq", "--rate", "-1"])
    assert result.exit_code != 0, result.output


def test_cli_outbox_stats_with_an_unreachable_store_is_a_clear_error() -> None:
    result = runner.invoke(app, ["outbox", "stats", "--store", "postgresql+asyncpg://u:p@127.0.0.1:1/db"])
    _clean_failure(result)


def test_cli_outbox_list_with_a_store_that_cannot_be_opened_is_a_clear_error(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'missing-dir' / 'x.db'}"
    result = runner.invoke(app, ["outbox", "list", "--store", url])
    _clean_failure(result)


def test_cli_outbox_list_before_db_init_is_a_clear_error(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"
    result = runner.invoke(app, ["outbox", "list", "--store", url])
    _clean_failure(result)
    assert "no such table: meshlink_outbox" in result.output
    assert "SELECT" not in result.output, "the statement is left out"
    assert "run `meshlink db init --store URL`" in result.output


# -- CLI: --error-type selects only that error -------------------------------------------------


def test_cli_replay_error_type_does_not_match_other_errors_ending_alike() -> None:
    """``--error-type ValueError`` also replays ``shop.errors.PriceValueError`` (suffix match)."""
    name = _name()
    plain = _dead(1, **{ERROR_TYPE: "builtins.ValueError"})
    other = _dead(2, **{ERROR_TYPE: "shop.errors.PriceValueError"})
    keeper = MemoryTransport(f"memory://{name}")  # holds the broker between the event loops

    async def setup() -> None:
        await keeper.connect()
        await _dlq_with(keeper, [plain, other])

    asyncio.run(setup())
    broker = keeper.broker
    result = runner.invoke(
        app,
        [
            "dlq",
            "replay",
            "--broker",
            f"memory://{name}",
            "-d",
            "orders.billing.dlq",
            "--error-type",
            "ValueError",
        ],
    )
    assert result.exit_code == 0, result.output
    replayed = [m.id for m in broker.peek("orders.billing.retry", "billing")]
    left = [m.id for m in broker.peek("orders.billing.dlq", DEAD_LETTER_GROUP)]
    assert replayed == [plain.id], "a PriceValueError was replayed by --error-type ValueError"
    assert left == [other.id]
