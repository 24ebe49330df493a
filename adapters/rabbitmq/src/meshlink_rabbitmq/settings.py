"""Settings of the RabbitMQ transport, parsed from the URL query and keyword options.

Every field below can be given in the URL query (``amqp://host/?heartbeat=5``) or
as a keyword option to :class:`~meshlink_rabbitmq.RabbitTransport`; keyword options
win. A bad value raises :class:`~meshlink.errors.ConfigurationError` naming the
setting. The password is never part of ``repr()`` or :meth:`RabbitSettings.describe`.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from meshlink.errors import ConfigurationError

__all__ = ["QUEUE_TYPES", "RabbitSettings", "SubscriptionOptions"]

QUEUE_TYPES = ("classic", "quorum")
QueueType = Literal["classic", "quorum"]
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
#: Fields that come from the URL's authority and path, not from its query.
_URL_PARTS = frozenset({"host", "port", "username", "password", "virtual_host", "tls"})


@dataclass(frozen=True, slots=True, kw_only=True)
class RabbitSettings:
    """How to reach RabbitMQ and how to shape what the transport declares and sends."""

    host: str = "localhost"
    """Broker host name."""
    port: int = 5672
    """Broker port (5671 by default for ``amqps://``)."""
    username: str = "guest"
    """User name."""
    password: str = field(default="guest", repr=False)
    """Password; never logged, never shown by ``repr`` or ``describe``."""
    virtual_host: str = "/"
    """Virtual host."""
    tls: bool = False
    """Use TLS (set by the ``amqps://`` scheme)."""
    ca_file: str | None = None
    """CA bundle to verify the broker's certificate (TLS); system CAs when unset."""
    cert_file: str | None = None
    """Client certificate for mutual TLS."""
    key_file: str | None = None
    """Private key of the client certificate."""
    tls_verify: bool = True
    """Verify the broker's certificate and host name (TLS)."""
    heartbeat: float = 10.0
    """AMQP heartbeat in whole seconds (0: off, the broker's 60 s applies); a dead peer is
    noticed after about three of them."""
    connect_timeout: float = 10.0
    """Deadline for the first connection, in seconds."""
    reconnect_interval: float = 1.0
    """Pause between reconnection attempts after a link loss, in seconds."""
    publish_timeout: float = 15.0
    """Deadline for one publish, confirmation included; past it the outcome is unknown."""
    persistent: bool = True
    """Send messages with the persistent delivery mode."""
    queue_type: QueueType = "classic"
    """Type of group queues: ``classic`` or ``quorum`` (quorum gives delivery counts)."""
    single_active_consumer: bool = False
    """Declare group queues single-active-consumer (strict order across replicas)."""
    delay_prefix: str = "meshlink.delay"
    """Name prefix of the delay exchanges and the per-delay TTL queues."""
    delay_digits: int = 3
    """Significant digits a delay (in ms) is rounded *up* to; bounds the number of delay queues."""
    delay_pad: float = 0.02
    """Seconds added to every delay to cover the publish round trip, so nothing is early."""
    max_message_size: int = 16 * 1024 * 1024
    """Largest body accepted for publishing, in bytes (the broker closes the channel past its own)."""
    connection_name: str | None = None
    """Connection name shown in the RabbitMQ management UI."""
    consumer_timeout: float = 1800.0
    """The broker's ``consumer_timeout`` in seconds (a server setting, 30 min by default):
    a message held longer is redelivered to another consumer. ``meshlink check`` compares
    handler timeouts with it."""
    delivery_limit: int | None = None
    """Quorum queues only: ``x-delivery-limit``, deliveries after which the broker drops a message."""

    def __post_init__(self) -> None:
        if self.heartbeat != 0 and not self.heartbeat >= 1:
            # AMQP negotiates whole seconds: 0.4 would round to 0, which turns heartbeats off
            raise ConfigurationError("heartbeat", f"must be 0 (off) or >= 1 second, got {self.heartbeat!r}")
        for name in ("connect_timeout", "reconnect_interval", "publish_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(name, f"must be > 0, got {getattr(self, name)!r}")
        if self.delay_pad < 0:
            raise ConfigurationError("delay_pad", f"must be >= 0, got {self.delay_pad!r}")
        if not 1 <= self.delay_digits <= 6:
            raise ConfigurationError("delay_digits", f"must be 1..6, got {self.delay_digits!r}")
        if self.max_message_size < 1:
            raise ConfigurationError("max_message_size", "must be >= 1")
        if self.consumer_timeout <= 0:
            raise ConfigurationError("consumer_timeout", f"must be > 0, got {self.consumer_timeout!r}")
        if self.delivery_limit is not None and self.delivery_limit < 1:
            raise ConfigurationError("delivery_limit", f"must be >= 1, got {self.delivery_limit!r}")
        if not 0 < self.port < 65536:
            raise ConfigurationError("port", f"must be 1..65535, got {self.port!r}")
        if self.queue_type not in QUEUE_TYPES:
            raise ConfigurationError("queue_type", f"must be one of {QUEUE_TYPES}, got {self.queue_type!r}")
        if not self.host:
            raise ConfigurationError("host", "must not be empty")
        if not self.delay_prefix:
            raise ConfigurationError("delay_prefix", "must not be empty")
        # room for ".<ms>" (up to 10 digits) and ".return" within AMQP's 255-byte names
        if len(self.delay_prefix.encode()) > 255 - 11:
            raise ConfigurationError("delay_prefix", "must be at most 244 bytes")
        if self.delay_prefix.startswith("amq."):
            raise ConfigurationError("delay_prefix", "names starting with 'amq.' are reserved by the broker")
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ConfigurationError(name, f"no such file: {path}")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigurationError("cert_file", "cert_file and key_file go together")
        if not self.tls and (self.ca_file or self.cert_file):
            raise ConfigurationError("tls", "TLS files given but TLS is off; use amqps://")

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RabbitSettings:
        """Parse an ``amqp://`` / ``amqps://`` URL, then apply keyword ``options`` over it."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ConfigurationError("url", f"not a valid URL: {exc}") from None
        if parts.scheme not in ("amqp", "amqps"):
            raise ConfigurationError("url", f"not an amqp:// or amqps:// URL: {parts.scheme}://")
        tls = parts.scheme == "amqps"
        values: dict[str, Any] = {"tls": tls, "port": port or (5671 if tls else 5672)}
        if parts.hostname:
            values["host"] = parts.hostname
        if parts.username:
            values["username"] = unquote(parts.username)
        if parts.password is not None:
            values["password"] = unquote(parts.password)
        if parts.path not in ("", "/"):
            values["virtual_host"] = unquote(parts.path[1:])
        for name, raw in parse_qsl(parts.query, keep_blank_values=True):
            if name not in _FIELD_TYPES or name in _URL_PARTS:
                raise ConfigurationError(name, f"unknown URL query setting {name!r}")
            values[name] = _coerce(name, raw)
        for name, value in options.items():
            if name not in _FIELD_TYPES:
                raise ConfigurationError(name, f"unknown RabbitMQ transport option {name!r}")
            values[name] = _coerce(name, value)
        return cls(**values)

    def describe(self) -> str:
        """The broker address with the user but never the password."""
        scheme = "amqps" if self.tls else "amqp"
        vhost = quote(self.virtual_host, safe="")
        return f"{scheme}://{self.username}@{self.host}:{self.port}/{vhost}"


@dataclass(frozen=True, slots=True, kw_only=True)
class SubscriptionOptions:
    """Per-subscription overrides, from ``SubscriptionSpec.options``."""

    queue_type: QueueType
    """Type of this group's queue."""
    single_active_consumer: bool
    """Whether this group's queue has a single active consumer."""
    delivery_limit: int | None = None
    """Quorum queues: ``x-delivery-limit``."""

    @classmethod
    def resolve(cls, settings: RabbitSettings, options: Mapping[str, Any]) -> SubscriptionOptions:
        """Merge a subscription's options over the transport's settings."""
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = set(options) - allowed
        if unknown:
            raise ConfigurationError(
                "options",
                f"unknown RabbitMQ subscription options {sorted(unknown)}; allowed {sorted(allowed)}",
            )
        queue_type = _coerce("queue_type", options.get("queue_type", settings.queue_type))
        if queue_type not in QUEUE_TYPES:
            raise ConfigurationError("queue_type", f"must be one of {QUEUE_TYPES}, got {queue_type!r}")
        sac = _coerce(
            "single_active_consumer",
            options.get("single_active_consumer", settings.single_active_consumer),
        )
        limit = _coerce("delivery_limit", options.get("delivery_limit", settings.delivery_limit))
        if limit is not None and queue_type != "quorum":
            raise ConfigurationError("delivery_limit", "applies to quorum queues only (queue_type='quorum')")
        return cls(queue_type=queue_type, single_active_consumer=sac, delivery_limit=limit)

    def queue_arguments(self) -> dict[str, Any]:
        """The ``x-`` arguments a group queue is declared with."""
        args: dict[str, Any] = {}
        if self.queue_type == "quorum":
            # Omitted for classic: some brokers compare an explicit "classic" against a
            # queue declared without the argument and refuse it as inequivalent.
            args["x-queue-type"] = "quorum"
        if self.single_active_consumer:
            args["x-single-active-consumer"] = True
        if self.delivery_limit is not None:
            args["x-delivery-limit"] = self.delivery_limit
        return args


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(RabbitSettings)
    return {f.name: hints[f.name] for f in dataclasses.fields(RabbitSettings)}


_FIELD_TYPES = _field_types()


def _coerce(name: str, value: Any) -> Any:
    """Turn a URL string (or a keyword value) into the field's type, or say which setting is wrong."""
    kind = _FIELD_TYPES[name]
    args = typing.get_args(kind)
    optional = type(None) in args
    if optional and (value is None or value == ""):
        return None
    if optional:
        kind = next(a for a in args if a is not type(None))  # int | None -> int, str | None -> str
        args = typing.get_args(kind)
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigurationError(name, f"expected a boolean, got {value!r}")
    if kind is int or kind is float:
        if isinstance(value, bool):
            raise ConfigurationError(name, f"expected a number, got {value!r}")
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise ConfigurationError(name, f"expected a number, got {value!r}") from None
    if typing.get_origin(kind) is Literal:
        if value not in args:
            raise ConfigurationError(name, f"must be one of {args}, got {value!r}")
        return value
    if not isinstance(value, str):
        raise ConfigurationError(name, f"expected a string, got {type(value).__name__}")
    return value
