"""Every setting of the Kafka transport, its default, and the checks made at construction.

Settings come from the URL query (``kafka://host:9092/?partitions=6``) and from
keyword options given to :class:`~meshlink_kafka.KafkaTransport`; options win.
Mistakes that would only show at run time as a hang are refused here, naming
the setting (see ``PITFALLS.md``: a ``request_timeout_ms`` at or below the
JoinGroup hold time means a consumer that never joins).
"""

from __future__ import annotations

import dataclasses
import ssl
import types
import typing
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from meshlink.errors import ConfigurationError

__all__ = ["KafkaSettings"]

_SCHEMES = ("kafka", "kafka+ssl")
_SASL = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_COMPRESSION = (None, "gzip", "snappy", "lz4", "zstd")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True, kw_only=True)
class KafkaSettings:
    """Connection, topic, producer and consumer settings of one Kafka transport."""

    # -- connection --------------------------------------------------------------------
    bootstrap_servers: str = "localhost:9092"
    """Comma-separated ``host:port`` list (the URL's host part)."""
    client_id: str = "meshlink"
    """Client id sent to the brokers (shows in broker logs and quotas)."""
    security_protocol: str = "PLAINTEXT"
    """PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (``kafka+ssl://`` implies SSL)."""
    sasl_mechanism: str | None = None
    """PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512; ``None`` for no SASL."""
    sasl_username: str | None = None
    """SASL user (the URL's user part); never logged."""
    sasl_password: str | None = field(default=None, repr=False)
    """SASL password (the URL's password part); never logged nor shown by ``describe()``."""
    ssl_cafile: str | None = None
    """CA bundle to verify the brokers with (SSL); the system store by default."""
    ssl_certfile: str | None = None
    """Client certificate for mutual TLS."""
    ssl_keyfile: str | None = None
    """Private key of ``ssl_certfile``."""
    connect_timeout: float = 15.0
    """Seconds the first connect may take before it fails."""
    request_timeout_ms: int = 40_000
    """Kafka request timeout; must exceed ``max(session, rebalance timeout) + 5 s``."""
    close_timeout: float = 10.0
    """Seconds each client may take to stop on close (``stop()`` can block when brokers are down)."""

    # -- topics ------------------------------------------------------------------------
    create_topics: bool = True
    """Create missing topics through the admin client; ``False`` requires them to exist."""
    partitions: int = 3
    """Partition count of topics this transport creates."""
    replication_factor: int = 1
    """Replication factor of topics this transport creates (use 3 on a production cluster)."""

    # -- producer ----------------------------------------------------------------------
    linger_ms: int = 0
    """How long a batch may wait for more records before it goes out (``acks`` is always ``all``).

    0, aiokafka's default, is right for most services: a batch takes everything
    published for its partition while the partition's previous batch waits to go out,
    so batches grow with load without lingering. A few milliseconds
    trade latency for bigger batches when publishes trickle in one at a time."""
    max_batch_size: int = 65_536
    """Bytes per partition batch."""
    compression_type: str | None = None
    """None, gzip, snappy, lz4 or zstd (the last three need their Python packages)."""
    max_request_size: int = 1_048_576
    """Largest produce request in bytes; a bigger message fails before it is sent."""
    enable_idempotence: bool = False
    """Idempotent producer (real Kafka only: the test broker cannot do it, so it is untested here)."""
    publish_timeout: float = 30.0
    """Deadline in seconds on every send; past it the outcome is unknown (PublishTimeoutError)."""

    # -- consumer ----------------------------------------------------------------------
    session_timeout_ms: int = 10_000
    """Group session timeout."""
    heartbeat_interval_ms: int = 3_000
    """Heartbeat interval; must be below the session timeout (a third is usual)."""
    rebalance_timeout_ms: int = 30_000
    """How long the group waits for members to rejoin (and finish revocation) in a rebalance."""
    max_poll_interval_ms: int = 300_000
    """Most time between polls before the member leaves (our poll loop never stops while handlers run)."""
    fetch_max_wait_ms: int = 500
    """Longest a fetch waits on the broker for records."""
    max_poll_records: int = 500
    """Most records taken from the client per poll."""
    max_buffered: int = 2_000
    """Fetched records held per subscription before its partitions are paused (backpressure)."""
    auto_offset_reset: str = "earliest"
    """Where a partition without a committed offset starts: earliest or latest (see README)."""
    seed_new_groups: bool = True
    """Declaring a new group commits the log end, so it gets exactly what is published afterwards;
    ``False`` leaves a new group to ``auto_offset_reset`` (``earliest``: the topic's history)."""
    isolation_level: str = "read_uncommitted"
    """read_uncommitted or read_committed (for transactional producers on real Kafka)."""
    commit_interval: float = 1.0
    """Seconds between batched offset commits."""
    commit_every: int = 1_000
    """Commit early once this many deliveries were settled since the last commit."""
    drain_timeout: float = 10.0
    """Seconds a revoked partition's in-flight deliveries may take to settle before release."""
    stall_timeout: float = 60.0
    """Seconds between stall checks: a member that fetched nothing between two checks while the
    broker reports lag is recreated (aiokafka #1154); ``0`` turns the watchdog off."""

    group_id_format: str = "{group}.{destination}"
    """Kafka group id of a meshlink group; ``{group}`` alone shares one Kafka group across topics."""

    # -- delay -------------------------------------------------------------------------
    delay_topic_prefix: str = "meshlink.delay"
    """Prefix of the delay topics (one per delay tier, e.g. ``meshlink.delay.5s``)."""
    delay_group: str = "meshlink.delay"
    """Consumer group of the delay relays (all meshlink processes of a cluster share it)."""
    delay_consumer: str = "auto"
    """When this transport runs a delay relay: auto (after its first delayed publish), always, never."""

    def __post_init__(self) -> None:
        self._validate()

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, **options: Any) -> KafkaSettings:
        """Build settings from ``kafka://[user:password@]host:port[,host:port]/?setting=value``."""
        parts = urlsplit(url)
        if parts.scheme not in _SCHEMES:
            raise ConfigurationError("url", f"not a kafka URL: {parts.scheme}://")
        userinfo, _, hosts = parts.netloc.rpartition("@")
        values: dict[str, Any] = {}
        if hosts:
            values["bootstrap_servers"] = hosts
        if userinfo:
            user, _, password = userinfo.partition(":")
            values["sasl_username"] = unquote(user)
            if password:
                values["sasl_password"] = unquote(password)
            values["sasl_mechanism"] = "PLAIN"
        for key, raw in parse_qsl(parts.query, keep_blank_values=True):
            values[key] = raw
        values.update(options)
        if parts.scheme == "kafka+ssl" and "security_protocol" not in values:
            values["security_protocol"] = "SASL_SSL" if values.get("sasl_mechanism") else "SSL"
        elif values.get("sasl_mechanism") and "security_protocol" not in values:
            values["security_protocol"] = "SASL_PLAINTEXT"
        return cls(**_coerce(values))

    # -- derived -----------------------------------------------------------------------

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments common to aiokafka's producer, consumer and admin client."""
        kw: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "request_timeout_ms": self.request_timeout_ms,
            "security_protocol": self.security_protocol,
        }
        if "SSL" in self.security_protocol:
            kw["ssl_context"] = self.ssl_context()
        if self.sasl_mechanism:
            kw["sasl_mechanism"] = self.sasl_mechanism
            kw["sasl_plain_username"] = self.sasl_username
            kw["sasl_plain_password"] = self.sasl_password
        return kw

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context for SSL / SASL_SSL."""
        ctx = ssl.create_default_context(cafile=self.ssl_cafile)
        if self.ssl_certfile:
            ctx.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
        return ctx

    def group_id(self, destination: str, group: str) -> str:
        """The Kafka consumer group id of ``group`` on ``destination``."""
        return self.group_id_format.format(group=group, destination=destination)

    def consumer_kwargs(self, group: str) -> dict[str, Any]:
        """Keyword arguments of one group member's ``AIOKafkaConsumer``."""
        return {
            **self.client_kwargs(),
            "group_id": group,
            "enable_auto_commit": False,
            "auto_offset_reset": self.auto_offset_reset,
            "session_timeout_ms": self.session_timeout_ms,
            "heartbeat_interval_ms": self.heartbeat_interval_ms,
            "rebalance_timeout_ms": self.rebalance_timeout_ms,
            "max_poll_interval_ms": self.max_poll_interval_ms,
            "fetch_max_wait_ms": self.fetch_max_wait_ms,
            "max_poll_records": self.max_poll_records,
            "isolation_level": self.isolation_level,
        }

    def producer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the transport's ``AIOKafkaProducer``."""
        return {
            **self.client_kwargs(),
            "acks": "all",
            "linger_ms": self.linger_ms,
            "max_batch_size": self.max_batch_size,
            "compression_type": self.compression_type,
            "max_request_size": self.max_request_size,
            "enable_idempotence": self.enable_idempotence,
        }

    def describe(self) -> str:
        """One line without credentials."""
        auth = f" sasl={self.sasl_mechanism}" if self.sasl_mechanism else ""
        return f"kafka://{self.bootstrap_servers} ({self.security_protocol}{auth})"

    # -- validation --------------------------------------------------------------------

    def _validate(self) -> None:
        def need(ok: bool, setting: str, msg: str) -> None:
            if not ok:
                raise ConfigurationError(setting, msg)

        need(bool(self.bootstrap_servers.strip()), "bootstrap_servers", "at least one host:port is needed")
        protocols = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
        need(self.security_protocol in protocols, "security_protocol", f"must be one of {protocols}")
        if self.sasl_mechanism is not None:
            need(self.sasl_mechanism in _SASL, "sasl_mechanism", f"must be one of {_SASL}")
            need(bool(self.sasl_username), "sasl_username", "SASL needs a user name")
            need(self.sasl_password is not None, "sasl_password", "SASL needs a password")
            need(
                "SASL" in self.security_protocol, "security_protocol", "SASL needs SASL_PLAINTEXT or SASL_SSL"
            )
        for name in (
            "partitions",
            "replication_factor",
            "max_batch_size",
            "max_request_size",
            "max_poll_records",
            "max_buffered",
            "commit_every",
        ):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        for name in (
            "connect_timeout",
            "close_timeout",
            "publish_timeout",
            "commit_interval",
            "drain_timeout",
        ):
            need(getattr(self, name) > 0, name, "must be > 0 seconds")
        need(self.linger_ms >= 0, "linger_ms", "must be >= 0")
        need(
            self.stall_timeout == 0 or self.stall_timeout * 1000 > self.fetch_max_wait_ms,
            "stall_timeout",
            "must be 0 (off) or more seconds than fetch_max_wait_ms, or a healthy fetch looks stalled",
        )
        need(self.fetch_max_wait_ms >= 0, "fetch_max_wait_ms", "must be >= 0")
        need(self.compression_type in _COMPRESSION, "compression_type", f"must be one of {_COMPRESSION}")
        if self.compression_type is not None:
            from aiokafka import codec

            has = getattr(codec, f"has_{self.compression_type}")
            need(has(), "compression_type", f"{self.compression_type} needs its Python package installed")
        need(
            self.heartbeat_interval_ms < self.session_timeout_ms,
            "heartbeat_interval_ms",
            "must be below session_timeout_ms (a third of it is usual)",
        )
        hold = max(self.session_timeout_ms, self.rebalance_timeout_ms)
        need(
            self.request_timeout_ms > hold + 5_000,
            "request_timeout_ms",
            f"must exceed max(session_timeout_ms, rebalance_timeout_ms) + 5000 = {hold + 5_000}: "
            "aiokafka sends JoinGroup with the plain request timeout, so a member would never join",
        )
        need(
            self.drain_timeout * 1000 < self.rebalance_timeout_ms,
            "drain_timeout",
            "must be below rebalance_timeout_ms, or a revocation outlives the rebalance",
        )
        need(
            self.max_poll_interval_ms >= self.rebalance_timeout_ms,
            "max_poll_interval_ms",
            "must be >= rebalance_timeout_ms",
        )
        need(self.auto_offset_reset in ("earliest", "latest"), "auto_offset_reset", "earliest or latest")
        need(
            self.isolation_level in ("read_uncommitted", "read_committed"),
            "isolation_level",
            "read_uncommitted or read_committed",
        )
        need(self.delay_consumer in ("auto", "always", "never"), "delay_consumer", "auto, always or never")
        need(bool(self.delay_topic_prefix), "delay_topic_prefix", "must not be empty")
        need(bool(self.delay_group), "delay_group", "must not be empty")
        try:
            probe = self.group_id_format.format(group="g", destination="d")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigurationError(
                "group_id_format", f"only {{group}} and {{destination}}: {exc}"
            ) from None
        need("{group}" in self.group_id_format and bool(probe), "group_id_format", "must contain {group}")


def _coerce(values: dict[str, Any]) -> dict[str, Any]:
    """Turn URL strings into the field types; refuse unknown names."""
    hints = typing.get_type_hints(KafkaSettings)
    known = {f.name for f in dataclasses.fields(KafkaSettings)}
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name not in known:
            raise ConfigurationError(name, f"unknown Kafka setting (known: {', '.join(sorted(known))})")
        out[name] = _convert(name, value, hints[name]) if isinstance(value, str) else value
    return out


def _convert(name: str, raw: str, hint: Any) -> Any:
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    if optional and raw.lower() in ("", "none", "null"):
        return None
    try:
        if base is bool:
            if raw.lower() in _TRUE:
                return True
            if raw.lower() in _FALSE:
                return False
            raise ValueError(raw)
        if base is int:
            return int(raw)
        if base is float:
            return float(raw)
    except ValueError:
        raise ConfigurationError(name, f"cannot read {raw!r} as {base.__name__}") from None
    return raw
