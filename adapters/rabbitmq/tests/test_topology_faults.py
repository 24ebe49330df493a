"""RabbitMQ topology and delay settings: names mistaken or refused late (each test failed before its fix)."""

from __future__ import annotations

from typing import Any

import pytest
from rabbit_helpers import Collect, name

from meshlink.errors import ConfigurationError
from meshlink.message import Message
from meshlink.transport.base import SubscriptionSpec
from meshlink_rabbitmq import RabbitSettings

pytestmark = pytest.mark.rabbitmq


async def test_a_destination_named_like_an_internal_declaration_key_is_declared(cleanup: Any) -> None:
    """Topology._once keys exchanges by bare name next to 'route:<dest>': the exchange is never declared."""
    t = cleanup.transport(delay_prefix=name("revkey"))
    await t.connect()
    dest = name("revdest")
    await t.declare(dest, "g")
    await t.publish(dest, Message(body=b"d"), delay=0.05)  # marks 'route:<dest>' done
    odd = f"route:{dest}"
    got = Collect()
    await t.subscribe(SubscriptionSpec(destination=odd, group="g"), got)  # TransportError before a fix
    await t.publish(odd, Message(body=b"x"))  # before a fix: NOT_FOUND closes the publish channel
    await got.wait_for(b"x")


async def test_a_group_on_a_destination_named_like_the_delay_prefix_gets_no_delayed_traffic(
    cleanup: Any,
) -> None:
    """The destination exchange and the delay entry exchange share one _once key: the group is
    bound with '#' to the *headers* entry exchange, which matches every delayed message."""
    prefix = name("revpfx")
    t = cleanup.transport(delay_prefix=prefix)
    await t.connect()
    other = name("revother")
    legit = Collect()
    await t.subscribe(SubscriptionSpec(destination=other, group="g"), legit)
    await t.publish(other, Message(body=b"warm"), delay=0.05)  # declares the delay route
    await legit.wait_for(b"warm")
    spy = Collect()
    try:
        await t.subscribe(SubscriptionSpec(destination=prefix, group="spy"), spy)
    except ConfigurationError:
        return  # refusing the reserved name is a correct outcome
    await t.publish(other, Message(body=b"secret"), delay=0.05)
    await legit.wait_for(b"secret")
    await t.publish(prefix, Message(body=b"sentinel"))
    await spy.wait_for(b"sentinel")
    assert spy.bodies == [b"sentinel"], f"group of destination {prefix!r} received {spy.bodies}"


@pytest.mark.parametrize("prefix", ["p" * 250, "amq.meshlink"])
def test_a_delay_prefix_that_cannot_be_declared_fails_at_construction(prefix: str) -> None:
    """'<prefix>.return' over 255 bytes (or in the reserved amq. namespace) only fails at the first delay."""
    with pytest.raises(ConfigurationError) as info:
        RabbitSettings(delay_prefix=prefix)
    assert "delay_prefix" in str(info.value)


async def test_a_destination_name_over_255_bytes_is_a_configuration_error(cleanup: Any) -> None:
    """Today pamqp's raw ValueError ('Max length exceeded for exchange') reaches the caller."""
    t = cleanup.transport(delay_prefix=name("revlong"))
    await t.connect()
    long = "d" * 256
    with pytest.raises(ConfigurationError):
        await t.declare(long, "g")
    with pytest.raises(ConfigurationError):
        await t.publish(long, Message(body=b"x"))
    with pytest.raises(ConfigurationError):
        await t.publish(long, Message(body=b"x"), delay=0.05)
