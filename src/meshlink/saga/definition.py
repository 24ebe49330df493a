"""Declaring a saga: a named, versioned sequence of steps over a typed state.

::

    checkout = Saga("checkout", OrderState, version=1)

    checkout.remote(
        "reserve-stock",
        send=lambda s: Command("inventory.reserve", ReserveStock(order_id=s.order_id)),
        success=StockReserved,
        on_success=lambda s, r: s.model_copy(update={"reservation_id": r.reservation_id}),
        failure=OutOfStock,
        timeout="30s",
        compensate=lambda s: Command("inventory.release", ReleaseStock(order_id=s.order_id)),
    )
    checkout.local("charge", charge_card, compensate=refund_card, retry=Retry(attempts=3, redeliver=()))

A **local** step is an async function of the state the coordinator calls (under a
retry policy) and that returns the new state. A **remote** step sends a command
and waits for a success or failure reply of the given types, up to a timeout.
A step with side effects names a compensation: a local function, or a command
sent when the saga compensates. Definitions are checked when declared.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from meshlink.errors import ConfigurationError
from meshlink.resilience.policy import Retry, parse_duration

__all__ = ["Command", "LocalStep", "RemoteStep", "Saga", "Step"]

S = TypeVar("S", bound=BaseModel)
R = TypeVar("R", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class Command:
    """A message a saga sends: where, what, and an optional key."""

    destination: str
    payload: object
    key: str | None = None

    def __post_init__(self) -> None:
        # refused where the command is made: a store that refuses it later would fail every
        # saga saved in the same batch with it
        if not isinstance(self.destination, str) or not self.destination:
            raise ConfigurationError(
                "destination", f"a saga command needs a destination, got {self.destination!r}"
            )


LocalAction = Callable[[Any], Awaitable[Any]]
CommandFactory = Callable[[Any], Command]


@dataclass(frozen=True, kw_only=True)
class LocalStep:
    """A step the coordinator runs itself."""

    name: str
    action: LocalAction
    """``async (state) -> state``; must be idempotent (a crash may run it again)."""
    compensate: LocalAction | CommandFactory | None = None
    """Undo: an async function of the state, or a command to send."""
    retry: Retry = field(default_factory=lambda: Retry(attempts=3, redeliver=()))
    """Tries of the action (and of a local compensation) before giving up."""
    side_effects: bool = True
    """Whether the step changes the world (then it needs a compensation)."""


@dataclass(frozen=True, kw_only=True)
class RemoteStep:
    """A step that sends a command and waits for a reply."""

    name: str
    send: CommandFactory
    success: type[BaseModel]
    on_success: Callable[[Any, Any], Any] | None = None
    """``(state, reply) -> state``; default keeps the state."""
    failure: tuple[type[BaseModel], ...] = ()
    timeout: float = 30.0
    compensate: LocalAction | CommandFactory | None = None
    retry: Retry = field(default_factory=lambda: Retry(attempts=3, redeliver=()))
    """Tries of a local compensation."""
    side_effects: bool = True


Step = LocalStep | RemoteStep


class Saga(Generic[S]):
    """A saga definition. Build it with :meth:`local` and :meth:`remote`, in order."""

    def __init__(self, name: str, state: type[S], *, version: int = 1) -> None:
        if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ConfigurationError("saga.name", f"must be a simple name, got {name!r}")
        if not (isinstance(state, type) and issubclass(state, BaseModel)):
            raise ConfigurationError("saga.state", "must be a pydantic model class")
        self.name = name
        self.state_type = state
        self.version = version
        self.steps: list[Step] = []

    @property
    def reply_destination(self) -> str:
        """Where participants' replies to this saga's commands go."""
        return f"saga.{self.name}.replies"

    def _add(self, step: Step) -> None:
        if any(s.name == step.name for s in self.steps):
            raise ConfigurationError("saga.step", f"{self.name}: step {step.name!r} is declared twice")
        self.steps.append(step)

    def local(
        self,
        name: str,
        action: Callable[[S], Awaitable[S]],
        *,
        compensate: Callable[[S], Awaitable[S]] | Callable[[S], Command] | None = None,
        retry: Retry | None = None,
        side_effects: bool = True,
    ) -> Saga[S]:
        """Add a local step; returns the saga for chaining."""
        self._add(
            LocalStep(
                name=name,
                action=action,
                compensate=compensate,
                retry=retry or Retry(attempts=3, redeliver=()),
                side_effects=side_effects,
            )
        )
        return self

    def remote(
        self,
        name: str,
        *,
        send: Callable[[S], Command],
        success: type[R],
        on_success: Callable[[S, R], S] | None = None,
        failure: type[BaseModel] | tuple[type[BaseModel], ...] = (),
        timeout: float | str = "30s",
        compensate: Callable[[S], Awaitable[S]] | Callable[[S], Command] | None = None,
        retry: Retry | None = None,
        side_effects: bool = True,
    ) -> Saga[S]:
        """Add a remote step; returns the saga for chaining."""
        failures = failure if isinstance(failure, tuple) else (failure,)
        for reply in (success, *failures):
            if not (isinstance(reply, type) and issubclass(reply, BaseModel)):
                raise ConfigurationError(
                    "saga.step", f"{self.name}.{name}: reply type {reply!r} is not a model"
                )
        names = [success.__name__, *(f.__name__ for f in failures)]
        if len(set(names)) != len(names):
            raise ConfigurationError("saga.step", f"{self.name}.{name}: reply types must have distinct names")
        seconds = parse_duration(timeout, setting="saga.timeout")
        if seconds <= 0:
            raise ConfigurationError("saga.timeout", f"{self.name}.{name}: must be > 0")
        self._add(
            RemoteStep(
                name=name,
                send=send,
                success=success,
                on_success=on_success,
                failure=failures,
                timeout=seconds,
                compensate=compensate,
                retry=retry or Retry(attempts=3, redeliver=()),
                side_effects=side_effects,
            )
        )
        return self

    def step(self, name: str) -> Step:
        """The step called ``name``."""
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    def validate(self) -> None:
        """Check the whole definition (called when a coordinator registers it)."""
        if not self.steps:
            raise ConfigurationError("saga.steps", f"{self.name}: a saga needs at least one step")
        # the last step needs no compensation: nothing after it can fail
        for step in self.steps[:-1]:
            if step.side_effects and step.compensate is None:
                raise ConfigurationError(
                    "saga.step",
                    f"{self.name}: step {step.name!r} has side effects but no compensation "
                    "(give compensate=..., or side_effects=False)",
                )

    def mermaid(self) -> str:
        """The saga as a Mermaid flowchart: steps forward, compensations backward."""
        lines = ["flowchart LR", "    start((start))"]
        prev = "start"
        for i, s in enumerate(self.steps):
            node = f"s{i}"
            kind = "local" if isinstance(s, LocalStep) else f"remote, {s.timeout:g}s"
            lines.append(f'    {node}["{s.name}<br/><small>{kind}</small>"]')
            lines.append(f"    {prev} --> {node}")
            if s.compensate is not None:
                lines.append(f'    {node}c["undo {s.name}"]')
                lines.append(f"    {node} -. fails later .-> {node}c")
            prev = node
        lines.append("    done((completed))")
        lines.append(f"    {prev} --> done")
        comps = [f"s{i}c" for i, s in enumerate(self.steps) if s.compensate is not None]
        for a, b in zip(reversed(comps), list(reversed(comps))[1:], strict=False):
            lines.append(f"    {a} --> {b}")
        if comps:
            lines.append("    compensated((compensated))")
            lines.append(f"    {comps[0]} --> compensated")
        return "\n".join(lines)
