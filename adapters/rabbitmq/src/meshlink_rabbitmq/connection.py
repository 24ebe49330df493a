"""Opening the robust connection: URL, TLS context, fail-fast first connect.

Reconnection itself is aio-pika's (``connect_robust``): it heals later link
losses in the background and replays channels, topology and consumers. This
module only builds its arguments and turns a failed first connect into
:class:`~meshlink.errors.TransportConnectionError` without leaking the password.
"""

from __future__ import annotations

import asyncio
import ssl

import aio_pika
import structlog
from aio_pika.abc import AbstractRobustConnection
from yarl import URL

from meshlink.errors import TransportConnectionError
from meshlink_rabbitmq.settings import RabbitSettings

__all__ = ["connect", "redact", "ssl_context"]

_log = structlog.get_logger("meshlink.rabbitmq")


def ssl_context(settings: RabbitSettings) -> ssl.SSLContext | None:
    """The TLS context for ``amqps://`` (``None`` without TLS)."""
    if not settings.tls:
        return None
    ctx = ssl.create_default_context(cafile=settings.ca_file)
    if not settings.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if settings.cert_file is not None:
        ctx.load_cert_chain(settings.cert_file, settings.key_file)
    return ctx


def amqp_url(settings: RabbitSettings) -> URL:
    """The URL handed to aio-pika (it redacts the password in its own logs)."""
    query: dict[str, str] = {
        "heartbeat": str(round(settings.heartbeat)),
        "reconnect_interval": str(settings.reconnect_interval),
        "fail_fast": "1",
    }
    if settings.connection_name:
        query["name"] = settings.connection_name
    return URL.build(
        scheme="amqps" if settings.tls else "amqp",
        host=settings.host,
        port=settings.port,
        user=settings.username,
        password=settings.password,
        path="/" + settings.virtual_host,
        query=query,
    )


def redact(text: str, settings: RabbitSettings) -> str:
    """``text`` with the password replaced, for errors built from library messages."""
    if settings.password:
        text = text.replace(settings.password, "***")
    return text


async def connect(settings: RabbitSettings) -> AbstractRobustConnection:
    """Open a robust connection, failing fast if the broker cannot be reached now.

    Raises:
        TransportConnectionError: the first connection attempt failed or timed out.
    """
    # Built by hand rather than through connect_robust() so that a first attempt
    # which fails or times out can be closed: otherwise its reconnection task lives on.
    connection = aio_pika.RobustConnection(amqp_url(settings), ssl_context=ssl_context(settings))
    try:
        async with asyncio.timeout(settings.connect_timeout):
            await connection.connect(timeout=settings.connect_timeout)
        return connection
    except TimeoutError:
        await _discard(connection)
        raise TransportConnectionError(
            f"no answer from RabbitMQ within {settings.connect_timeout}s", url=settings.describe()
        ) from None
    except (aio_pika.exceptions.AMQPError, OSError, RuntimeError) as exc:
        await _discard(connection)
        _log.warning("rabbitmq.connect_failed", url=settings.describe(), error=type(exc).__name__)
        raise TransportConnectionError(
            f"cannot connect to RabbitMQ: {type(exc).__name__}: {redact(str(exc), settings)}",
            url=settings.describe(),
        ) from None
    except BaseException:
        await _discard(connection)
        raise


async def _discard(connection: AbstractRobustConnection) -> None:
    try:
        await connection.close()
    except Exception:  # closing a connection that never opened: nothing to report
        _log.debug("rabbitmq.discard_failed", exc_info=True)
