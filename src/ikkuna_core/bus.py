"""The old import path of the MessageBus (``ikkuna_core.bus``); the bus lives in
:mod:`ikkuna_core._bus`, its public names are in ``ikkuna_core``."""

from ._bus import Handle, MessageBus, Stamp, Subscription, UnknownTopicError

__all__ = ["Handle", "MessageBus", "Stamp", "Subscription", "UnknownTopicError"]
