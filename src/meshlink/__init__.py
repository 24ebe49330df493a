"""meshlink: one asyncio messaging API over RabbitMQ, Kafka and memory."""

from meshlink._version import __version__

__all__ = ["__version__"]
