"""``meshlink outbox …`` and ``meshlink db …``: run the relay, inspect the outbox, create tables."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import structlog
import typer

from meshlink.errors import MeshlinkError
from meshlink.logs import configure, redact_url
from meshlink.outbox.registry import stores_from_url
from meshlink.outbox.relay import Relay
from meshlink.outbox.store import Stores
from meshlink.transport.registry import transport_from_url

__all__ = ["db_app", "outbox_app", "serve_relay"]

T = TypeVar("T")
_log = structlog.get_logger("meshlink.outbox")

outbox_app = typer.Typer(help="Run the outbox relay and inspect the outbox.", no_args_is_help=True)
db_app = typer.Typer(help="Create the tables of a SQL store.", no_args_is_help=True)


def positive(value: float | None) -> float | None:
    """Option callback: a number of seconds or a rate must be above zero."""
    if value is not None and not value > 0:
        raise typer.BadParameter(f"must be > 0, got {value}")
    return value


StoreOpt = Annotated[str, typer.Option("--store", help="Store URL, e.g. postgresql+asyncpg://user@host/db.")]


def _run(work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    try:
        return asyncio.run(work())
    except MeshlinkError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    except Exception as exc:  # a store that cannot be reached or opened (driver errors): no traceback
        # the driver's first line; SQLAlchemy appends the whole statement and a link after it
        text = str(exc).splitlines()[0] if str(exc) else ""
        typer.echo(f"error: {type(exc).__name__}: {text}", err=True)
        if _MISSING_TABLE.search(text):
            typer.echo(
                "hint: the store has no outbox tables yet: run `meshlink db init --store URL`", err=True
            )
        raise typer.Exit(2) from exc


_INIT_HINT = "hint: the store has no outbox tables yet: run `meshlink db init --store URL`"
# SQLite's and PostgreSQL's words for a table that is not there
_MISSING_TABLE = re.compile(r"no such table|relation .* does not exist|UndefinedTable", re.IGNORECASE)


async def _with_stores(url: str, work: Callable[[Stores], Awaitable[T]]) -> T:
    stores = stores_from_url(url)
    try:
        return await work(stores)
    finally:
        await stores.close()


async def serve_relay(relay: Relay, stores: Stores, *, health_interval: float) -> None:
    """Run ``relay`` until SIGINT/SIGTERM, logging a health line every ``health_interval`` seconds."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    assert relay.transport is not None
    await relay.transport.connect()
    try:
        await relay.start()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), health_interval)
            if not relay.running and not stop.is_set():
                raise MeshlinkError("the relay loop ended unexpectedly")
            with contextlib.suppress(Exception):
                s = await relay.stats()
                c = relay.counters
                _log.info(
                    "outbox relay health",
                    relay=relay.name,
                    paused=relay.paused,
                    lag=round(s.lag, 3),
                    pending=s.pending,
                    in_flight=s.in_flight,
                    failed=s.failed,
                    published=c.published,
                    batches=c.batches,
                    broker_outages=c.broker_outages,
                    store_errors=c.store_errors,
                )
        _log.info("stop requested; finishing the batch in hand", relay=relay.name)
    finally:
        await relay.stop()
        await relay.transport.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


@outbox_app.command("relay")
def relay_command(
    store: StoreOpt,
    broker: Annotated[str, typer.Option("--broker", help="Broker URL, e.g. amqp://guest:guest@localhost/.")],
    batch_size: Annotated[int, typer.Option(help="Most rows claimed at once.")] = 500,
    poll_interval: Annotated[str, typer.Option(help="Longest wait between claims.")] = "1s",
    lease: Annotated[str, typer.Option(help="How long a claim lasts.")] = "30s",
    max_attempts: Annotated[int, typer.Option(help="Failed attempts before a row is moved aside.")] = 10,
    retention: Annotated[str, typer.Option(help="How long sent rows are kept.")] = "1h",
    health_interval: Annotated[
        float, typer.Option(callback=positive, help="Seconds between health lines.")
    ] = 10.0,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "INFO",
    json_logs: Annotated[bool, typer.Option("--json-logs", help="Log JSON lines.")] = False,
) -> None:
    """Publish the outbox's committed rows to the broker until SIGINT or SIGTERM."""
    configure(log_level, json=json_logs)

    async def work() -> None:
        stores = stores_from_url(store)
        try:
            relay = Relay(
                stores.outbox,
                transport_from_url(broker),
                batch_size=batch_size,
                poll_interval=poll_interval,
                lease=lease,
                max_attempts=max_attempts,
                retention=retention,
            )
            _log.info("outbox relay starting", store=redact_url(store), broker=redact_url(broker))
            await serve_relay(relay, stores, health_interval=health_interval)
        finally:
            await stores.close()

    _run(work)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


@outbox_app.command("list")
def list_command(
    store: StoreOpt,
    failed: Annotated[
        bool, typer.Option("--failed", help="List the rows moved aside, with the reason.")
    ] = False,
    limit: Annotated[int, typer.Option(help="Most rows to list.")] = 100,
) -> None:
    """List the oldest unsent rows, or the rows moved aside (``--failed``)."""

    async def work(stores: Stores) -> None:
        if failed:
            rows = await stores.outbox.list_failed(limit=limit)
            for f in rows:
                typer.echo(
                    f"{f.id}  {_when(f.failed_at)}  {f.destination}  key={f.key or '-'}  "
                    f"attempts={f.attempts}  {f.reason[:120]}"
                )
            typer.echo(f"{len(rows)} failed row(s)")
            return
        pending = await stores.outbox.list_pending(limit=limit)
        for p in pending:
            typer.echo(
                f"{p.id}  {_when(p.created_at)}  {p.destination}  key={p.key or '-'}  attempts={p.attempts}"
            )
        typer.echo(f"{len(pending)} pending row(s)")

    _run(lambda: _with_stores(store, work))


@outbox_app.command("stats")
def stats_command(store: StoreOpt) -> None:
    """Print counts and lag (age of the oldest unsent row)."""

    async def work(stores: Stores) -> None:
        import time

        s = await stores.outbox.stats(now=time.time())
        typer.echo(
            f"pending={s.pending} in_flight={s.in_flight} retrying={s.retrying} sent={s.sent} "
            f"failed={s.failed} lag={s.lag:.3f}s"
        )

    _run(lambda: _with_stores(store, work))


@db_app.command("init")
def init_command(store: StoreOpt) -> None:
    """Create the store's tables (and PostgreSQL's notification trigger); safe to run again."""

    async def work(stores: Stores) -> None:
        await stores.init()
        typer.echo(f"tables ready in {redact_url(store)}")

    _run(lambda: _with_stores(store, work))
