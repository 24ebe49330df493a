"""The Mesh: handlers, publishing, failures, middleware, context, configuration errors."""

from __future__ import annotations

from typing import Any

import pytest
import structlog
from pydantic import BaseModel

from meshlink import ConfigurationError, Context, Mesh, Message, Reject, TransportClosedError, plugins
from meshlink.errors import EncodeError
from meshlink.pipeline import Handler
from meshlink.resilience.deadletter import (
    ERROR_MESSAGE,
    ERROR_TYPE,
    FAILED_ATTEMPTS,
    HANDLER,
    ORIGINAL_DESTINATION,
    ORIGINAL_GROUP,
)
from meshlink.resilience.policy import Retry
from meshlink.testing import MeshHarness


class OrderPlaced(BaseModel):
    order_id: str
    amount: float


class PaymentCaptured(BaseModel):
    order_id: str


async def test_handler_receives_the_decoded_model_and_replies_through_ctx(memory_url: str) -> None:
    mesh = Mesh(memory_url, service="billing")

    @mesh.handler("orders.placed")
    async def charge(event: OrderPlaced, ctx: Context) -> None:
        await ctx.publish("payments.captured", PaymentCaptured(order_id=event.order_id), key=event.order_id)

    @mesh.handler("payments.captured", group="audit")
    async def audit(event: PaymentCaptured) -> None:
        pass

    async with MeshHarness(mesh) as h:
        sent = await h.publish("orders.placed", OrderPlaced(order_id="o-1", amount=9.5), correlation_id="c-9")
        await h.idle()
    assert h.payloads("charge") == [OrderPlaced(order_id="o-1", amount=9.5)]
    assert h.payloads("audit") == [PaymentCaptured(order_id="o-1")]
    reply = h.published_to("payments.captured")[0]
    assert reply.type == "PaymentCaptured"
    assert reply.source == "billing"
    assert reply.key == "o-1"
    assert reply.causation_id == sent.id
    assert reply.correlation_id == "c-9"


async def test_correlation_defaults_to_the_first_message_id(memory_url: str) -> None:
    mesh = Mesh(memory_url, service="s")

    @mesh.handler("a")
    async def relay(event: dict[str, Any], ctx: Context) -> None:
        await ctx.publish("b", event)

    @mesh.handler("b")
    async def sink(event: dict[str, Any]) -> None:
        pass

    async with MeshHarness(mesh) as h:
        first = await h.publish("a", {"n": 1})
        await h.idle()
    assert h.published_to("b")[0].correlation_id == first.id


async def test_raw_message_and_bytes_handlers_get_the_body_untouched(memory_url: str) -> None:
    mesh = Mesh(memory_url, service="s")
    seen: list[object] = []

    @mesh.handler("raw", group="env")
    async def envelope(message: Message) -> None:
        seen.append(message)

    @mesh.handler("raw", group="bytes")
    async def body(data: bytes) -> None:
        seen.append(data)

    async with MeshHarness(mesh) as h:
        await h.publish("raw", b"\x00\xffbinary", headers={"tenant": "t1"})
        await h.idle()
    message = next(x for x in seen if isinstance(x, Message))
    assert message.body == b"\x00\xffbinary"
    assert message.headers["tenant"] == "t1"
    assert b"\x00\xffbinary" in seen


async def test_schema_invalid_message_is_dead_lettered_with_reason_and_consumer_keeps_running(
    memory_url: str,
) -> None:
    mesh = Mesh(memory_url, service="billing")

    @mesh.handler("orders.placed")
    async def charge(event: OrderPlaced) -> None:
        pass

    async with MeshHarness(mesh) as h:
        bad = await h.publish("orders.placed", {"order_id": "o-1", "amount": "lots"})
        await h.publish("orders.placed", b"not json at all")
        await h.publish("orders.placed", OrderPlaced(order_id="o-2", amount=1))
        await h.idle()
        parked = mesh.transport.broker.peek("orders.placed.billing.dlq", "dlq")  # type: ignore[attr-defined]
    assert h.payloads() == [OrderPlaced(order_id="o-2", amount=1)]
    assert len(h.dead_lettered) == 2
    first = parked[0]
    assert first.id == bad.id
    assert first.body == bad.body
    assert first.headers[ERROR_TYPE] == "meshlink.errors.DecodeError"
    assert "amount" in first.headers[ERROR_MESSAGE]
    assert first.headers[HANDLER] == "charge"
    assert first.headers[FAILED_ATTEMPTS] == "1"
    assert first.headers[ORIGINAL_DESTINATION] == "orders.placed"
    assert first.headers[ORIGINAL_GROUP] == "billing"


async def test_failing_handler_is_dead_lettered_with_the_error(memory_url: str) -> None:
    mesh = Mesh(memory_url, service="s")

    @mesh.handler("jobs", dead_letter="jobs.parked", retry=Retry.none())
    async def work(job: dict[str, int]) -> None:
        if job["n"] == 2:
            raise Reject("n must not be 2")
        if job["n"] == 3:
            raise RuntimeError("database down")

    async with MeshHarness(mesh) as h:
        for n in range(1, 5):
            await h.publish("jobs", {"n": n})
        await h.idle()
        parked = mesh.transport.broker.peek("jobs.parked", "dlq")  # type: ignore[attr-defined]
    assert [p["n"] for p in h.payloads()] == [1, 4]  # type: ignore[index]
    assert [e.reason for e in h.dead_lettered] == [
        "permanent error: n must not be 2",
        "attempt budget of 1 exhausted: database down",
    ]
    assert [m.headers[ERROR_TYPE] for m in parked] == ["meshlink.errors.Reject", "builtins.RuntimeError"]


async def test_middleware_runs_first_listed_outermost_and_is_composed_once(memory_url: str) -> None:
    trace: list[str] = []
    built: list[str] = []

    def tag(name: str) -> Any:
        def middleware(next_: Handler) -> Handler:
            built.append(name)

            async def run(ctx: Context) -> None:
                trace.append(f"{name}>")
                await next_(ctx)
                trace.append(f"<{name}")

            return run

        return middleware

    mesh = Mesh(memory_url, service="s", middleware=[tag("mesh1"), tag("mesh2")])

    @mesh.handler("d", middleware=[tag("h1")])
    async def handle(event: dict[str, int]) -> None:
        trace.append("handler")

    async with MeshHarness(mesh) as h:
        for n in range(3):
            await h.publish("d", {"n": n})
        await h.idle()
    assert built == ["h1", "mesh2", "mesh1"]
    assert trace[:7] == ["mesh1>", "mesh2>", "h1>", "handler", "<h1", "<mesh2", "<mesh1"]
    assert len(trace) == 21


async def test_log_context_is_bound_per_message(memory_url: str) -> None:
    mesh = Mesh(memory_url, service="s")
    bound: list[dict[str, Any]] = []

    @mesh.handler("d")
    async def handle(event: dict[str, int]) -> None:
        bound.append(structlog.contextvars.get_contextvars())

    async with MeshHarness(mesh) as h:
        sent = await h.publish("d", {"n": 1}, type="Thing", correlation_id="corr")
        await h.idle()
    assert bound == [
        {
            "message_id": sent.id,
            "message_type": "Thing",
            "correlation_id": "corr",
            "handler": "handle",
            "attempt": 1,
        }
    ]
    assert structlog.contextvars.get_contextvars() == {}


async def test_passwords_in_the_url_never_reach_the_logs() -> None:
    mesh = Mesh("memory://admin:s3cret-pw@vault", service="s")

    @mesh.handler("d")
    async def handle(event: dict[str, int]) -> None:
        raise RuntimeError("boom")

    with structlog.testing.capture_logs() as logs:
        async with MeshHarness(mesh) as h:
            await h.publish("d", {"n": 1})
            await h.idle()
    assert logs, "expected log lines"
    assert "s3cret-pw" not in repr(logs)
    assert any("admin:***@" in str(entry.get("transport")) for entry in logs)


async def test_publish_before_start_is_a_clear_error(memory_url: str) -> None:
    mesh = Mesh(memory_url)
    with pytest.raises(TransportClosedError, match="not started"):
        await mesh.publish("d", {"n": 1})


async def test_envelope_headers_cannot_be_set_as_plain_headers(memory_url: str) -> None:
    mesh = Mesh(memory_url)
    with pytest.raises(EncodeError, match="correlation-id"):
        mesh.message({"n": 1}, headers={"correlation-id": "x"})


async def test_delayed_publish_runs_on_the_injected_clock(memory_url: str, fake_clock: Any) -> None:
    mesh = Mesh(memory_url, clock=fake_clock)

    @mesh.handler("d")
    async def handle(event: dict[str, int]) -> None:
        pass

    async with MeshHarness(mesh) as h:
        await h.publish("d", {"n": 1}, delay=30)
        await h.idle()
        assert h.handled == []
        await fake_clock.advance(30)
        await h.idle()
        assert h.payloads() == [{"n": 1}]


async def test_on_start_and_on_stop_hooks_run_in_order(memory_url: str) -> None:
    mesh = Mesh(memory_url)
    calls: list[str] = []

    @mesh.on_start
    async def hello() -> None:
        calls.append(f"start:{mesh.started}")

    @mesh.on_stop
    async def bye() -> None:
        calls.append(f"stop:{mesh.started}")

    async with mesh:
        pass
    assert calls == ["start:True", "stop:False"]


# -- configuration mistakes fail early, naming the setting ------------------------------------


def test_unknown_url_scheme_names_the_setting_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError) as err:
        Mesh("nats://localhost:4222")
    assert err.value.setting == "url"
    assert "nats" in str(err.value)
    assert "memory" in str(err.value), "lists the installed schemes"
    monkeypatch.setattr(plugins, "_entry_points", lambda group: {})
    with pytest.raises(ConfigurationError, match="install meshlink-rabbitmq"):
        Mesh("amqps://u:p@host/")


def test_handler_without_annotation_is_refused() -> None:
    mesh = Mesh("memory://")
    with pytest.raises(ConfigurationError, match="needs a type annotation") as err:

        @mesh.handler("d")
        async def handle(event, ctx):  # type: ignore[no-untyped-def]
            pass

    assert err.value.setting == "handler"


def test_sync_handler_is_refused() -> None:
    mesh = Mesh("memory://")
    with pytest.raises(ConfigurationError, match="async"):

        @mesh.handler("d")
        def handle(event: dict[str, int]) -> None:  # type: ignore[type-var]
            pass


def test_duplicate_handler_name_is_refused() -> None:
    mesh = Mesh("memory://")

    @mesh.handler("a")
    async def handle(event: dict[str, int]) -> None:
        pass

    with pytest.raises(ConfigurationError, match="exists already"):

        @mesh.handler("b", name="handle")
        async def other(event: dict[str, int]) -> None:
            pass


def test_two_handlers_on_one_destination_and_group_are_refused() -> None:
    mesh = Mesh("memory://", service="svc")

    @mesh.handler("a")
    async def one(event: dict[str, int]) -> None:
        pass

    with pytest.raises(ConfigurationError, match="another group") as err:

        @mesh.handler("a")
        async def two(event: dict[str, int]) -> None:
            pass

    assert err.value.setting == "group"


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [({"concurrency": 0}, "concurrency"), ({"concurrency": -3}, "concurrency")],
)
def test_bad_handler_settings_are_refused(kwargs: dict[str, Any], setting: str) -> None:
    mesh = Mesh("memory://")
    with pytest.raises(ConfigurationError) as err:
        mesh.handler("d", **kwargs)
    assert err.value.setting == setting


def test_bad_mesh_settings_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="drain_timeout"):
        Mesh("memory://", drain_timeout=-1)
    with pytest.raises(ConfigurationError, match="service"):
        Mesh("memory://", service="")
    with pytest.raises(ConfigurationError, match="transport_options"):
        Mesh("memory://", transport_options={"heartbeat": 3})
