"""Carrying out steps: local actions and compensations under their retry policy, and commands.

:func:`run_local` and :func:`run_undo` return ``(True, result)`` or ``(False,
reason)``; the coordinator decides and saves. A local action's result is the new
state (as JSON data); a compensation's is a :class:`~meshlink.saga.Command` to
send or the new state. :func:`command_message` builds the envelope of a command
with the headers a participant's ``ctx.reply`` echoes back.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import BaseModel

from meshlink.clock import Clock
from meshlink.errors import is_retryable
from meshlink.message import REPLY_ECHO, REPLY_TO, Message
from meshlink.resilience.policy import Retry
from meshlink.saga.definition import Command, LocalStep, RemoteStep, Saga

if TYPE_CHECKING:
    from meshlink.app import Mesh

__all__ = ["H_SAGA_ID", "H_SAGA_STEP", "H_SAGA_TOKEN", "command_message", "run_local", "run_undo"]

H_SAGA_ID = "saga-id"
H_SAGA_STEP = "saga-step"
H_SAGA_TOKEN = "saga-token"
_ECHO = f"{H_SAGA_ID},{H_SAGA_STEP},{H_SAGA_TOKEN}"

_log = structlog.get_logger("meshlink.saga")


def _backoff(policy: Retry, attempt: int) -> float:
    return float(min(policy.max_backoff_s, policy.backoff_s * 2 ** (attempt - 1)))


async def run_local(step: LocalStep, state: BaseModel, clock: Clock, *, saga_id: str) -> tuple[bool, Any]:
    """Run a local action under its retry policy: (True, new state data) or (False, reason)."""
    policy = step.retry
    for attempt in range(1, policy.attempts + 1):
        try:
            new_state = await step.action(state)
        except Exception as exc:
            _log.warning("saga step failed", saga_id=saga_id, step=step.name, attempt=attempt)
            if attempt == policy.attempts or not is_retryable(exc):
                return False, f"{type(exc).__name__}: {exc}"
            await clock.sleep(_backoff(policy, attempt))
            continue
        if not isinstance(new_state, BaseModel):
            return False, f"step {step.name} returned {type(new_state).__name__}, not the state"
        return True, new_state.model_dump(mode="json")
    return False, "no attempt"  # pragma: no cover - the loop always returns


async def run_undo(
    step: LocalStep | RemoteStep,
    state: Callable[[], BaseModel],
    clock: Clock,
    *,
    before_local: Callable[[Awaitable[Any]], Awaitable[None]],
) -> tuple[bool, Any]:
    """Run a step's compensation under its retry policy: (True, command or state data) or (False, reason).

    A compensation that returns an awaitable is a local undo; ``before_local`` is
    awaited with it before it runs (the coordinator saves its decision there) and,
    if that raises, the undo is dropped unrun.
    """
    assert step.compensate is not None
    policy = step.retry
    for attempt in range(1, policy.attempts + 1):
        error: Exception | None = None
        try:
            result = step.compensate(state())
        except Exception as exc:
            error = exc
        else:
            if inspect.isawaitable(result):  # its body has not run yet
                try:
                    await before_local(result)
                except BaseException:
                    if inspect.iscoroutine(result):
                        result.close()
                    raise
                try:
                    result = await result
                except Exception as exc:
                    error = exc
        if error is None:
            if isinstance(result, Command):
                return True, result
            if isinstance(result, BaseModel):
                return True, result.model_dump(mode="json")
            return False, f"compensation of {step.name} returned {type(result).__name__}"
        if attempt == policy.attempts:
            return False, f"{type(error).__name__}: {error}"
        await clock.sleep(_backoff(policy, attempt))
    return False, "no attempt"  # pragma: no cover - the loop always returns


def command_message(
    mesh: Mesh, saga: Saga[Any], saga_id: str, step: str, token: str, command: Command
) -> Message:
    """The envelope of ``command``: replies go to the saga's reply destination, correlated by headers.

    Its idempotency key ``saga-id:step:token`` is the same for every resend of one try.
    """
    return mesh.message(
        command.payload,
        key=command.key,
        headers={
            REPLY_TO: saga.reply_destination,
            REPLY_ECHO: _ECHO,
            H_SAGA_ID: saga_id,
            H_SAGA_STEP: step,
            H_SAGA_TOKEN: token,
        },
        idempotency_key=f"{saga_id}:{step}:{token}",
        correlation_id=saga_id,
    )
