"""Settings: URL and keyword parsing, validation naming the setting, no password anywhere."""

from __future__ import annotations

import pytest
import structlog

from meshlink.errors import ConfigurationError, TransportConnectionError
from meshlink.transport.registry import transport_from_url
from meshlink_rabbitmq import RabbitSettings, RabbitTransport, SubscriptionOptions

SECRET = "s3cr3t-Pa55"


def test_url_gives_credentials_host_port_vhost_and_query_settings() -> None:
    s = RabbitSettings.from_url(
        f"amqp://app:{SECRET}@mq.example:5673/prod%2Feu?heartbeat=5&queue_type=quorum"
    )
    assert (s.username, s.password, s.host, s.port, s.virtual_host) == (
        "app",
        SECRET,
        "mq.example",
        5673,
        "prod/eu",
    )
    assert s.heartbeat == 5.0
    assert s.queue_type == "quorum"
    assert not s.tls


def test_defaults_are_a_short_heartbeat_and_a_publish_deadline() -> None:
    s = RabbitSettings.from_url("amqp://localhost/")
    assert s.heartbeat == 10.0
    assert s.publish_timeout > 0
    assert s.virtual_host == "/"
    assert s.persistent


def test_keyword_options_win_over_the_url() -> None:
    s = RabbitSettings.from_url(
        "amqp://h/?publish_timeout=3", publish_timeout=7, single_active_consumer="true"
    )
    assert s.publish_timeout == 7.0
    assert s.single_active_consumer is True


def test_amqps_turns_tls_on_with_its_default_port() -> None:
    s = RabbitSettings.from_url("amqps://h/")
    assert s.tls
    assert s.port == 5671


@pytest.mark.parametrize(
    ("url", "options", "setting"),
    [
        ("amqp://h/?publish_timeout=soon", {}, "publish_timeout"),
        ("amqp://h/?queue_type=stream", {}, "queue_type"),
        ("amqp://h/?bogus=1", {}, "bogus"),
        ("amqp://h/", {"prefetch_everything": True}, "prefetch_everything"),
        ("amqp://h/", {"single_active_consumer": "maybe"}, "single_active_consumer"),
        ("amqps://h/", {"ca_file": "/no/such/ca.pem"}, "ca_file"),
        ("amqp://h/", {"delay_digits": 0}, "delay_digits"),
        ("amqp://h/", {"heartbeat": 0.4}, "heartbeat"),
        ("http://h/", {}, "url"),
    ],
)
def test_a_bad_setting_raises_configuration_error_naming_it(
    url: str, options: dict[str, object], setting: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        RabbitSettings.from_url(url, **options)
    assert info.value.setting == setting


def test_subscription_options_override_and_are_validated() -> None:
    s = RabbitSettings.from_url("amqp://h/")
    opts = SubscriptionOptions.resolve(s, {"queue_type": "quorum", "single_active_consumer": True})
    assert opts.queue_arguments() == {"x-queue-type": "quorum", "x-single-active-consumer": True}
    assert SubscriptionOptions.resolve(s, {}).queue_arguments() == {}
    with pytest.raises(ConfigurationError) as info:
        SubscriptionOptions.resolve(s, {"durable": False})
    assert info.value.setting == "options"


def test_password_is_not_in_repr_or_describe() -> None:
    t = RabbitTransport(f"amqp://app:{SECRET}@h/")
    for text in (repr(t.settings), t.describe(), repr(t), str(t.settings)):
        assert SECRET not in text
    assert t.describe() == "amqp://app@h:5672/%2F"


def test_registry_finds_the_transport_for_both_schemes() -> None:
    assert isinstance(transport_from_url("amqp://h/"), RabbitTransport)
    assert isinstance(transport_from_url("amqps://h/", tls_verify=False), RabbitTransport)


async def test_password_never_reaches_logs_or_errors(
    rabbit_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    host = rabbit_url.split("@", 1)[1]
    bad = RabbitTransport(f"amqp://guest:{SECRET}@{host}", connect_timeout=5)
    closed_port = RabbitTransport(f"amqp://guest:{SECRET}@127.0.0.1:1/", connect_timeout=5)
    good = RabbitTransport(rabbit_url, password="guest")
    with structlog.testing.capture_logs() as logs, caplog.at_level("DEBUG"):
        errors = []
        for t in (bad, closed_port):
            with pytest.raises(TransportConnectionError) as info:
                await t.connect()
            errors.append(str(info.value))
        await good.connect()
        await good.close()
    assert logs, "expected some structured log lines"
    for text in [*errors, *(repr(e) for e in logs), caplog.text]:
        assert SECRET not in text
    assert any(e["event"] == "rabbitmq.connected" for e in logs)


def test_quorum_delivery_limit_becomes_a_queue_argument_and_is_refused_on_classic() -> None:
    from meshlink import ConfigurationError
    from meshlink_rabbitmq.settings import RabbitSettings, SubscriptionOptions

    quorum = RabbitSettings(queue_type="quorum")
    options = SubscriptionOptions.resolve(quorum, {"delivery_limit": "7"})
    assert options.queue_arguments() == {"x-queue-type": "quorum", "x-delivery-limit": 7}
    with pytest.raises(ConfigurationError, match="quorum queues only"):
        SubscriptionOptions.resolve(RabbitSettings(), {"delivery_limit": 7})
