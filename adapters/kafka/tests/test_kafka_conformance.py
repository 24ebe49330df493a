"""The transport conformance suite, against the Kafka-protocol broker."""

from __future__ import annotations

import pytest
from kafka_helpers import TEST_OPTIONS

from meshlink.testing.conformance import Features, TransportConformance
from meshlink.transport.base import Transport
from meshlink_kafka import KafkaTransport


class TestKafkaConformance(TransportConformance):
    # Kafka keeps messages of topics nobody consumes: publishing there is not an error.
    features = Features(unroutable_raises=False, timeout=45.0)

    @pytest.fixture(autouse=True)
    def _bootstrap(self, kafka_bootstrap: str) -> None:
        self.bootstrap = kafka_bootstrap

    def make_transport(self) -> Transport:
        # Delay topics and relay group per test: every test starts from a fresh relay group
        # (the test broker mishandles a group that is re-joined after all its members left).
        return KafkaTransport(
            f"kafka://{self.bootstrap}",
            delay_topic_prefix=f"{self.namespace}.delay",
            delay_group=f"{self.namespace}.delay",
            **TEST_OPTIONS,
        )
