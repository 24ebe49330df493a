"""Wake-ups for relays: PostgreSQL ``LISTEN`` on a connection of its own, kept alive.

The listening connection is checked out of the engine's pool and never given
back with a listener on it. When it is lost (``pg_terminate_backend``, a
restart) the watcher reconnects with backoff and calls ``wake()`` once on every
(re)connect, since notifications sent in the gap are gone; relays also poll, so
a gap only adds latency.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["NoWatch", "PgWatch"]

_log = structlog.get_logger("meshlink.outbox")


class NoWatch:
    """A store without notifications (SQLite): nothing to stop."""

    async def close(self) -> None:
        """Nothing to do."""


class PgWatch:
    """Calls ``wake()`` on each ``NOTIFY`` on ``channel``; reconnects when the connection drops.

    Args:
        engine: a ``postgresql+asyncpg`` engine.
        channel: the notification channel.
        wake: called (in the event loop) on each notification and after each (re)connect.
        check_interval: seconds between liveness checks of an idle listening connection.
    """

    def __init__(
        self, engine: AsyncEngine, channel: str, wake: Callable[[], None], *, check_interval: float = 5.0
    ) -> None:
        self.engine = engine
        self.channel = channel
        self.wake = wake
        self.check_interval = check_interval
        self.connected = asyncio.Event()
        self.reconnects = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start listening in the background (returns at once; see :attr:`connected`)."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"listen {self.channel}")

    async def close(self) -> None:
        """Stop listening and drop the connection."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _on_notify(self, *args: Any) -> None:
        self.wake()

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                await self._listen_once()
                delay = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.warning(
                    "outbox LISTEN connection lost; reconnecting", channel=self.channel, error=repr(exc)
                )
            self.connected.clear()
            self.reconnects += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _listen_once(self) -> None:
        conn = await self.engine.connect()
        try:
            raw = await conn.get_raw_connection()
            driver: Any = raw.driver_connection
            lost = asyncio.Event()
            driver.add_termination_listener(lambda _c: lost.set())
            await driver.add_listener(self.channel, self._on_notify)
            self.connected.set()
            self.wake()  # anything committed while we were not listening
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), self.check_interval)
                if not lost.is_set():
                    await asyncio.wait_for(driver.execute("SELECT 1"), self.check_interval)
        finally:
            # never give a connection with a listener back to the pool
            with contextlib.suppress(Exception):
                await conn.invalidate()
            with contextlib.suppress(Exception):
                await conn.close()
