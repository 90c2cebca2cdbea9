"""Ikkuna: watch a PyTorch model while it trains, with almost no code and almost no cost.

The public face of the core; heavy optional libraries (tensorboard, matplotlib) are
imported only by the parts that need them.
"""

from . import ops
from ._bus import Handle, MessageBus, Subscription, UnknownTopicError
from ._exporter import ROOT_NAME, Exporter, select_modules, unwrap_model
from .backends.base import Backend, HistogramRecord, ScalarRecord
from .commands import SubscriberFlag
from .config import ConfigError, IkkunaConfig, SubscriberConfig, load_config
from .context import RunContext
from .errors import BackendError, IkkunaError, SubscriberError
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
from .subscriber import PerModuleSubscriber, Subscriber, SubscriberOptions, TensorOptions
from .topics import EVENT_TOPICS, MODULE_TOPICS, NETWORK_TOPICS, TopicSpec
from .watch import watch

__all__ = [
    "EVENT_TOPICS",
    "MODULE_TOPICS",
    "NETWORK_TOPICS",
    "ROOT_NAME",
    "Backend",
    "BackendError",
    "ConfigError",
    "Exporter",
    "Handle",
    "HistogramRecord",
    "HistogramsMessage",
    "IkkunaConfig",
    "IkkunaError",
    "MessageBundle",
    "MessageBus",
    "ModuleInfo",
    "ModuleMessage",
    "NetworkMessage",
    "PerModuleSubscriber",
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
    "unwrap_model",
    "watch",
]

__version__ = "0.1.0"
