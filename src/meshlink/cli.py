"""The ``meshlink`` command."""

from __future__ import annotations

import importlib
import sys
from typing import Annotated

import typer

from meshlink._version import __version__
from meshlink.app import Mesh
from meshlink.errors import ConfigurationError, MeshlinkError
from meshlink.logs import configure

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


def main() -> None:
    """Entry point of the ``meshlink`` script."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
