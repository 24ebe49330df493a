"""Broker-free behaviour: settings validation, the offset tracker, the key scheduler, progress metadata,
a client's stop under cancellation."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from meshlink.errors import ConfigurationError
from meshlink.transport.registry import transport_from_url
from meshlink_kafka import KafkaSettings, KafkaTransport
from meshlink_kafka.delay import TIERS, tier_topic
from meshlink_kafka.member import Member
from meshlink_kafka.progress import MAX_METADATA, Progress, decode, encode
from meshlink_kafka.scheduler import KeyScheduler
from meshlink_kafka.tracker import OffsetTracker

pytestmark = pytest.mark.filterwarnings("ignore")


# -- settings -------------------------------------------------------------------------------


def test_url_query_and_options_build_settings_options_winning() -> None:
    s = KafkaSettings.from_url("kafka://a:1,b:2/?partitions=6&create_topics=false", partitions=9)
    assert s.bootstrap_servers == "a:1,b:2"
    assert s.partitions == 9
    assert s.create_topics is False


def test_both_schemes_are_registered_as_entry_points() -> None:
    assert isinstance(transport_from_url("kafka://h:1"), KafkaTransport)
    ssl = transport_from_url("kafka+ssl://h:1")
    assert isinstance(ssl, KafkaTransport)
    assert ssl.settings.security_protocol == "SSL"


def test_credentials_never_appear_in_describe_or_repr() -> None:
    t = KafkaTransport("kafka+ssl://alice:s3cr%40t@h:9093")
    assert t.settings.sasl_password == "s3cr@t"
    assert t.settings.security_protocol == "SASL_SSL"
    assert "s3cr" not in t.describe()
    assert "s3cr" not in repr(t.settings)


@pytest.mark.parametrize(
    ("options", "setting"),
    [
        ({"request_timeout_ms": 30_000, "rebalance_timeout_ms": 30_000}, "request_timeout_ms"),
        ({"heartbeat_interval_ms": 10_000}, "heartbeat_interval_ms"),
        ({"drain_timeout": 40.0}, "drain_timeout"),
        ({"partitions": 0}, "partitions"),
        ({"compression_type": "brotli"}, "compression_type"),
        ({"auto_offset_reset": "middle"}, "auto_offset_reset"),
        ({"delay_consumer": "sometimes"}, "delay_consumer"),
        ({"group_id_format": "{destination}"}, "group_id_format"),
        ({"sasl_mechanism": "PLAIN"}, "sasl_username"),
        ({"no_such_thing": 1}, "no_such_thing"),
    ],
)
def test_pitfalls_are_refused_at_construction_naming_the_setting(
    options: dict[str, object], setting: str
) -> None:
    with pytest.raises(ConfigurationError) as err:
        KafkaTransport("kafka://h:1", **options)
    assert err.value.setting == setting


def test_unreadable_url_value_names_the_setting() -> None:
    with pytest.raises(ConfigurationError) as err:
        KafkaSettings.from_url("kafka://h:1/?partitions=many")
    assert err.value.setting == "partitions"


def test_group_id_is_per_destination_by_default() -> None:
    s = KafkaSettings()
    assert s.group_id("orders", "billing") == "billing.orders"
    assert KafkaSettings(group_id_format="{group}").group_id("orders", "billing") == "billing"


# -- offset tracker ---------------------------------------------------------------------------


def test_position_waits_for_every_earlier_offset() -> None:
    t = OffsetTracker()
    for o in (10, 11, 12, 13):
        t.add(o)
    assert t.position == 10
    t.done(12)
    t.done(11)
    assert t.position == 10
    assert t.done_ahead() == {11, 12}
    t.done(10)
    assert t.position == 13
    t.done(13)
    assert t.position == 14
    assert t.pending == 0


def test_gaps_in_offsets_do_not_hold_the_position() -> None:
    t = OffsetTracker()
    t.add(5)
    t.add(9)  # 6-8 were control records or compacted away
    t.done(5)
    assert t.position == 9


# -- key scheduler ------------------------------------------------------------------------------


@dataclass
class Rec:
    partition_key: int
    order_key: str | None
    n: int


def test_a_key_waits_for_its_previous_record_other_keys_go_ahead() -> None:
    s: KeyScheduler[Rec] = KeyScheduler()
    a1, a2, b1, n1 = Rec(0, "a", 1), Rec(0, "a", 2), Rec(0, "b", 1), Rec(0, None, 1)
    for r in (a1, a2, b1, n1):
        s.add(r)
    assert [s.pop(), s.pop(), s.pop(), s.pop()] == [a1, b1, n1, None]
    s.release(a1)
    assert s.pop() is a2


def test_a_requeued_record_comes_back_first_and_keeps_its_key_busy() -> None:
    s: KeyScheduler[Rec] = KeyScheduler()
    a1, a2, b1 = Rec(0, "a", 1), Rec(0, "a", 2), Rec(0, "b", 1)
    for r in (a1, a2, b1):
        s.add(r)
    assert s.pop() is a1
    s.requeue(a1)
    assert s.pop() is a1
    assert s.pop() is b1
    assert s.pop() is None


def test_dropping_a_partition_forgets_only_its_records() -> None:
    s: KeyScheduler[Rec] = KeyScheduler()
    for r in (Rec(0, "a", 1), Rec(0, "a", 2), Rec(1, "a", 1)):
        s.add(r)
    assert s.drop_partition(0) == 2
    assert s.size == 1
    popped = s.pop()
    assert popped is not None
    assert popped.partition_key == 1


# -- progress metadata and delay tiers ------------------------------------------------------------


def test_progress_round_trips_relative_to_the_committed_position() -> None:
    p = Progress(handed_out=120, done=frozenset({103, 104, 105, 110}))
    text = encode(100, p)
    assert text == "h=20;d=3-5,10"
    assert decode(100, text) == p


def test_progress_that_does_not_fit_falls_back_to_redelivery() -> None:
    p = Progress(handed_out=100_000, done=frozenset(range(0, 100_000, 2)))
    text = encode(0, p)
    assert len(text) <= MAX_METADATA
    assert decode(0, text) == Progress(handed_out=100_000)


def test_foreign_metadata_is_ignored() -> None:
    assert decode(5, "written by another client") == Progress()


def test_delay_goes_to_the_smallest_tier_not_shorter() -> None:
    assert tier_topic("d", 0.5) == "d.1s"
    assert tier_topic("d", 1.0) == "d.1s"
    assert tier_topic("d", 1.01) == "d.5s"
    assert tier_topic("d", 10 * TIERS[-1]) == f"d.{TIERS[-1]}s"


# -- a consumer client's stop, when its caller is cancelled ----------------------------------


class _StoppingClient:
    """A consumer client whose stop takes until the test lets it finish."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.finished = False

    async def stop(self) -> None:
        self.started.set()
        await self.release.wait()
        self.finished = True


class _NoRebalance:
    async def on_revoked(self, revoked: set[Any]) -> None: ...

    async def on_assigned(self, assigned: set[Any], listener: Any) -> None: ...


async def test_a_client_stop_is_finished_even_when_its_caller_is_cancelled() -> None:
    """aiokafka marks a consumer closed before it stops: one stop cut short is never finished."""
    member = Member(KafkaSettings(bootstrap_servers="127.0.0.1:1"), "g", "t", _NoRebalance())
    client = _StoppingClient()
    stopping = asyncio.ensure_future(member._stop(client))  # type: ignore[arg-type]
    await client.started.wait()
    stopping.cancel()
    await asyncio.sleep(0)
    client.release.set()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert client.finished
