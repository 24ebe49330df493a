"""Conformance scenarios for what reaches a handler's dead-letter destination on the transport
under test: bad input with its reason, the publish-side body limit, and ``meshlink dlq``
list / show / replay. Split from :mod:`meshlink.testing.conformance_mesh`; the same
:class:`~meshlink.testing.conformance.TransportConformance` runs them.
"""

from __future__ import annotations

from pydantic import BaseModel

from meshlink.dlq import DeadLetterQueue
from meshlink.errors import EncodeError
from meshlink.events import Event, MessageDeadLettered
from meshlink.message import Message
from meshlink.resilience.deadletter import ERROR_MESSAGE, ERROR_TYPE, FAILED_ATTEMPTS
from meshlink.resilience.defaults import Policies
from meshlink.resilience.policy import Retry
from meshlink.testing._conformance_base import ConformanceBase, msg

__all__ = ["InputScenarios", "Item"]


class Item(BaseModel):
    """The payload of the bad-input scenario."""

    sku: str
    qty: int


class InputScenarios(ConformanceBase):
    """Bad input, the body limit and the dead-letter tooling, on the transport under test."""

    # -- bad input ----------------------------------------------------------------------------------

    async def test_bad_input_is_dead_lettered_with_its_reason_and_the_consumer_goes_on(self) -> None:
        mesh = self.new_mesh(service="bad", defaults=Policies(max_body_bytes=2048))
        good: list[Item] = []

        @mesh.handler(self.dest())
        async def take(item: Item) -> None:
            good.append(item)
            self.poke()

        await mesh.start()
        parked = await self.dead_letters(mesh, "take")
        t = await self.connect()
        bad = {
            "malformed": Message(body=b'{"sku": "a", "qty": ', type="Item"),
            "invalid": Message(body=b'{"sku": "a", "qty": "many"}', type="Item"),
            "content-type": Message(body=b"<item/>", content_type="application/xml"),
            "oversized": Message(body=b'{"sku": "' + b"x" * 4096 + b'", "qty": 1}'),
        }
        for m in bad.values():
            await t.publish(self.dest(), m)
        await t.publish(self.dest(), Message(body=b'{"sku": "ok", "qty": 2}', type="Item"))
        await parked.wait_count(4, self.timeout)
        await self.until(lambda: bool(good))
        assert good == [Item(sku="ok", qty=2)]
        reasons = {d.message.id: d.message.headers[ERROR_MESSAGE] for d in parked.deliveries}
        assert "invalid JSON" in reasons[bad["malformed"].id] or "EOF" in reasons[bad["malformed"].id]
        assert "qty" in reasons[bad["invalid"].id]
        assert "application/xml" in reasons[bad["content-type"].id]
        assert "over the 2048-byte limit" in reasons[bad["oversized"].id]
        assert all(d.message.headers[ERROR_TYPE] == "meshlink.errors.DecodeError" for d in parked.deliveries)
        assert all(d.message.headers[FAILED_ATTEMPTS] == "1" for d in parked.deliveries)

    # -- dead-letter operations ------------------------------------------------------------------

    async def test_a_body_over_the_limit_is_refused_on_publish_and_nothing_is_sent(self) -> None:
        mesh = self.new_mesh(service="big", defaults=Policies(max_body_bytes=1024))
        got: list[Item] = []

        @mesh.handler(self.dest())
        async def take(item: Item) -> None:
            got.append(item)
            self.poke()

        await mesh.start()
        big = Item(sku="x" * 2048, qty=1)
        refusals = (
            mesh.publish(self.dest(), big),
            mesh.publish_many(self.dest(), [Item(sku="a", qty=1), big]),
        )
        for refused in refusals:
            error: EncodeError | None = None
            try:
                await refused
            except EncodeError as exc:
                error = exc
            assert error is not None, "a body over max_body_bytes was published"
            assert "max_body_bytes" in str(error)
        await mesh.publish(self.dest(), Item(sku="ok", qty=2))
        await self.until(lambda: bool(got))
        assert got == [Item(sku="ok", qty=2)]  # nothing of the refused batch went out

    async def test_dead_letters_are_listed_shown_and_replayed_to_their_group(self) -> None:
        mesh = self.new_mesh(service="ops")
        broken = True
        runs: list[Message] = []

        @mesh.handler(self.dest(), retry=Retry.none())
        async def work(message: Message) -> None:
            runs.append(message)
            self.poke()
            if broken:
                raise RuntimeError(f"cannot handle {message.type}")

        dead: list[Event] = []
        mesh.add_listener(lambda e: dead.append(e) if isinstance(e, MessageDeadLettered) else None)
        await mesh.start()
        t = await self.connect()
        sent = [msg(1, type="A"), msg(2, type="A"), msg(3, type="B")]
        for m in sent:
            await t.publish(self.dest(), m)
        await self.until(lambda: len(dead) == 3)

        queue = DeadLetterQueue(t, mesh.handlers[0].dead_letter, quiet=0.5, clock=self.clock)
        listed = await queue.list(limit=3)
        assert sorted(m.id for m in listed) == sorted(m.id for m in sent)
        shown = await queue.show(sent[2].id, limit=3)
        assert shown is not None
        assert shown.headers[ERROR_MESSAGE] == "cannot handle B"

        broken = False
        runs.clear()
        replayed = await queue.replay(lambda m: m.type == "A", limit=3)
        assert replayed == 2
        await self.until(lambda: len(runs) == 2)
        assert sorted(m.id for m in runs) == sorted(m.id for m in sent[:2]), "same ids, replayed"
        assert all(m.attempt == 1 for m in runs), "budget starts afresh"
        assert all(ERROR_TYPE not in m.headers for m in runs), "failure headers are removed"
        left = await queue.list(limit=3)
        assert [m.id for m in left] == [sent[2].id]
