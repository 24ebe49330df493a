"""The transport conformance suite, run against the real RabbitMQ server."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from meshlink.testing.conformance import Features, TransportConformance
from meshlink.transport.base import Transport
from meshlink_rabbitmq import RabbitTransport

pytestmark = pytest.mark.rabbitmq


class _RabbitSuite(TransportConformance):
    options: ClassVar[dict[str, Any]] = {}

    @pytest.fixture(autouse=True)
    def _rabbit(self, cleanup: Any) -> None:
        self._cleanup = cleanup

    def make_transport(self) -> Transport:
        t: RabbitTransport = self._cleanup.transport(**self.options)
        return t


class TestRabbitConformance(_RabbitSuite):
    """Classic queues: no delivery count on redelivery, per-key order within one consumer."""

    features = Features(per_key_order_across_consumers=False, delivery_count=False)


class TestRabbitQuorumConformance(_RabbitSuite):
    """Quorum queues: the broker counts deliveries (``x-delivery-count``)."""

    features = Features(per_key_order_across_consumers=False, delivery_count=True)
    options: ClassVar[dict[str, Any]] = {"queue_type": "quorum"}
