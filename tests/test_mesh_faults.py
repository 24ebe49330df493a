"""The core under faults (Mesh start/stop, listeners, the envelope from foreign producers,
ctx.reply, handler types): each test failed before its fix."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from meshlink import ConfigurationError, Context, Mesh, Message
from meshlink.events import Event
from meshlink.resilience.policy import Retry
from meshlink.testing import MeshHarness
from meshlink.transport.base import DeliveryCallback, Subscription, SubscriptionSpec
from meshlink.transport.memory import MemoryTransport


class GatedConnect(MemoryTransport):
    """A memory transport whose connect() waits for a gate (a broker that is slow to answer)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.gate = asyncio.Event()
        self.connecting = asyncio.Event()
        self.subscribed: list[SubscriptionSpec] = []

    async def connect(self) -> None:
        self.connecting.set()
        await self.gate.wait()
        await super().connect()

    async def subscribe(self, spec: SubscriptionSpec, on_delivery: DeliveryCallback) -> Subscription:
        sub = await super().subscribe(spec, on_delivery)
        self.subscribed.append(spec)
        return sub


class NotPydanticable:
    def __init__(self, x: int) -> None:
        self.x = x


# -- lifecycle -------------------------------------------------------------------------------


async def test_stop_during_connect_leaves_nothing_running(memory_url: str) -> None:
    """stop() called while start() is still connecting must win: once both have returned,
    nothing runs. As reviewed, stop() sees ``_started`` False (it is set only after
    connect returns), does nothing, and start() then subscribes every handler."""
    transport = GatedConnect(memory_url)
    mesh = Mesh(transport, service="s")
    ran: list[object] = []

    @mesh.handler("a")
    async def handle(event: dict[str, int]) -> None:
        ran.append(event)

    starting = asyncio.create_task(mesh.start())
    await transport.connecting.wait()
    # the service is told to stop while the broker is still being reached
    stopping = asyncio.create_task(mesh.stop())
    await asyncio.sleep(0)  # stop() has been called (it may wait for the start to settle)
    transport.gate.set()
    async with asyncio.timeout(10):
        await stopping
        with contextlib.suppress(Exception):  # start() raising is fine; running is not
            await starting
    try:
        assert not mesh.started, "stop() during start was lost: the mesh runs after stop() returned"
        assert mesh.dispatchers == []
    finally:
        await mesh.stop()


async def test_failing_on_start_hook_leaves_nothing_running(memory_url: str) -> None:
    """start() that raises must leave nothing running: ``async with mesh`` never calls
    __aexit__ when __aenter__ raises, so the subscriptions and connection leak."""
    mesh = Mesh(memory_url, service="s")

    @mesh.handler("a")
    async def handle(event: dict[str, int]) -> None:
        pass

    @mesh.on_start
    async def warm_cache() -> None:
        raise RuntimeError("cache unreachable")

    with pytest.raises(RuntimeError, match="cache unreachable"):
        async with mesh:
            pass  # pragma: no cover - never entered
    try:
        assert not mesh.started, "start() raised but the mesh is still running"
        assert mesh.dispatchers == []
    finally:
        await mesh.stop()


# -- listeners -------------------------------------------------------------------------------


async def test_listener_removing_itself_does_not_hide_the_event_from_the_next_listener(
    memory_url: str,
) -> None:
    """A one-shot listener that removes itself must not make the listener after it miss the
    event: Mesh.emit iterates the live list, which shifts under it."""
    mesh = Mesh(memory_url, service="s")
    seen: list[Event] = []

    def once(event: Event) -> None:
        mesh.remove_listener(once)

    mesh.add_listener(once)
    mesh.add_listener(seen.append)

    @mesh.handler("a")
    async def handle(event: dict[str, int]) -> None:
        pass

    async with mesh:
        await mesh.publish("a", {"n": 1})
    assert "MessagePublished" in [type(e).__name__ for e in seen], "the second listener missed the event"


# -- context ---------------------------------------------------------------------------------


async def test_reply_without_reply_to_is_not_retried(memory_url: str) -> None:
    """ctx.reply on a message with no reply-to can never succeed on a retry (the headers do not
    change): the MessageError must be non-retryable and go straight to the dead-letter
    destination. As reviewed it is retried (MessageError.retryable is True), here 3 tries."""
    mesh = Mesh(memory_url, service="s")
    runs: list[int] = []

    @mesh.handler("q", retry=Retry(attempts=3, backoff=0.0, jitter=0.0, redeliver=[]))
    async def answer(event: dict[str, int], ctx: Context) -> None:
        runs.append(1)
        await ctx.reply({"ok": True})

    async with MeshHarness(mesh) as h:
        await h.publish("q", {"n": 1})
        await h.idle()
    assert [type(f.error).__name__ for f in h.failed] == ["MessageError"]
    assert len(h.dead_lettered) == 1
    assert h.dead_lettered[0].reason.startswith("permanent error"), h.dead_lettered[0].reason
    assert runs == [1], f"ran {len(runs)} times for an error no retry can fix"


# -- envelope ----------------------------------------------------------------------------------


def test_null_header_values_from_a_foreign_producer_count_as_missing() -> None:
    """Kafka record headers and AMQP field tables may carry a null value (aiokafka hands over
    ``None``). from_headers must treat it as a missing header (lenient contract: a missing id
    gets a fresh one), not as the text ``"None"``: every such message would share the id and
    idempotency key "None" (an idempotent consumer drops all but the first) and the
    correlation id "None"."""
    pairs = [("ce_id", None), ("ce_type", b"Thing"), ("correlation-id", None), ("causation-id", None)]
    first = Message.from_headers(pairs, b"{}")
    second = Message.from_headers(pairs, b"{}")
    assert first.id != "None"
    assert first.id != second.id
    assert first.idempotency_key != second.idempotency_key
    assert first.correlation_id is None
    assert first.causation_id is None


@pytest.mark.parametrize("encode", ["to_headers", "header_pairs"])
def test_empty_content_type_round_trips(encode: str) -> None:
    """Every field round-trips: a content type of "" is sent as "" and read back as
    "application/json" (from_headers uses ``or`` instead of a missing-header check)."""
    message = Message(body=b"\x00raw", content_type="")
    back = Message.from_headers(getattr(message, encode)(), message.body)
    assert back.content_type == message.content_type


# -- configuration ---------------------------------------------------------------------------


async def test_payload_type_pydantic_cannot_decode_is_a_configuration_error(memory_url: str) -> None:
    """A handler whose payload type pydantic cannot build a validator for is a configuration
    mistake: it must be a ConfigurationError (setting "handler"), at registration or start-up.
    It was pydantic's PydanticSchemaGenerationError."""
    mesh = Mesh(memory_url, service="s")

    @mesh.handler("a")
    async def handle(event: NotPydanticable) -> None:
        pass

    with pytest.raises(ConfigurationError) as err:
        await mesh.start()
    try:
        assert err.value.setting == "handler"
        assert not mesh.started
    finally:
        await mesh.stop()
