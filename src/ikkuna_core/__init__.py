"""Ikkuna: watch a PyTorch model while it trains, with almost no code and almost no cost.

The public face of the core; heavy optional libraries (tensorboard, matplotlib) are
imported only by the parts that need them.
"""

from . import ops
from .backends.base import Backend, HistogramRecord, ScalarRecord
from .bus import MessageBus, Subscription, UnknownTopicError
from .commands import SubscriberFlag
from .config import ConfigError, IkkunaConfig, SubscriberConfig, load_config
from .context import RunContext
from .errors import BackendError, IkkunaError, SubscriberError
from .exporter import Exporter, select_modules
from .hookspecs import hookimpl
from .messages import (
    HistogramsMessage,
    MessageBundle,
    ModuleInfo,
    ModuleMessage,
    NetworkMessage,
    ScalarsMessage,
    StepBundle,
    TopicPayloads,
    message_json_schema,
)
from .plugins import PluginError, PluginRegistry, load_plugins
from .subscriber import Subscriber, SubscriberOptions, TensorOptions
from .topics import EVENT_TOPICS, MODULE_TOPICS, NETWORK_TOPICS, TopicSpec
from .watch import watch

__all__ = [
    "EVENT_TOPICS",
    "MODULE_TOPICS",
    "NETWORK_TOPICS",
    "Backend",
    "BackendError",
    "ConfigError",
    "Exporter",
    "HistogramRecord",
    "HistogramsMessage",
    "IkkunaConfig",
    "IkkunaError",
    "MessageBundle",
    "MessageBus",
    "ModuleInfo",
    "ModuleMessage",
    "NetworkMessage",
    "PluginError",
    "PluginRegistry",
    "RunContext",
    "ScalarRecord",
    "ScalarsMessage",
    "StepBundle",
    "Subscriber",
    "SubscriberConfig",
    "SubscriberFlag",
    "SubscriberError",
    "SubscriberOptions",
    "Subscription",
    "TensorOptions",
    "TopicPayloads",
    "TopicSpec",
    "UnknownTopicError",
    "hookimpl",
    "load_config",
    "load_plugins",
    "message_json_schema",
    "ops",
    "select_modules",
    "watch",
]

__version__ = "0.1.0"
