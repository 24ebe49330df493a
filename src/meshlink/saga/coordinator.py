"""The saga coordinator: starts sagas, advances them on replies, compensates, resumes.

Every transition is one save of the new instance *with* the commands it sends,
under an optimistic version check. So:

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

A transition saves once, however many history entries it adds: a reply's
"succeeded" goes with the next step's command (or "completed"), a failure goes
with the compensation commands it causes. It saves *before* calling a local
action or a local compensation, so a side effect never runs on a decision that
was not saved. Saves of many sagas ready at once share one transaction
(:class:`~meshlink.saga.commit.GroupCommit`), each under its own version check.
The coordinator remembers the instances it saved last and applies a reply to
that copy without reading it again; a stale copy fails the version check, is
dropped, and the saga is reloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog
from pydantic import BaseModel

from meshlink.app import Mesh
from meshlink.errors import ConfigurationError
from meshlink.message import Message
from meshlink.saga.commit import GroupCommit
from meshlink.saga.definition import Command, RemoteStep, Saga
from meshlink.saga.events import SagaStepChanged
from meshlink.saga.locks import KeyedLocks
from meshlink.saga.steps import H_SAGA_ID, H_SAGA_STEP, H_SAGA_TOKEN, command_message, run_local, run_undo
from meshlink.saga.store import MemorySagaStore, Outgoing, SagaInstance, SagaStatus, SagaStore, StaleSagaError

__all__ = ["H_SAGA_ID", "H_SAGA_STEP", "H_SAGA_TOKEN", "SagaCoordinator"]

_log = structlog.get_logger("meshlink.saga")
_STALE_RETRIES = 10
_KNOWN_MAX = 10_000  # instances remembered (the most recently saved unfinished ones)


class SagaCoordinator:
    """Runs the sagas of one service on a mesh.

    Args:
        mesh: the mesh the coordinator consumes replies on and sends commands with.
        sagas: the definitions it coordinates (validated here).
        store: where instances are kept (default: in memory).
        poll: how often (mesh clock seconds) to look for timed-out steps and stalled sagas.
        stalled_after: a saga mid-transition and unsaved this long is taken over
            (its coordinator died); default ``20 * poll``.
        concurrency: most replies handled at once (also the prefetch); the transitions
            they cause are saved together.
        max_batch: most transitions saved in one transaction.
    """

    def __init__(
        self,
        mesh: Mesh,
        sagas: Sequence[Saga[Any]],
        *,
        store: SagaStore | None = None,
        poll: float = 0.5,
        stalled_after: float | None = None,
        concurrency: int = 64,
        max_batch: int = 256,
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
        self._lock = KeyedLocks()
        self._commit = GroupCommit(store, max_batch=max_batch)
        self._known: dict[str, SagaInstance] = {}
        self._foreign: set[str] = set()  # sagas of a definition version not run here (logged)
        self._timer: asyncio.Task[None] | None = None
        for saga in self.sagas.values():
            mesh.handler(
                saga.reply_destination,
                group=f"{mesh.service}.saga.{saga.name}",
                name=f"saga:{saga.name}",
                concurrency=concurrency,
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
            if sid in self._known:
                return sid  # already started here (elsewhere: its creation below fails the version check)
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
            # saved with its first command (or before its first local step); if the id
            # exists already, that save fails the version check: starting is idempotent
            with contextlib.suppress(StaleSagaError):
                await self._advance(definition, instance, dirty=True)
        return sid

    async def get(self, saga_id: str) -> SagaInstance | None:
        """The stored instance."""
        return await self.store.load(saga_id)

    # -- forward -------------------------------------------------------------------------

    async def _advance(
        self, saga: Saga[Any], inst: SagaInstance, *, dirty: bool, model: BaseModel | None = None
    ) -> SagaInstance:
        """Run the saga forward until it waits or ends.

        ``dirty``: ``inst`` has unsaved changes; ``model``: its state, already validated.
        """
        while inst.status is SagaStatus.RUNNING and not inst.waiting:
            if inst.step >= len(saga.steps):
                return await self._save(
                    inst.evolve(status=SagaStatus.COMPLETED).log(self._now(), "", "completed")
                )
            step = saga.steps[inst.step]
            if isinstance(step, RemoteStep):
                token = uuid.uuid4().hex[:12]
                command = step.send(model if model is not None else self._state(saga, inst))
                message = self._command(inst, step.name, token, command)
                inst = inst.evolve(waiting=True, token=token, due_at=self._now() + step.timeout)
                inst = inst.log(self._now(), step.name, "sent", detail=command.destination)
                return await self._save(inst, [(command.destination, message)])
            if dirty:
                inst, dirty = await self._save(inst), False  # saved before the action runs
            ok, result = await run_local(step, self._state(saga, inst), self.mesh.clock, saga_id=inst.saga_id)
            if not ok:
                inst = inst.log(self._now(), step.name, "failed", detail=result)
                return await self._compensate(saga, inst)
            inst = inst.evolve(state=result, step=inst.step + 1, completed=(*inst.completed, inst.step))
            inst, dirty = inst.log(self._now(), step.name, "succeeded"), True  # saved with what follows
            model = None
        return await self._save(inst) if dirty else inst

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

    async def _apply_reply(self, sid: str, message: Message, *, fresh: bool = False) -> None:
        cached = None if fresh else self._known.get(sid)
        inst = cached or await self.store.load(sid)
        if inst is None:
            _log.warning("reply for an unknown saga", saga_id=sid, type=message.type)
            return
        saga = self._definition_of(inst)
        if saga is None:
            return
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
            if not inst.status.finished and not inst.waiting:
                if cached is not None:
                    # this copy may be stale (nothing saved here since): decide on the stored one
                    self._known.pop(sid, None)
                    await self._apply_reply(sid, message, fresh=True)
                    return
                # mid-transition (a local step or an undo may be running on another replica):
                # a save would make that replica's save stale and its step run again
                _log.info("reply ignored", saga_id=sid, step=step_name, detail=detail)
                return
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
            await self._advance(
                saga, inst, dirty=True, model=state if type(state) is saga.state_type else None
            )
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
            if self._lock.held(inst.saga_id):
                continue  # this process is moving it now (a long local step): never wait on it
            try:
                async with self._lock(inst.saga_id):
                    await self._retry_stale(inst.saga_id, lambda fresh: self._move_on(fresh, now, everything))
            except Exception:  # one saga that cannot move must not hold back the others
                _log.exception("saga could not be moved on; tried at the next sweep", saga_id=inst.saga_id)

    async def _move_on(self, inst: SagaInstance, now: float, everything: bool) -> None:
        if inst.wake_at is not None and inst.wake_at > now and (not everything or not inst.waiting):
            # saved since the sweep looked, or (at start) saved mid-transition less than
            # stalled_after ago: another coordinator may be running its step right now
            return
        saga = self._definition_of(inst)
        if saga is None:
            return
        if inst.waiting:
            if inst.due_at is not None and inst.due_at <= now:
                step = saga.steps[inst.step]
                timed_out = inst.evolve(waiting=False, due_at=None).log(now, step.name, "timed-out")
                await self._compensate(saga, timed_out)
        elif inst.status is SagaStatus.COMPENSATING:
            await self._compensate(saga, inst, dirty=False)
        elif inst.status is SagaStatus.RUNNING:
            await self._advance(saga, inst, dirty=False)

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

    async def _compensate(self, saga: Saga[Any], inst: SagaInstance, *, dirty: bool = True) -> SagaInstance:
        """Undo the completed steps in reverse; park the saga as failed if an undo keeps failing.

        The undo commands are saved with the decision to compensate, in one save; a
        local undo runs only once everything decided before it is saved.
        """
        if inst.status is not SagaStatus.COMPENSATING:
            inst, dirty = inst.evolve(status=SagaStatus.COMPENSATING, waiting=False, due_at=None), True
        outgoing: list[Outgoing] = []
        while inst.completed:
            index = inst.completed[-1]
            step = saga.steps[index]
            state = inst.state
            if step.compensate is not None:

                async def save_first(undo: Awaitable[Any]) -> None:
                    nonlocal inst, dirty
                    if dirty:
                        inst, dirty = await self._save(inst, outgoing), False
                        outgoing.clear()

                fresh_state = functools.partial(self._state, saga, inst)
                ok, result = await run_undo(step, fresh_state, self.mesh.clock, before_local=save_first)
                if not ok:
                    failed = inst.evolve(status=SagaStatus.FAILED)
                    failed = failed.log(self._now(), step.name, "compensation-failed", detail=result)
                    return await self._save(failed, outgoing)
                if isinstance(result, Command):
                    outgoing.append((result.destination, self._command(inst, step.name, "undo", result)))
                else:
                    state = result
            inst = inst.evolve(state=state, completed=inst.completed[:-1], step=index)
            inst, dirty = inst.log(self._now(), step.name, "compensated"), True
        done = inst.evolve(status=SagaStatus.COMPENSATED).log(self._now(), "", "compensated-all")
        return await self._save(done, outgoing)

    # -- plumbing ----------------------------------------------------------------------------------

    def _command(self, inst: SagaInstance, step: str, token: str, command: Command) -> Message:
        return command_message(self.mesh, self.sagas[inst.name], inst.saga_id, step, token, command)

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
        try:
            saved = await self._commit.save(inst.evolve(updated_at=now, wake_at=wake_at), outgoing)
        except BaseException:
            self._known.pop(inst.saga_id, None)  # stale or unknown: read it again next time
            raise
        self._remember(saved)
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

    def _remember(self, saved: SagaInstance) -> None:
        """Keep the last saved copy of an unfinished saga (the next reply starts from it)."""
        self._known.pop(saved.saga_id, None)
        if saved.status.finished:
            return
        self._known[saved.saga_id] = saved
        if len(self._known) > _KNOWN_MAX:
            del self._known[next(iter(self._known))]  # the least recently saved

    def _definition_of(self, inst: SagaInstance) -> Saga[Any] | None:
        """The definition ``inst`` runs under here, or ``None`` (logged once per saga): an
        instance of another version is left to a coordinator that runs that version, never
        moved through this version's steps."""
        saga = self.sagas.get(inst.name)
        if saga is not None and saga.version == inst.definition_version:
            return saga
        if inst.saga_id not in self._foreign:
            if len(self._foreign) >= _KNOWN_MAX:
                self._foreign.clear()
            self._foreign.add(inst.saga_id)
            _log.error(
                "saga of a definition this coordinator does not run; left alone",
                saga_id=inst.saga_id,
                name=inst.name,
                version=inst.definition_version,
                running=saga.version if saga is not None else None,
            )
        return None

    def _state(self, saga: Saga[Any], inst: SagaInstance) -> BaseModel:
        state: BaseModel = saga.state_type.model_validate(inst.state)
        return state

    def _now(self) -> float:
        return self.mesh.clock.time()

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
        await self._commit.close()
