"""How middleware composes around a handler.

A handler, at this level, is ``async (ctx) -> None``; a middleware is a function
from handler to handler. The chain is built once per subscription when the
mesh starts, never per message::

    def log_duration(next_: Handler) -> Handler:
        async def run(ctx: Context) -> None:
            started = time.perf_counter()
            try:
                await next_(ctx)
            finally:
                ctx.log.info("handled", seconds=time.perf_counter() - started)
        return run

The stack around every handler, outermost first::

    settle (ack on success; on failure decide: dead-letter with reason, or give back)
      → decode (body → the handler's type; failure is permanent)
        → mesh middleware (in the order given to ``Mesh``)
          → handler middleware (in the order given to ``@mesh.handler``)
            → the handler

The first middleware listed runs outermost.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshlink.context import Context

__all__ = ["Handler", "Middleware", "compose"]

Handler = Callable[["Context"], Awaitable[None]]
"""A message handler as middleware sees it."""
Middleware = Callable[[Handler], Handler]
"""A function from handler to handler."""


def compose(middleware: Iterable[Middleware], endpoint: Handler) -> Handler:
    """Wrap ``endpoint`` so that the first middleware given runs outermost."""
    handler = endpoint
    for mw in reversed(list(middleware)):
        handler = mw(handler)
    return handler
