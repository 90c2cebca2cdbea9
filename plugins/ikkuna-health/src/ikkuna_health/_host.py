"""Small device values read on the host without a synchronisation in the steady state."""

from __future__ import annotations

from collections import deque
from typing import Any, Generic, TypeVar

import torch

_T = TypeVar("_T")
#: Unread copies kept on an accelerator before the oldest is waited for.
_MAX_WAITING = 4


class HostReader(Generic[_T]):
    """Reads a step's small result tensor on the host. On the CPU at once (``tolist``: a
    plain read, no kernel); on an accelerator through an asynchronous copy into pinned
    memory, handed back once it has arrived, a step or two later (``wait``: at once, one
    synchronisation per step)."""

    def __init__(self, wait: bool = False) -> None:
        self.wait = wait
        self._queue: deque[tuple[torch.Tensor, Any, _T]] = deque()

    def put(self, value: torch.Tensor, item: _T) -> list[tuple[Any, _T]]:
        """Queue ``value`` (with ``item``, what the caller needs to act on it); returns
        every (value on the host, item) that can be read now, oldest first."""
        if value.device.type == "cpu":
            return [(value.tolist(), item)]
        host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        host.copy_(value, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._queue.append((host, event, item))
        if self.wait:
            event.synchronize()
        ready = []
        while self._queue and (len(self._queue) > _MAX_WAITING or self._queue[0][1].query()):
            found, done, queued = self._queue.popleft()
            done.synchronize()
            ready.append((found.tolist(), queued))
        return ready
