"""The TCP fault-injection proxy (``meshlink.testing.proxy``), against a local echo server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from meshlink.testing.proxy import ProxyMode, ProxyProcess, TCPProxy

GUARD = 10.0


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    data = await asyncio.wait_for(reader.readexactly(len(payload)), GUARD)
    writer.close()
    return data


async def test_pass_mode_forwards_both_ways(echo_port: int) -> None:
    async with TCPProxy("127.0.0.1", echo_port) as proxy:
        assert await roundtrip(proxy.port, b"hello" * 1000) == b"hello" * 1000
        assert proxy.stats.bytes_up == proxy.stats.bytes_down == 5000


async def test_cut_resets_open_connections(echo_port: int) -> None:
    async with TCPProxy("127.0.0.1", echo_port) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"x")
        await asyncio.wait_for(reader.readexactly(1), GUARD)
        assert await proxy.cut() == 1
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), GUARD)
        # PASS again after the cut: new connections work.
        assert await roundtrip(proxy.port, b"again") == b"again"


async def test_refuse_mode_refuses_new_connections_until_restored(echo_port: int) -> None:
    async with TCPProxy("127.0.0.1", echo_port) as proxy:
        port = proxy.port
        await proxy.cut(then=ProxyMode.REFUSE)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
        await proxy.restore()
        assert proxy.port == port
        assert await roundtrip(port, b"back") == b"back"


async def test_blackhole_drops_traffic_on_open_connections(echo_port: int) -> None:
    async with TCPProxy("127.0.0.1", echo_port) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"a")
        assert await asyncio.wait_for(reader.readexactly(1), GUARD) == b"a"
        await proxy.set_mode(ProxyMode.BLACKHOLE)
        writer.write(b"lost")
        await writer.drain()
        # Wait until the proxy has read and dropped the bytes, then reopen the path.
        await asyncio.wait_for(proxy.wait_for(lambda s: s.dropped >= 4), GUARD)
        await proxy.restore()
        writer.write(b"marker")
        assert await asyncio.wait_for(reader.readexactly(6), GUARD) == b"marker"
        writer.close()


async def test_delay_mode_holds_each_chunk_back(echo_port: int) -> None:
    async with TCPProxy("127.0.0.1", echo_port) as proxy:
        await proxy.set_mode(ProxyMode.DELAY, delay=0.1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await roundtrip(proxy.port, b"slow") == b"slow"
        assert loop.time() - started >= 0.2  # held once each way: a lower bound only


async def test_proxy_process_forwards_and_cuts(echo_port: int) -> None:
    async with ProxyProcess("127.0.0.1", echo_port) as proxy:
        assert await roundtrip(proxy.port, b"child") == b"child"
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"y")
        await asyncio.wait_for(reader.readexactly(1), GUARD)
        assert await proxy.cut() == 1
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), GUARD)
        await proxy.set_mode(ProxyMode.REFUSE)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", proxy.port)
        await proxy.restore()
        assert await roundtrip(proxy.port, b"ok") == b"ok"
