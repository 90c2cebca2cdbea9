"""Ikkuna: watch a PyTorch model while it trains, with almost no code and almost no cost.

The public face of the core; heavy optional libraries (tensorboard, matplotlib) are
imported only by the parts that need them.
"""

from .bus import MessageBus, Subscription, SynchronizedSubscription, UnknownTopicError
from .config import ConfigError, IkkunaConfig, SubscriberConfig, load_config
from .context import RunContext
from .exporter import Exporter, select_modules
from .hookspecs import hookimpl
from .messages import (
    EVENT_TOPICS,
    MODULE_TOPICS,
    NETWORK_TOPICS,
    HistogramMessage,
    MessageBundle,
    ModuleInfo,
    ModuleMessage,
    NetworkMessage,
    ScalarMessage,
    TopicSpec,
    message_json_schema,
)
from .plugins import PluginError, PluginRegistry, load_plugins
from .subscriber import Subscriber, SubscriberOptions, TensorOptions, histogram_on_device
from .watch import watch

__all__ = [
    "EVENT_TOPICS",
    "MODULE_TOPICS",
    "NETWORK_TOPICS",
    "ConfigError",
    "Exporter",
    "HistogramMessage",
    "IkkunaConfig",
    "MessageBundle",
    "MessageBus",
    "ModuleInfo",
    "ModuleMessage",
    "NetworkMessage",
    "PluginError",
    "PluginRegistry",
    "RunContext",
    "ScalarMessage",
    "Subscriber",
    "SubscriberConfig",
    "SubscriberOptions",
    "Subscription",
    "SynchronizedSubscription",
    "TensorOptions",
    "TopicSpec",
    "UnknownTopicError",
    "hookimpl",
    "histogram_on_device",
    "load_config",
    "load_plugins",
    "message_json_schema",
    "select_modules",
    "watch",
]

__version__ = "0.1.0"
