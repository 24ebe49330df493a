"""A small TCP fault-injection proxy for broker tests.

Put it between a client and a broker, then break the link on purpose::

    async with TCPProxy("127.0.0.1", 5672) as proxy:
        transport = RabbitTransport(f"amqp://guest:guest@127.0.0.1:{proxy.port}/")
        ...
        await proxy.cut(then=ProxyMode.REFUSE)  # RST every connection, refuse new ones
        await proxy.restore()                   # accept and forward again

Modes (what happens to traffic, for open and new connections alike):

* ``PASS`` — forward both ways.
* ``REFUSE`` — the listening socket is closed, so new connections get
  ``ECONNREFUSED``; open connections are left alone (use :meth:`TCPProxy.cut`).
* ``BLACKHOLE`` — accept, but forward nothing either way and never answer: a
  dead peer that only heartbeats and deadlines can detect.
* ``DELAY`` — forward, each chunk held back by ``delay`` seconds, order kept.

:meth:`TCPProxy.cut` resets every open connection with a TCP RST (``SO_LINGER``
0), both towards the client and the broker.

A proxy in the test's own event loop costs the client about a third of its
throughput; :class:`ProxyProcess` runs the same proxy in a child process (run
``python -m meshlink.testing.proxy --target HOST:PORT``) and drives it over
its standard input, for throughput tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import socket
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

__all__ = ["ProxyMode", "ProxyProcess", "ProxyStats", "TCPProxy"]

_CHUNK = 65536


class ProxyMode(enum.Enum):
    """What the proxy does with traffic."""

    PASS = "pass"
    REFUSE = "refuse"
    BLACKHOLE = "blackhole"
    DELAY = "delay"


@dataclass
class ProxyStats:
    """Counters since the proxy started."""

    accepted: int = 0
    """Connections accepted."""
    open: int = 0
    """Connections open now."""
    cut: int = 0
    """Connections reset by :meth:`TCPProxy.cut`."""
    bytes_up: int = 0
    """Bytes forwarded client → target."""
    bytes_down: int = 0
    """Bytes forwarded target → client."""
    dropped: int = 0
    """Bytes swallowed in :attr:`ProxyMode.BLACKHOLE`."""


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN: SO_LINGER on with a zero timeout, then abort."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, proxy: TCPProxy, client: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []

    async def run(self, reader: asyncio.StreamReader) -> None:
        proxy = self.proxy
        try:
            up_reader, self.upstream = await asyncio.open_connection(proxy.target_host, proxy.target_port)
        except OSError:
            _reset(self.client)
            return
        self.tasks = [
            asyncio.create_task(self._pump(reader, self.upstream, up=True)),
            asyncio.create_task(self._pump(up_reader, self.client, up=False)),
        ]
        await asyncio.wait(self.tasks, return_when=asyncio.FIRST_COMPLETED)
        self.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool) -> None:
        proxy = self.proxy
        # Chunks wait here in DELAY mode; a separate sender keeps their order.
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.create_task(self._send(queue, writer, up=up))
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                mode = proxy.mode
                if mode is ProxyMode.BLACKHOLE:
                    proxy.stats.dropped += len(data)
                    proxy.touch()
                    continue
                due = asyncio.get_running_loop().time() + (proxy.delay if mode is ProxyMode.DELAY else 0.0)
                queue.put_nowait((due, data))
            await queue.join()
            with contextlib.suppress(OSError, RuntimeError):
                writer.write_eof()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)

    async def _send(
        self, queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter, *, up: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if self.proxy.mode is not ProxyMode.BLACKHOLE:
                writer.write(data)
                if up:
                    self.proxy.stats.bytes_up += len(data)
                else:
                    self.proxy.stats.bytes_down += len(data)
                with contextlib.suppress(OSError):
                    await writer.drain()
            queue.task_done()

    def close(self, *, rst: bool = False) -> None:
        for task in self.tasks:
            task.cancel()
        for w in (self.client, self.upstream):
            if w is None:
                continue
            if rst:
                _reset(w)
            else:
                w.close()


class TCPProxy:
    """An in-process asyncio TCP proxy with fault modes. See the module docstring.

    Args:
        target_host: where to forward to.
        target_port: port to forward to.
        host: address to listen on.
        port: port to listen on; 0 picks a free one (read :attr:`port` after :meth:`start`).
    """

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = port
        self.mode = ProxyMode.PASS
        self.delay = 0.0
        self.stats = ProxyStats()
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()

    def touch(self) -> None:
        """Wake :meth:`wait_for` callers (called whenever the counters change)."""
        self._changed.set()

    async def wait_for(self, predicate: Callable[[ProxyStats], bool]) -> None:
        """Wait until ``predicate(stats)`` holds: for tests that act on progress, not time."""
        while not predicate(self.stats):
            self._changed.clear()
            await self._changed.wait()

    async def __aenter__(self) -> TCPProxy:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start listening (on a free port when ``port`` was 0)."""
        await self._listen()

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        await self._unlisten()
        for link in list(self._links):
            link.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def set_mode(self, mode: ProxyMode, *, delay: float = 0.0) -> None:
        """Switch mode; ``delay`` (seconds) applies to :attr:`ProxyMode.DELAY`."""
        self.mode = mode
        self.delay = delay
        if mode is ProxyMode.REFUSE:
            await self._unlisten()
        else:
            await self._listen()

    async def cut(self, *, then: ProxyMode = ProxyMode.PASS) -> int:
        """Reset (RST) every open connection, then switch to ``then``; returns how many were cut."""
        await self.set_mode(then, delay=self.delay)
        links = list(self._links)
        for link in links:
            link.close(rst=True)
        self.stats.cut += len(links)
        self.touch()
        return len(links)

    async def restore(self) -> None:
        """Back to :attr:`ProxyMode.PASS` (listening again if refused)."""
        await self.set_mode(ProxyMode.PASS)

    async def _listen(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _unlisten(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            # wait_closed() would also wait for the open connections (3.12+): not wanted.

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        link = _Link(self, writer)
        self._links.add(link)
        self.stats.accepted += 1
        self.stats.open += 1
        self.touch()
        try:
            if self.mode is ProxyMode.BLACKHOLE:
                # Never connect upstream: swallow whatever the client sends.
                while data := await reader.read(_CHUNK):
                    self.stats.dropped += len(data)
                    self.touch()
                writer.close()
            else:
                await link.run(reader)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._links.discard(link)
            self.stats.open -= 1
            self._handlers.discard(task)
            self.touch()


class ProxyProcess:
    """The same proxy in a child process, driven over its standard input.

    Same control methods as :class:`TCPProxy` (``start``, ``stop``, ``set_mode``,
    ``cut``, ``restore``, ``port``); use it when the proxy must not share the
    test's event loop (throughput tests).
    """

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = port
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> ProxyProcess:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the child and wait until it listens."""
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshlink.testing.proxy",
            "--target", f"{self.target_host}:{self.target_port}",
            "--listen", f"{self.host}:{self.port}",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self.port = int((await self._reply()).split()[1])

    async def stop(self) -> None:
        """Stop the child (closing every connection)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def set_mode(self, mode: ProxyMode, *, delay: float = 0.0) -> None:
        """Switch mode in the child."""
        await self._command(f"mode {mode.value} {delay}")

    async def cut(self, *, then: ProxyMode = ProxyMode.PASS) -> int:
        """Reset every open connection in the child; returns how many were cut."""
        return int((await self._command(f"cut {then.value}")).split()[1])

    async def restore(self) -> None:
        """Back to :attr:`ProxyMode.PASS`."""
        await self.set_mode(ProxyMode.PASS)

    async def _command(self, line: str) -> str:
        if self._proc is None or self._proc.stdin is None:
            raise RuntimeError("proxy process is not running")
        self._proc.stdin.write(line.encode() + b"\n")
        await self._proc.stdin.drain()
        return await self._reply()

    async def _reply(self) -> str:
        assert self._proc is not None
        assert self._proc.stdout is not None
        line = (await asyncio.wait_for(self._proc.stdout.readline(), 30)).decode().strip()
        if not line.startswith(("OK", "PORT")):
            raise RuntimeError(f"proxy process answered {line!r}")
        return line


async def _serve(target: str, listen: str) -> None:
    """The child's main loop: one command per stdin line, one answer per command."""
    t_host, t_port = target.rsplit(":", 1)
    l_host, l_port = listen.rsplit(":", 1)
    proxy = TCPProxy(t_host, int(t_port), host=l_host, port=int(l_port))
    await proxy.start()
    print(f"PORT {proxy.port}", flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        cmd, *args = line.split()
        if cmd == "mode":
            await proxy.set_mode(ProxyMode(args[0]), delay=float(args[1]) if len(args) > 1 else 0.0)
            print("OK", flush=True)
        elif cmd == "cut":
            n = await proxy.cut(then=ProxyMode(args[0]) if args else ProxyMode.PASS)
            print(f"OK {n}", flush=True)
        else:
            print(f"ERR unknown command {cmd!r}", flush=True)
    await proxy.stop()


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m meshlink.testing.proxy``."""
    parser = argparse.ArgumentParser(description="TCP fault-injection proxy (commands on stdin)")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (port 0: any)")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.target, args.listen))


if __name__ == "__main__":
    main()
