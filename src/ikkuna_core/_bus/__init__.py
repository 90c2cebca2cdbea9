"""The MessageBus and its parts: routing and error policy (:mod:`.routing`,
:mod:`.policy`), the results sink (:mod:`.results`), the transfer to the backends
(:mod:`.transfer`)."""

from .consumer import Consumer
from .policy import ErrorPolicy
from .results import Results
from .routing import (
    FINITENESS,
    FINITENESS_IF_LOSS,
    Handle,
    MessageBus,
    Stamp,
    Subscription,
    UnknownTopicError,
)

__all__ = [
    "FINITENESS",
    "FINITENESS_IF_LOSS",
    "Consumer",
    "ErrorPolicy",
    "Handle",
    "MessageBus",
    "Results",
    "Stamp",
    "Subscription",
    "UnknownTopicError",
]
