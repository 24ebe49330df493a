"""meshlink-kafka: the ``kafka://`` and ``kafka+ssl://`` transports for meshlink, on aiokafka."""

from meshlink_kafka.settings import KafkaSettings
from meshlink_kafka.transport import KafkaTransport

__all__ = ["KafkaSettings", "KafkaTransport"]
