"""The ``meshlink`` command."""

from __future__ import annotations

import asyncio
import importlib
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer

from meshlink._version import __version__
from meshlink.app import Mesh
from meshlink.check import check_mesh
from meshlink.dlq import DeadLetterQueue
from meshlink.errors import ConfigurationError, MeshlinkError
from meshlink.logs import configure
from meshlink.message import H_ATTEMPT, H_IDEMPOTENCY_KEY, Message
from meshlink.outbox.cli import db_app, outbox_app, positive
from meshlink.resilience.deadletter import ERROR_MESSAGE, ERROR_TYPE, FAILED_ATTEMPTS
from meshlink.saga.cli import saga_app
from meshlink.transport.registry import transport_from_url

T = TypeVar("T")

__all__ = ["app", "load_mesh", "main"]

app = typer.Typer(
    name="meshlink",
    help="Run and operate meshlink services.",
    no_args_is_help=True,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"meshlink {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """meshlink: one messaging API over RabbitMQ, Kafka and memory."""


def load_mesh(target: str) -> Mesh:
    """Import ``module:attribute`` and return the :class:`~meshlink.Mesh` it names.

    Raises:
        ConfigurationError: the target is malformed, cannot be imported, or is not a Mesh.
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigurationError("app", f"expected module:attribute, got {target!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError("app", f"cannot import {module_name!r}: {exc}") from exc
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ConfigurationError("app", f"{module_name!r} has no attribute {attr!r}") from exc
    if callable(obj) and not isinstance(obj, Mesh):
        obj = obj()
    if not isinstance(obj, Mesh):
        raise ConfigurationError("app", f"{target!r} is a {type(obj).__name__}, not a meshlink.Mesh")
    return obj


@app.command()
def run(
    target: Annotated[str, typer.Argument(help="The mesh to run, as module:attribute (or a factory).")],
    log_level: Annotated[str, typer.Option(help="Log level.")] = "INFO",
    json_logs: Annotated[bool, typer.Option("--json-logs", help="Log JSON lines.")] = False,
) -> None:
    """Run a mesh until SIGINT or SIGTERM, then drain and stop."""
    configure(log_level, json=json_logs)
    try:
        mesh = load_mesh(target)
        mesh.run()
    except MeshlinkError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


@app.command()
def check(
    target: Annotated[str, typer.Argument(help="The mesh to check, as module:attribute.")],
) -> None:
    """Print each handler's effective policy and broker mapping; fail on contradictions."""
    try:
        mesh = load_mesh(target)
        reports = check_mesh(mesh)
    except MeshlinkError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"{mesh.service} on {mesh.transport.describe()}: {len(reports)} handler(s)")
    failed = False
    for report in reports:
        typer.echo(f"\n{report.spec.name}")
        for line in report.lines:
            typer.echo(f"  {line}")
        for warning in report.warnings:
            typer.echo(f"  warning: {warning}")
        for problem in report.problems:
            typer.echo(f"  PROBLEM: {problem}")
            failed = True
    if failed:
        raise typer.Exit(1)


app.add_typer(saga_app, name="saga")
app.add_typer(outbox_app, name="outbox")
app.add_typer(db_app, name="db")

dlq_app = typer.Typer(
    help="List, inspect and replay dead-lettered messages (any broker).", no_args_is_help=True
)
app.add_typer(dlq_app, name="dlq")

BrokerOpt = Annotated[str, typer.Option("--broker", help="Broker URL, e.g. amqp://guest:guest@localhost/.")]
DestOpt = Annotated[str, typer.Option("--destination", "-d", help="Dead-letter destination.")]
LimitOpt = Annotated[int, typer.Option(min=1, help="Most messages to look at.")]


async def _with_dlq(broker: str, destination: str, work: Callable[[DeadLetterQueue], Awaitable[T]]) -> T:
    transport = transport_from_url(broker)
    await transport.connect()
    try:
        return await work(DeadLetterQueue(transport, destination))
    finally:
        await transport.close()


def _run_dlq(broker: str, destination: str, work: Callable[[DeadLetterQueue], Awaitable[T]]) -> T:
    configure("WARNING")
    try:
        return asyncio.run(_with_dlq(broker, destination, work))
    except MeshlinkError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def _summary(message: Message) -> str:
    h = message.headers
    return (
        f"{message.id}  {message.type or '-':<20} attempts={h.get(FAILED_ATTEMPTS, '?'):<3} "
        f"{h.get(ERROR_TYPE, '?')}: {h.get(ERROR_MESSAGE, '')[:80]}"
    )


@dlq_app.command("list")
def dlq_list(broker: BrokerOpt, destination: DestOpt, limit: LimitOpt = 100) -> None:
    """List dead-lettered messages (they stay where they are)."""
    messages = _run_dlq(broker, destination, lambda q: q.list(limit))
    for message in messages:
        typer.echo(_summary(message))
    typer.echo(f"{len(messages)} message(s) in {destination}")


@dlq_app.command("show")
def dlq_show(broker: BrokerOpt, destination: DestOpt, message_id: str) -> None:
    """Show one dead-lettered message: envelope, failure headers and body."""
    message = _run_dlq(broker, destination, lambda q: q.show(message_id))
    if message is None:
        typer.echo(f"no message {message_id} in {destination}", err=True)
        raise typer.Exit(1)
    typer.echo(_details(message))


def _details(message: Message) -> str:
    """Every envelope field (including those left off the wire at their default), then the body."""
    shown = message.to_headers()
    shown.setdefault(H_ATTEMPT, str(message.attempt))
    shown.setdefault(H_IDEMPOTENCY_KEY, message.idempotency_key)
    lines = [f"{key}: {value}" for key, value in sorted(shown.items())]
    return "\n".join([*lines, "", message.body.decode("utf-8", errors="replace")])


@dlq_app.command("replay")
def dlq_replay(
    broker: BrokerOpt,
    destination: DestOpt,
    message_id: Annotated[str | None, typer.Option("--id", help="Replay only this message.")] = None,
    type_: Annotated[str | None, typer.Option("--type", help="Replay only messages of this type.")] = None,
    error_type: Annotated[
        str | None, typer.Option("--error-type", help="Replay only messages that failed with this error.")
    ] = None,
    rate: Annotated[float | None, typer.Option(callback=positive, help="Most messages per second.")] = None,
    limit: LimitOpt = 10_000,
) -> None:
    """Replay dead-lettered messages to the group they failed in (same id, fresh budget)."""

    def choose(m: Message) -> bool:
        return (
            (message_id is None or m.id == message_id)
            and (type_ is None or m.type == type_)
            and (error_type is None or _same_error(m.headers.get(ERROR_TYPE, ""), error_type))
        )

    with typer.progressbar(length=limit, label="replaying", show_pos=True) as bar:
        count = _run_dlq(
            broker,
            destination,
            lambda q: q.replay(choose, limit=limit, rate=rate, progress=lambda _: bar.update(1)),
        )
    typer.echo(f"replayed {count} message(s) from {destination}")


def _same_error(recorded: str, wanted: str) -> bool:
    """``wanted`` names the recorded error type: in full, or by its unqualified name
    (``ValueError`` matches ``builtins.ValueError``, not ``shop.PriceValueError``)."""
    return recorded == wanted or recorded.endswith("." + wanted)


def main() -> None:
    """Entry point of the ``meshlink`` script."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
