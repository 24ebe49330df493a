"""The saga coordinator: starts sagas, advances them on replies, compensates, resumes.

Every transition is one :meth:`SagaStore.save` of the new instance *with* the
commands it sends, under an optimistic version check. So:

* a crash at any point resumes from the last saved instance (on start the
  coordinator picks up every unfinished saga and re-arms its timeouts: they are a
  due time in the instance, polled on the mesh's clock — no broker timer to lose);
* two coordinators over one store never both advance a saga (the loser reloads);
* a command is sent only if its transition was saved, and carries a deterministic
  idempotency key (``saga-id:step:token``) so a participant can absorb a resend.

Replies are correlated by the ``saga-id``, ``saga-step`` and ``saga-token``
headers that participants echo back through :meth:`meshlink.Context.reply`; a
reply that does not match what the saga waits for (late, duplicate, unknown) is
recorded in the history and otherwise ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog
from pydantic import BaseModel

from meshlink.app import Mesh
from meshlink.errors import ConfigurationError, is_retryable
from meshlink.message import REPLY_ECHO, REPLY_TO, Message
from meshlink.saga.definition import Command, LocalStep, RemoteStep, Saga
from meshlink.saga.events import SagaStepChanged
from meshlink.saga.store import MemorySagaStore, Outgoing, SagaInstance, SagaStatus, SagaStore, StaleSagaError

__all__ = ["H_SAGA_ID", "H_SAGA_STEP", "H_SAGA_TOKEN", "SagaCoordinator"]

H_SAGA_ID = "saga-id"
H_SAGA_STEP = "saga-step"
H_SAGA_TOKEN = "saga-token"
_log = structlog.get_logger("meshlink.saga")
_STALE_RETRIES = 10


class SagaCoordinator:
    """Runs the sagas of one service on a mesh.

    Args:
        mesh: the mesh the coordinator consumes replies on and sends commands with.
        sagas: the definitions it coordinates (validated here).
        store: where instances are kept (default: in memory).
        poll: how often (mesh clock seconds) to look for timed-out steps and stalled sagas.
        stalled_after: a saga mid-transition and unsaved this long is taken over
            (its coordinator died); default ``20 * poll``.
    """

    def __init__(
        self,
        mesh: Mesh,
        sagas: Sequence[Saga[Any]],
        *,
        store: SagaStore | None = None,
        poll: float = 0.5,
        stalled_after: float | None = None,
    ) -> None:
        self.mesh = mesh
        self.sagas: dict[str, Saga[Any]] = {}
        for saga in sagas:
            saga.validate()
            if saga.name in self.sagas:
                raise ConfigurationError("saga.name", f"two sagas are called {saga.name!r}")
            self.sagas[saga.name] = saga
        if store is None:
            store = MemorySagaStore()
        if isinstance(store, MemorySagaStore) and store.publish is None:
            store.publish = self._send
        self.store = store
        self.poll = poll
        self.stalled_after = stalled_after if stalled_after is not None else 20 * poll
        self._locks: dict[str, asyncio.Lock] = {}
        self._timer: asyncio.Task[None] | None = None
        for saga in self.sagas.values():
            mesh.handler(
                saga.reply_destination, group=f"{mesh.service}.saga.{saga.name}", name=f"saga:{saga.name}"
            )(self._on_reply)
        mesh.on_start(self._resume)
        mesh.on_stop(self._halt)

    # -- public --------------------------------------------------------------------------

    async def start(self, saga: Saga[Any] | str, state: BaseModel, *, saga_id: str | None = None) -> str:
        """Start a saga with its initial state; returns its id (idempotent for a given id)."""
        definition = self.sagas[saga if isinstance(saga, str) else saga.name]
        if not isinstance(state, definition.state_type):
            raise ConfigurationError(
                "saga.state", f"{definition.name} needs a {definition.state_type.__name__}"
            )
        sid = saga_id or uuid.uuid4().hex
        async with self._lock(sid):
            if await self.store.load(sid) is not None:
                return sid  # already started: starting is idempotent
            now = self.mesh.clock.time()
            instance = SagaInstance(
                saga_id=sid,
                name=definition.name,
                definition_version=definition.version,
                status=SagaStatus.RUNNING,
                state=state.model_dump(mode="json"),
                step=0,
                created_at=now,
                updated_at=now,
            ).log(now, "", "started")
            try:
                instance = await self._save(instance)
            except StaleSagaError:
                return sid  # another coordinator created it at the same moment: it runs it
            await self._advance(definition, instance)
        return sid

    async def get(self, saga_id: str) -> SagaInstance | None:
        """The stored instance."""
        return await self.store.load(saga_id)

    # -- forward -------------------------------------------------------------------------

    async def _advance(self, saga: Saga[Any], inst: SagaInstance) -> SagaInstance:
        while inst.status is SagaStatus.RUNNING and not inst.waiting:
            if inst.step >= len(saga.steps):
                return await self._save(
                    inst.evolve(status=SagaStatus.COMPLETED).log(self._now(), "", "completed")
                )
            step = saga.steps[inst.step]
            if isinstance(step, RemoteStep):
                token = uuid.uuid4().hex[:12]
                command = step.send(self._state(saga, inst))
                message = self._command(inst, step.name, token, command)
                inst = inst.evolve(waiting=True, token=token, due_at=self._now() + step.timeout)
                inst = inst.log(self._now(), step.name, "sent", detail=command.destination)
                return await self._save(inst, [(command.destination, message)])
            ok, result = await self._run_local(step, self._state(saga, inst), inst)
            if not ok:
                inst = inst.log(self._now(), step.name, "failed", detail=result)
                return await self._compensate(saga, inst)
            inst = inst.evolve(state=result, step=inst.step + 1, completed=(*inst.completed, inst.step))
            inst = await self._save(inst.log(self._now(), step.name, "succeeded"))
        return inst

    async def _run_local(self, step: LocalStep, state: BaseModel, inst: SagaInstance) -> tuple[bool, Any]:
        """Run a local action under its retry policy: (True, new state) or (False, reason)."""
        policy = step.retry
        for attempt in range(1, policy.attempts + 1):
            try:
                new_state = await step.action(state)
            except Exception as exc:
                _log.warning("saga step failed", saga_id=inst.saga_id, step=step.name, attempt=attempt)
                if attempt == policy.attempts or not is_retryable(exc):
                    return False, f"{type(exc).__name__}: {exc}"
                await self.mesh.clock.sleep(min(policy.max_backoff_s, policy.backoff_s * 2 ** (attempt - 1)))
                continue
            if not isinstance(new_state, BaseModel):
                return False, f"step {step.name} returned {type(new_state).__name__}, not the state"
            return True, new_state.model_dump(mode="json")
        return False, "no attempt"  # pragma: no cover - the loop always returns

    # -- replies and timeouts ----------------------------------------------------------------

    async def _on_reply(self, message: Message) -> None:
        sid = message.headers.get(H_SAGA_ID, "")
        async with self._lock(sid):
            for _ in range(_STALE_RETRIES):
                try:
                    await self._apply_reply(sid, message)
                    return
                except StaleSagaError:
                    continue  # another coordinator moved it: reload and look again
            raise StaleSagaError("saga kept changing under this reply", saga_id=sid)

    async def _apply_reply(self, sid: str, message: Message) -> None:
        inst = await self.store.load(sid)
        if inst is None:
            _log.warning("reply for an unknown saga", saga_id=sid, type=message.type)
            return
        saga = self.sagas[inst.name]
        step_name = message.headers.get(H_SAGA_STEP, "")
        current = saga.steps[inst.step] if inst.step < len(saga.steps) else None
        expected = (
            inst.status is SagaStatus.RUNNING
            and inst.waiting
            and isinstance(current, RemoteStep)
            and current.name == step_name
            and inst.token == message.headers.get(H_SAGA_TOKEN)
        )
        if not expected or not isinstance(current, RemoteStep):
            detail = f"{message.type} arrived while {inst.status.value}, not waiting for it"
            await self._save(inst.log(self._now(), step_name, "ignored-reply", detail=detail))
            return
        if message.type == current.success.__name__:
            reply = current.success.model_validate_json(message.body)
            state = self._state(saga, inst)
            if current.on_success is not None:
                state = current.on_success(state, reply)
            inst = inst.evolve(
                state=state.model_dump(mode="json"),
                waiting=False,
                due_at=None,
                step=inst.step + 1,
                completed=(*inst.completed, inst.step),
            ).log(self._now(), current.name, "succeeded")
            await self._advance(saga, await self._save(inst))
        elif message.type in {f.__name__ for f in current.failure}:
            inst = inst.evolve(waiting=False, due_at=None)
            await self._compensate(saga, inst.log(self._now(), current.name, "failed", detail=message.type))
        else:
            detail = f"{message.type} is neither success nor failure of {current.name}"
            await self._save(inst.log(self._now(), step_name, "ignored-reply", detail=detail))

    async def _sweep(self, *, everything: bool = False) -> None:
        """Time out overdue steps, and move on sagas nobody is moving.

        Each save sets the instance's ``wake_at``: its reply deadline while it waits,
        else ``stalled_after`` from now — a saga still running unsaved by then was left
        mid-transition by a coordinator that died, and any coordinator picks it up, so
        a crashed replica never strands a saga while the others run. The store answers
        "which are due" from an index; ``everything`` (at start) looks at every
        unfinished saga. All is reloaded under the saga's lock and saved under the
        version check, so a race with a live coordinator is harmless.
        """
        now = self._now()
        found = await (self.store.unfinished() if everything else self.store.due(now))
        for inst in found:
            async with self._lock(inst.saga_id):
                await self._retry_stale(inst.saga_id, lambda fresh: self._move_on(fresh, now, everything))

    async def _move_on(self, inst: SagaInstance, now: float, everything: bool) -> None:
        if not everything and inst.wake_at is not None and inst.wake_at > now:
            return  # someone saved it since the sweep looked: it is moving
        saga = self.sagas.get(inst.name)
        if saga is None:
            _log.error("unfinished saga of an unknown definition", saga_id=inst.saga_id, name=inst.name)
            return
        if inst.waiting:
            if inst.due_at is not None and inst.due_at <= now:
                step = saga.steps[inst.step]
                timed_out = inst.evolve(waiting=False, due_at=None).log(now, step.name, "timed-out")
                await self._compensate(saga, timed_out)
        elif inst.status is SagaStatus.COMPENSATING:
            await self._compensate(saga, inst)
        elif inst.status is SagaStatus.RUNNING:
            await self._advance(saga, inst)

    async def _retry_stale(self, saga_id: str, work: Callable[[SagaInstance], Awaitable[None]]) -> None:
        """Load the saga and run ``work`` on it; on a version race, reload and run it again."""
        for _ in range(_STALE_RETRIES):
            fresh = await self.store.load(saga_id)
            if fresh is None or fresh.status.finished:
                return
            try:
                await work(fresh)
                return
            except StaleSagaError:
                continue
        _log.warning("saga kept changing; left for the next sweep", saga_id=saga_id)

    # -- compensation ----------------------------------------------------------------------------

    async def _compensate(self, saga: Saga[Any], inst: SagaInstance) -> SagaInstance:
        """Undo the completed steps in reverse; park the saga as failed if an undo keeps failing."""
        if inst.status is not SagaStatus.COMPENSATING:
            inst = await self._save(inst.evolve(status=SagaStatus.COMPENSATING, waiting=False, due_at=None))
        while inst.completed:
            index = inst.completed[-1]
            step = saga.steps[index]
            outgoing: list[Outgoing] = []
            state = inst.state
            if step.compensate is not None:
                ok, result = await self._undo(saga, step, inst)
                if not ok:
                    failed = inst.evolve(status=SagaStatus.FAILED)
                    return await self._save(
                        failed.log(self._now(), step.name, "compensation-failed", detail=result)
                    )
                if isinstance(result, Command):
                    outgoing.append((result.destination, self._command(inst, step.name, "undo", result)))
                else:
                    state = result
            inst = inst.evolve(state=state, completed=inst.completed[:-1], step=index)
            inst = await self._save(inst.log(self._now(), step.name, "compensated"), outgoing)
        return await self._save(
            inst.evolve(status=SagaStatus.COMPENSATED).log(self._now(), "", "compensated-all")
        )

    async def _undo(
        self, saga: Saga[Any], step: LocalStep | RemoteStep, inst: SagaInstance
    ) -> tuple[bool, Any]:
        assert step.compensate is not None
        policy = step.retry
        for attempt in range(1, policy.attempts + 1):
            try:
                result = step.compensate(self._state(saga, inst))
                if inspect.isawaitable(result):
                    result = await result
            except Exception as exc:
                if attempt == policy.attempts:
                    return False, f"{type(exc).__name__}: {exc}"
                await self.mesh.clock.sleep(min(policy.max_backoff_s, policy.backoff_s * 2 ** (attempt - 1)))
                continue
            if isinstance(result, Command):
                return True, result
            if isinstance(result, BaseModel):
                return True, result.model_dump(mode="json")
            return False, f"compensation of {step.name} returned {type(result).__name__}"
        return False, "no attempt"  # pragma: no cover

    # -- plumbing ----------------------------------------------------------------------------------

    def _command(self, inst: SagaInstance, step: str, token: str, command: Command) -> Message:
        saga = self.sagas[inst.name]
        return self.mesh.message(
            command.payload,
            key=command.key,
            headers={
                REPLY_TO: saga.reply_destination,
                REPLY_ECHO: f"{H_SAGA_ID},{H_SAGA_STEP},{H_SAGA_TOKEN}",
                H_SAGA_ID: inst.saga_id,
                H_SAGA_STEP: step,
                H_SAGA_TOKEN: token,
            },
            idempotency_key=f"{inst.saga_id}:{step}:{token}",
            correlation_id=inst.saga_id,
        )

    async def _send(self, destination: str, message: Message) -> None:
        await self.mesh.publish(destination, message)

    async def _save(self, inst: SagaInstance, outgoing: Sequence[Outgoing] = ()) -> SagaInstance:
        now = self._now()
        if inst.status.finished:
            wake_at = None
        elif inst.waiting and inst.due_at is not None:
            wake_at = inst.due_at
        else:
            wake_at = now + self.stalled_after  # only if nobody moves it on before then
        saved = await self.store.save(inst.evolve(updated_at=now, wake_at=wake_at), outgoing)
        last = saved.history[-1] if saved.history else None
        self.mesh.emit(
            SagaStepChanged(
                saga_id=saved.saga_id,
                saga=saved.name,
                status=saved.status.value,
                step=last.step if last else "",
                event=last.event if last else "",
            )
        )
        return saved

    def _state(self, saga: Saga[Any], inst: SagaInstance) -> BaseModel:
        state: BaseModel = saga.state_type.model_validate(inst.state)
        return state

    def _now(self) -> float:
        return self.mesh.clock.time()

    def _lock(self, saga_id: str) -> asyncio.Lock:
        lock = self._locks.get(saga_id)
        if lock is None:
            lock = self._locks[saga_id] = asyncio.Lock()
        return lock

    async def _resume(self) -> None:
        """On start: move on every unfinished saga (whatever stopped it), then watch."""
        await self._sweep(everything=True)
        self._timer = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await self.mesh.clock.sleep(self.poll)
            try:
                await self._sweep()
            except Exception:
                _log.exception("saga sweep failed; will try again")

    async def _halt(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
            self._timer = None
