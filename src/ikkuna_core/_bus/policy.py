"""The error policy of a run, and its one registry of things said once."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from ..errors import BackendError, IkkunaError, SubscriberError

__all__ = ["ErrorPolicy"]


class ErrorPolicy:
    """``on_error``: ``"warn"`` disables a failing subscriber (or backend) with a warning and
    training goes on; ``"raise"`` stops with a :class:`~ikkuna_core.SubscriberError` (or
    :class:`~ikkuna_core.BackendError`, or, inside Ikkuna's own hooks,
    :class:`~ikkuna_core.IkkunaError`)."""

    def __init__(self, on_error: str) -> None:
        if on_error not in ("raise", "warn"):
            raise ValueError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
        self.on_error = on_error
        self._said: set[str] = set()

    @property
    def raises(self) -> bool:
        return self.on_error == "raise"

    def warn_once(self, ident: str, message: str, stacklevel: int = 4) -> None:
        """Warn ``message`` (a RuntimeWarning) the first time ``ident`` is seen."""
        if ident in self._said:
            return
        self._said.add(ident)
        warnings.warn(f"ikkuna: {message}", RuntimeWarning, stacklevel=stacklevel)

    def internal_error(self, where: str, exc: BaseException, step: int) -> None:
        """An error inside Ikkuna's own hooks: raised as :class:`IkkunaError` with
        ``on_error = "raise"``; otherwise a warning (once per place) and training goes on."""
        what = f"internal error in {where} at step {step}: {type(exc).__name__}: {exc}"
        if self.raises:
            raise IkkunaError(f"ikkuna: {what}") from exc
        self.warn_once(f"internal:{where}", f"{what}; this step's data may be incomplete",
                       stacklevel=5)

    def subscriber_failed(
        self, name: str, exc: BaseException, step: int, topics: Sequence[str]
    ) -> None:
        """A subscriber raised: raise (``"raise"``) or warn; the caller disables it."""
        what = (
            f"subscriber {name!r} failed at step {step} on topic"
            f"{'s' if len(topics) > 1 else ''} {', '.join(map(repr, topics))}: "
            f"{type(exc).__name__}: {exc}"
        )
        if self.raises:
            raise SubscriberError(what) from exc
        warnings.warn(
            f"ikkuna: {what}; it is disabled for the rest of the run "
            "(set on_error='raise' to stop instead)",
            RuntimeWarning,
            stacklevel=4,
        )

    def backends_failed(self, failures: Sequence[tuple[object, BaseException]], what: str) -> None:
        """Backends raised while writing: raise (``"raise"``) or warn; the caller removes
        them."""
        detail = "; ".join(
            f"backend {getattr(b, 'name', '') or type(b).__name__!r} ({type(e).__name__}: {e})"
            for b, e in failures
        )
        if self.raises:
            raise BackendError(f"ikkuna: {what} failed: {detail}") from failures[0][1]
        warnings.warn(
            f"ikkuna: {what} failed: {detail}; the other backends have their records, the "
            "failing ones are removed for the rest of the run (on_error='raise' stops instead)",
            RuntimeWarning,
            stacklevel=4,
        )
