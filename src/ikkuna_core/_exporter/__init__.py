"""The Exporter and its parts: the step model (:mod:`.clock`, pure), which modules and
parameters are watched (:mod:`.selection`), the torch hooks (:mod:`.hooks`), what the hooks
capture (:mod:`.capture`), what is read from the parameters (:mod:`.params`), and the
facade that drives them (:mod:`.facade`)."""

from .clock import StepClock
from .facade import Exporter
from .selection import ROOT_NAME, modules_of, select_modules, unwrap_model

__all__ = ["ROOT_NAME", "Exporter", "StepClock", "modules_of", "select_modules", "unwrap_model"]
