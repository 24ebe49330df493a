"""Topics and groups: create topics through the admin client, start new groups at the log end.

Topics are created on demand with the configured partition count (never by the
broker's auto-create on produce, which would give them one partition), or
required to exist when ``create_topics=False``.

A Kafka group keeps messages by itself: it is only a committed position per
partition. ``declare(destination, group)`` gives a *new* group (no committed
offset yet) a committed position at the current log end, so that it receives
exactly the messages published after the declaration, even if it subscribes
much later. A group that already has positions, or live members, is left
alone. Partitions that still have no position (the commit was refused) start
at ``auto_offset_reset`` (``earliest`` by default): more history, never a loss.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from meshlink.errors import TransportError, UnroutableError
from meshlink_kafka.settings import KafkaSettings

__all__ = ["TopicManager"]

_log = structlog.get_logger("meshlink.kafka")
_TOPIC_EXISTS = TopicAlreadyExistsError.errno


class TopicManager:
    """Creates topics once per process and seeds new groups' positions."""

    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._admin: AIOKafkaAdminClient | None = None
        self._known: dict[str, int] = {}
        self._creating: dict[str, asyncio.Future[int]] = {}
        self._seeded: set[tuple[str, str]] = set()

    async def start(self) -> None:
        """Connect the admin client (raises aiokafka errors when unreachable)."""
        self._admin = AIOKafkaAdminClient(**self._settings.client_kwargs())
        await self._admin.start()

    async def close(self) -> None:
        """Disconnect the admin client."""
        if self._admin is not None:
            admin, self._admin = self._admin, None
            await admin.close()

    def known(self) -> dict[str, int]:
        """Topics seen so far, with their partition counts."""
        return dict(self._known)

    def is_known(self, topic: str) -> bool:
        """Whether ``topic`` was already made sure of (``ensure`` would return at once)."""
        return topic in self._known

    async def ensure(self, topic: str) -> int:
        """Make ``topic`` exist (or check it does); return its partition count."""
        count = self._known.get(topic)
        if count is not None:
            return count
        pending = self._creating.get(topic)
        if pending is None:
            # one admin round trip per topic, shared by concurrent publishers
            pending = asyncio.get_running_loop().create_future()
            self._creating[topic] = pending
            try:
                count = await self._ensure(topic)
            except BaseException as exc:
                # the creator's own cancel is not the waiters': they get an error of their own
                shared: BaseException = exc
                if isinstance(exc, asyncio.CancelledError):
                    why = "topic creation abandoned: its caller was cancelled"
                    shared = TransportError(why, destination=topic)
                pending.set_exception(shared)
                pending.exception()  # retrieved: waiters (if any) see it through await
                raise
            finally:
                del self._creating[topic]
            self._known[topic] = count
            pending.set_result(count)
            return count
        return await asyncio.shield(pending)

    async def _ensure(self, topic: str) -> int:
        # never describe a topic that may not exist: a metadata request can auto-create it
        admin = self._live()
        if not self._settings.create_topics:
            if topic not in await admin.list_topics():
                raise UnroutableError("topic does not exist and create_topics is off", destination=topic)
            return await self._partitions(admin, topic)
        new = NewTopic(topic, self._settings.partitions, self._settings.replication_factor)
        try:
            resp = await admin.create_topics([new])
        except TopicAlreadyExistsError:
            pass
        except KafkaError as exc:
            raise TransportError(f"cannot create topic: {exc}", destination=topic) from exc
        else:
            for _, code, message in _topic_errors(resp):
                if code not in (0, _TOPIC_EXISTS):
                    raise TransportError(f"cannot create topic: error {code} {message}", destination=topic)
                if code == 0:
                    _log.info("kafka topic created", topic=topic, partitions=self._settings.partitions)
        for _ in range(50):
            count = await self._partitions(admin, topic)
            if count:
                return count
            await asyncio.sleep(0.1)  # metadata can lag creation by a moment on a real cluster
        raise TransportError("topic was created but has no partitions in metadata", destination=topic)

    @staticmethod
    async def _partitions(admin: AIOKafkaAdminClient, topic: str) -> int:
        described = await admin.describe_topics([topic])
        for t in described:
            if t.get("topic") == topic and t.get("error_code", 0) == 0:
                return len(t.get("partitions") or ())
        return 0

    async def seed_group(self, topic: str, group: str) -> None:
        """Give a new ``group`` (a Kafka group id) a committed position at the current end of ``topic``."""
        if (topic, group) in self._seeded:
            return
        count = await self.ensure(topic)
        if not self._settings.seed_new_groups:
            return
        if await self._has_members(group):
            self._seeded.add((topic, group))
            return
        tps = [TopicPartition(topic, p) for p in range(count)]
        consumer = AIOKafkaConsumer(**self._settings.consumer_kwargs(group))
        try:
            await consumer.start()
            consumer.assign(tps)
            missing = [tp for tp in tps if await consumer.committed(tp) is None]
            if missing:
                ends = await consumer.end_offsets(missing)
                # generation -1: a commit outside any rebalance, refused by Kafka while the
                # group has live members (then auto_offset_reset decides, see the module doc)
                await consumer.commit({tp: ends[tp] for tp in missing})
                _log.debug("kafka group seeded at log end", topic=topic, group=group)
        except KafkaError as exc:
            _log.info("kafka group not seeded; auto_offset_reset applies", group=group, error=str(exc))
        finally:
            try:
                await asyncio.wait_for(consumer.stop(), self._settings.close_timeout)
            except (TimeoutError, KafkaError) as exc:  # the seeding itself is done or logged
                _log.warning("kafka seeding client did not stop cleanly", group=group, error=repr(exc))
        self._seeded.add((topic, group))

    async def _has_members(self, group: str) -> bool:
        try:
            described = await self._live().describe_consumer_groups([group])
        except KafkaError:
            return False
        for resp in described:
            for g in getattr(resp, "groups", ()):
                if _field(g, 1) == group and (_field(g, 5) or _field(g, 2) not in ("Empty", "Dead", "")):
                    return True
        return False

    def _live(self) -> AIOKafkaAdminClient:
        if self._admin is None:
            raise TransportError("kafka admin client is not connected")
        return self._admin


def _field(row: Any, index: int) -> Any:
    try:
        return row[index]
    except (IndexError, TypeError):
        return None


def _topic_errors(resp: Any) -> list[tuple[str, int, str | None]]:
    out: list[tuple[str, int, str | None]] = []
    for row in getattr(resp, "topic_errors", ()):
        name, code = row[0], row[1]
        out.append((name, code, row[2] if len(row) > 2 else None))
    return out
