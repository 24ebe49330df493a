"""``meshlink saga``: list sagas and show one (state, history, diagram)."""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from meshlink.errors import ConfigurationError
from meshlink.saga.coordinator import SagaCoordinator
from meshlink.saga.store import SagaInstance, SagaStatus, SagaStore

__all__ = ["load_saga_store", "saga_app"]

saga_app = typer.Typer(help="Inspect sagas: list them, show one with its history.", no_args_is_help=True)

TargetArg = Annotated[str, typer.Argument(help="module:attribute naming a SagaCoordinator (or a SagaStore).")]


def load_saga_store(target: str) -> tuple[SagaStore, SagaCoordinator | None]:
    """Import ``module:attribute`` and return its saga store (and coordinator, if it is one)."""
    module_name, sep, attr = target.partition(":")
    if not sep:
        raise ConfigurationError("app", f"expected module:attribute, got {target!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError("app", f"cannot load {target!r}: {exc}") from exc
    if isinstance(obj, SagaCoordinator):
        return obj.store, obj
    if isinstance(obj, SagaStore):
        return obj, None
    raise ConfigurationError(
        "app", f"{target!r} is a {type(obj).__name__}, not a SagaCoordinator or SagaStore"
    )


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


@saga_app.command("list")
def list_sagas(
    target: TargetArg,
    status: Annotated[SagaStatus | None, typer.Option(help="Only sagas in this status.")] = None,
    limit: Annotated[int, typer.Option(help="Most sagas to show.")] = 100,
) -> None:
    """List sagas, newest first."""
    store, _ = load_saga_store(target)
    found = asyncio.run(store.find(status, limit))
    for inst in found:
        last = inst.history[-1] if inst.history else None
        typer.echo(
            f"{inst.saga_id}  {inst.name:<16} {inst.status.value:<12} {_when(inst.updated_at)}  "
            f"{(last.step + ':' if last and last.step else '') + (last.event if last else '')}"
        )
    typer.echo(f"{len(found)} saga(s)")


@saga_app.command("show")
def show_saga(target: TargetArg, saga_id: str) -> None:
    """Show one saga: status, state, history and its definition as a Mermaid diagram."""
    store, coordinator = load_saga_store(target)
    inst: SagaInstance | None = asyncio.run(store.load(saga_id))
    if inst is None:
        typer.echo(f"no saga {saga_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{inst.name} v{inst.definition_version}  {inst.saga_id}  {inst.status.value}")
    typer.echo(json.dumps(inst.state, indent=2, sort_keys=True))
    typer.echo("history:")
    for h in inst.history:
        detail = f"  ({h.detail})" if h.detail else ""
        typer.echo(f"  {_when(h.at)}  {h.step or '-':<20} {h.event}{detail}")
    if coordinator is not None and inst.name in coordinator.sagas:
        typer.echo("\n" + coordinator.sagas[inst.name].mermaid())
