"""meshlink-rabbitmq: the ``amqp://`` / ``amqps://`` transport for meshlink, on aio-pika."""

from meshlink_rabbitmq.consumer import RabbitDelivery, RabbitSubscription
from meshlink_rabbitmq.publisher import MessageTooLargeError
from meshlink_rabbitmq.recovery import ConsumerRecovery
from meshlink_rabbitmq.settings import RabbitSettings, SubscriptionOptions
from meshlink_rabbitmq.transport import RabbitTransport

__all__ = [
    "ConsumerRecovery",
    "MessageTooLargeError",
    "RabbitDelivery",
    "RabbitSettings",
    "RabbitSubscription",
    "RabbitTransport",
    "SubscriptionOptions",
]
