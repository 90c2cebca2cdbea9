"""``nonfinite``: where the first NaN or inf of a run was produced.

Every step costs a handful of operations on the device: one fused ``_foreach_norm``
(p = inf, in float32: exact for finiteness, and a large finite fp16 value stays finite) over
every payload of every subscribed topic, one sum, and one read of that sum on the host (on
the CPU a plain read; on CUDA an asynchronous copy read when it has arrived). Only at a step
whose sum is not finite are the per-payload values read and the origin localised, from
what one forward taught about the module graph (:mod:`._structure`)."""

from __future__ import annotations

import gc
import math
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from ikkuna_core import IkkunaError, StepBundle, Subscriber, TensorOptions, TopicPayloads, ops
from ikkuna_core.topics import MODULE_TOPICS

from ._host import HostReader
from ._structure import INPUT, Structure

__all__ = ["Finding", "NonFinite", "NonFiniteError", "NonFiniteOptions", "localise"]

#: The topics whose payloads localisation reads; "inputs" when the core publishes it.
TOPICS: tuple[str, ...] = tuple(
    t for t in ("input_data", "inputs", "activations", "network_output", "loss",
                "layer_gradients", "weight_gradients", "bias_gradients", "weights", "biases")
    if t != "inputs" or "inputs" in MODULE_TOPICS
)
_PARAM_GRADIENTS = ("weight_gradients", "bias_gradients")
_PARAM_VALUES = ("weights", "biases")
_FORWARD = ("input_data", "inputs", "activations", "network_output", "loss")
#: The module topics of the forward and backward that the Exporter captures in its hooks.
_FORWARD_MODULE_TOPICS = ("activations", "inputs", "layer_gradients")
#: Topics read only at a non-finite step (on the CPU) when one of these is subscribed: the
#: topics a non-finite value of theirs reaches.
_COVERS: dict[str, set[str]] = {
    "activations": {"loss", "network_output"},
    "inputs": {"loss", "network_output"},
    "layer_gradients": {"weight_gradients", "bias_gradients"},
}


class NonFiniteOptions(TensorOptions):
    """Options of ``nonfinite``."""

    topics: list[str] = Field(default_factory=lambda: list(TOPICS))
    action: Literal["warn", "raise"] = Field(
        default="warn",
        description="'warn': a RuntimeWarning and a record; 'raise': also a NonFiniteError "
        "(module, topic, step as attributes) by the end of that step",
    )
    collapse_after: int = Field(
        default=10, ge=1,
        description="GradScaler overflow skips in a row reported as a collapsing scale",
    )


@dataclass(frozen=True)
class Finding:
    """Where a non-finite value was produced: ``direction`` is ``input``, ``forward``,
    ``loss``, ``backward`` or ``update``; ``key`` the payload's key (a module, ``name#k``
    for its k-th call, or ``module.parameter``), None for the input data and the loss."""

    direction: str
    topic: str
    key: str | None
    module: str | None
    kind: str  # "NaN" or "inf"
    detail: str

    def where(self) -> str:
        if self.module is None:
            return {"input": "the input data", "loss": "the loss"}.get(self.direction, self.topic)
        return f"{self.direction} of {self.module!r}"

    def message(self, step: int) -> str:
        return (
            f"ikkuna health: step {step}: the first non-finite value ({self.kind}) was produced "
            f"in the {self.where()}: topic {self.topic!r}"
            + (f" ({self.key!r})" if self.key not in (None, self.module) else "")
            + f" {self.detail}"
        )


class NonFiniteError(IkkunaError):
    """A non-finite value, with ``action = "raise"``: where it was produced (``module``,
    ``topic``, ``key``, ``direction``) and the ``step``."""

    def __init__(self, message: str, finding: Finding, step: int) -> None:
        super().__init__(message)
        self.finding = finding
        self.step = step
        self.module = finding.module
        self.topic = finding.topic
        self.key = finding.key
        self.direction = finding.direction


# ------------------------------------------------------------------ localisation
class Flags:
    """The per-payload inf-norms of one step, on the host: ``values[topic][key]``, and the
    module each key belongs to."""

    def __init__(self, spans: Sequence[tuple[str, list[str | None], list[str | None]]],
                 values: Sequence[float]) -> None:
        self.values: dict[str, dict[str | None, float]] = {}
        self.module: dict[tuple[str, str | None], str | None] = {}
        it = iter(values)
        for topic, keys, modules in spans:
            found = self.values.setdefault(topic, {})
            for key, module in zip(keys, modules, strict=True):
                found[key] = next(it)
                self.module[(topic, key)] = module

    def bad(self, topic: str, key: str | None = None) -> bool:
        value = self.values.get(topic, {}).get(key)
        return value is not None and not math.isfinite(value)

    def any_bad(self, topic: str) -> bool:
        return any(not math.isfinite(v) for v in self.values.get(topic, {}).values())

    def kind(self, topic: str, key: str | None) -> str:
        return "NaN" if math.isnan(self.values[topic][key]) else "inf"

    def params_of(self, topics: Sequence[str], module: str | None) -> list[tuple[str, str]]:
        return [(t, k) for t in topics for k in self.values.get(t, {})
                if k is not None and self.module.get((t, k)) == module]


def _module_name(key: str) -> str:
    return key.split("#", 1)[0]


def localise(cur: Flags, before: Flags | None, structure: Structure) -> Finding | None:
    """Where the non-finite values of ``cur`` began; None when they only follow from
    parameters that were already non-finite before this step (``before``: the previous
    step's flags) or nothing is non-finite."""
    acts = cur.values.get("activations", {})
    # execution order of the keys present: a step whose loss was finite on the CPU has no
    # forward payloads (the Exporter did not read them), only its layer gradients
    present = {**acts, **cur.values.get("layer_gradients", {})}
    order = [k for k in structure.order if k in present] if structure.learned else []
    order += [k for k in present if k is not None and k not in order]
    position = {k: i for i, k in enumerate(order)}

    def producer(key: str) -> str | None:
        if structure.learned:
            return structure.producer.get(key)
        i = position.get(key, 0)
        return order[i - 1] if i > 0 else INPUT

    def stale(module: str | None) -> bool:  # its parameters were non-finite before the step
        return before is not None and any(
            before.bad(t, k) for t, k in before.params_of(_PARAM_VALUES, module)
        )

    def finding(direction: str, topic: str, key: str | None, module: str | None,
                detail: str) -> Finding:
        return Finding(direction, topic, key, module, cur.kind(topic, key), detail)

    # input data
    if cur.bad("input_data"):
        return finding("input", "input_data", None, None,
                       "is non-finite: the batch itself (the model's first tensor argument)")
    # forward: the first module in execution order whose output is non-finite while its
    # input was finite
    inputs = cur.values.get("inputs", {})
    seen_bad = False
    for key in order:
        if not cur.bad("activations", key):
            continue
        module = cur.module.get(("activations", key)) or _module_name(key)
        first, seen_bad = not seen_bad, True
        if stale(module):
            continue
        source = producer(key)
        if key in inputs:
            input_ok = not cur.bad("inputs", key)
        elif source == INPUT:
            input_ok = True
        elif source is not None and source in acts:
            input_ok = not cur.bad("activations", source)
        else:
            input_ok = first
        if input_ok:
            return finding("forward", "activations", key, module,
                           "is non-finite while the module's input was finite")
        if key in inputs and source is not None and (
            source == INPUT or (source in acts and not cur.bad("activations", source))
        ):
            made = "the model's input" if source == INPUT else f"the output of {source!r}"
            return finding("forward", "inputs", key, module,
                           f"is non-finite while {made} was finite: made by code between "
                           "the two (a function in the parent module's forward)")
    forward_bad = seen_bad or any(cur.any_bad(t) for t in _FORWARD if t != "loss")
    if forward_bad:
        return None  # it follows from parameters that were non-finite before this step
    if cur.bad("loss"):
        return finding("loss", "loss", None, None,
                       "is non-finite while the model's outputs were finite")
    # backward: in backward order (the reverse of execution order)
    lgrads = cur.values.get("layer_gradients", {})
    ordered_lg = [k for k in reversed(order) if k in lgrads]
    ordered_lg += [k for k in reversed(list(lgrads)) if k is not None and k not in ordered_lg]
    if ordered_lg and cur.bad("layer_gradients", ordered_lg[0]) and (
        not structure.learned or not structure.consumers(ordered_lg[0])
    ):
        key = ordered_lg[0]
        return finding("backward", "layer_gradients", key,
                       cur.module.get(("layer_gradients", key)) or _module_name(key),
                       "(the gradient of the loss w.r.t. the model's output) is non-finite: "
                       "produced by the loss's backward")
    for key in ordered_lg:
        if cur.bad("layer_gradients", key):
            continue
        module = cur.module.get(("layer_gradients", key)) or _module_name(key)
        for topic, pkey in cur.params_of(_PARAM_GRADIENTS, module):
            if cur.bad(topic, pkey):
                return finding("backward", topic, pkey, module,
                               "is non-finite while the module's output gradient was finite")
        source = producer(key)
        if source not in (None, INPUT) and cur.bad("layer_gradients", source):
            return finding("backward", "layer_gradients", key, module,
                           f"is finite but the module's input gradient (the layer gradient "
                           f"of {source!r}) is not: produced by the module's backward")
    # without layer gradients: the latest module (in execution order, then the others)
    # with a non-finite parameter gradient
    modules: list[str | None] = [_module_name(k) for k in reversed(order)]
    modules += [cur.module.get((t, k)) for t in _PARAM_GRADIENTS for k in cur.values.get(t, {})]
    for module in dict.fromkeys(m for m in modules if m is not None):
        for topic, pkey in cur.params_of(_PARAM_GRADIENTS, module):
            if cur.bad(topic, pkey) and not stale(module):
                return finding("backward", topic, pkey, module,
                               "is non-finite (the latest module in execution order with a "
                               "non-finite parameter gradient)")
    if any(cur.any_bad(t) for t in ("layer_gradients", *_PARAM_GRADIENTS)):
        return None
    # the optimizer update: finite weights (before) and gradient, non-finite weights after
    for topic in _PARAM_VALUES:
        for weight in cur.values.get(topic, {}):
            if weight is not None and cur.bad(topic, weight) and not (
                before and before.bad(topic, weight)
            ):
                return finding("update", topic, weight, cur.module.get((topic, weight)),
                               "is non-finite after the optimizer step while it and its "
                               "gradient were finite before it")
    return None


# ------------------------------------------------------------------- subscriber
@dataclass
class _Step:
    """One step's flags, still on the device until the step is known to be non-finite."""

    step: int
    skipped: bool
    norms: torch.Tensor
    spans: list[tuple[str, list[str | None], list[str | None]]]
    before: tuple[torch.Tensor, list[tuple[str, list[str | None], list[str | None]]]] | None
    later: _Payloads | None  # payloads reduced only if the step is non-finite (CPU)
    now: _Payloads | None  # the payloads of ``norms`` when those are L2 norms (CPU)


class _Payloads:
    """Floating-point payloads of some topics, with their (topic, keys, modules) spans."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []
        self.spans: list[tuple[str, list[str | None], list[str | None]]] = []

    def add(self, payloads: TopicPayloads) -> None:
        keys: list[str | None] = []
        modules: list[str | None] = []
        for key, info, data in zip(payloads.keys, payloads.modules, payloads.data, strict=True):
            if data is None or not data.is_floating_point() or data.numel() == 0:
                continue  # integer tokens and labels are always finite
            self.tensors.append(data)
            keys.append(key)
            modules.append(info.name if info is not None else None)
        if keys:
            self.spans.append((payloads.topic, keys, modules))


def _on_cpu(payloads: TopicPayloads) -> bool:
    return all(t is None or t.device.type == "cpu" for t in payloads.data)


class NonFinite(Subscriber):
    """Names where the first NaN/inf of a run was produced (then once per new origin): the
    module, the topic, the step and the direction (input, forward, loss, backward, update),
    as a RuntimeWarning, a record ``nonfinite/origin/<direction>/<key>`` and, with
    ``action = "raise"``, a :class:`NonFiniteError`. GradScaler's overflow skips are counted
    (``nonfinite/overflow_skips``), not reported, unless ``collapse_after`` come in a row."""

    name = "nonfinite"
    Options = NonFiniteOptions
    default_topics = TOPICS
    output_kind: ClassVar[Literal["module", "network"] | None] = "network"
    sees_skipped_steps = True
    #: a non-finite activation or input reaches the loss: on the CPU the Exporter reads them
    #: only at a step whose loss is not finite (nothing of the forward at the others)
    finite_loss_clears_forward = True
    options: NonFiniteOptions

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self.structure = Structure()
        self.findings: list[tuple[int, Finding]] = []  # every report: (step, where)
        self.overflow_skips = 0
        self._in_a_row = 0
        self._reported: set[tuple[str, str, str | None]] = set()
        self._before: _Step | None = None
        self._host: HostReader[_Step] = HostReader(wait=self.options.action == "raise")
        self._scaler: Any = None  # weakref.ref to an enabled GradScaler, or False: none
        self._learning = False

    def finiteness_only(self, topic: str) -> bool:
        """The forward topics (most of a step's bytes) as 0-d finiteness checks, reduced in
        the Exporter's hooks: nothing of them is held until the step ends."""
        return topic in _FORWARD_MODULE_TOPICS

    def output_topic(self, suffix: str | None = None) -> str:
        base = self.options.publish_as or self.name
        return f"{base}/{suffix}" if suffix else base

    def output_topics(self) -> list[str]:
        return [self.output_topic("origin"), self.output_topic("overflow_skips")]

    # ------------------------------------------------------------------ per step
    def compute_step(self, step: StepBundle) -> None:
        self._learn_structure()
        now, later = _Payloads(), _Payloads()
        topics = set(step.topics)
        for topic in step.topics:
            # On the CPU the activations, inputs and layer gradients (most of a step's bytes)
            # are read only at a step found non-finite, while its payloads are still alive:
            # a non-finite forward value reaches the loss, a non-finite layer gradient the
            # parameter gradients upstream. On an accelerator everything is reduced every
            # step (cheap there): its sum is known only a step or two later.
            covered = topics & _COVERS.get(topic, set())
            (later if covered and _on_cpu(step[topic]) else now).add(step[topic])
        if not now.tensors:
            now, later = later, _Payloads()
        if not now.tensors:
            return
        # the largest |x| is exact (a large finite fp16 value stays finite); on the CPU it is
        # 15 times slower than the L2 norm, also non-finite for a non-finite tensor: there
        # the L2 norm is the check, and the largest |x| confirms it at a non-finite step
        cpu = now.tensors[0].device.type == "cpu"
        norms = ops.norms(now.tensors, p=2.0 if cpu else math.inf)
        total = norms.sum()
        before = None if self._before is None else (self._before.norms, self._before.spans)
        record = _Step(step.global_step, step.skipped, norms, now.spans, before, later,
                       now if cpu else None)
        if not step.skipped:
            self._before = record  # its weights are the next step's weights before the update
        # on an accelerator the sum is read once its asynchronous copy has arrived (with
        # action = "raise": waited for at the end of the step)
        for value, done in self._host.put(total, record):
            self._checked(done, value, step)
        record.later = record.now = None  # the step's payloads are not kept past it

    def _checked(self, record: _Step, total: float, step: StepBundle) -> None:
        if math.isfinite(total):
            self._in_a_row = 0  # a finite step: no overflow, the scaler did not skip it
        else:
            self._examine(record, step)

    def _learn_structure(self) -> None:
        """Learn the module graph from the next training forward (hooks for one step)."""
        if self._learning:
            self.structure.finish()
            self._learning = False
        elif not self.structure.learned and self._exporter is not None:
            exporter = self._exporter
            if exporter.model is not None:
                self.structure.start(exporter.model, list(exporter.modules))
                self._learning = True

    # ---------------------------------------------------------- a non-finite step
    def _examine(self, record: _Step, step: StepBundle) -> None:
        spans, values = list(record.spans), record.norms.tolist()
        if record.now is not None:  # L2 norms: exact values now
            values = ops.norms(record.now.tensors, p=math.inf).tolist()
        if record.later is not None and record.later.tensors:
            spans += record.later.spans
            values += ops.norms(record.later.tensors, p=math.inf).tolist()
        cur = Flags(spans, values)
        before = None if record.before is None else Flags(record.before[1],
                                                          record.before[0].tolist())
        found = localise(cur, before, self.structure)
        if found is None:
            return
        # with a GradScaler, non-finite gradients of a finite forward are its overflow: it
        # skips that optimizer step (the attempt is delivered as skipped, or by close())
        if found.direction == "backward" and self._grad_scaler() is not None:
            self._overflow(found, record, step)
            return
        self._report(found, record.step, step)

    def _overflow(self, found: Finding, record: _Step, step: StepBundle) -> None:
        """A GradScaler overflow skip: counted, quiet; ``collapse_after`` in a row is a
        scale that keeps collapsing, reported."""
        self.overflow_skips += 1
        self._in_a_row += 1
        self.publish_scalars(step, torch.tensor([float(self.overflow_skips)]), keys=[None],
                             suffix="overflow_skips")
        if self._in_a_row != self.options.collapse_after:
            return
        scaler = self._grad_scaler()
        scale = float(scaler.get_scale()) if scaler is not None else float("nan")
        message = (
            f"ikkuna health: step {record.step}: the GradScaler skipped {self._in_a_row} "
            f"optimizer steps in a row and its scale fell to {scale:g}: the gradients are "
            f"non-finite at every scale. The last attempt's first non-finite value "
            f"({found.kind}) was produced in the {found.where()}: topic {found.topic!r}"
            + (f" ({found.key!r})" if found.key not in (None, found.module) else "")
            + f" {found.detail}"
        )
        self._emit(message, Finding("collapse", found.topic, found.key, found.module,
                                    found.kind, found.detail), record.step, step)

    def _report(self, found: Finding, at: int, step: StepBundle) -> None:
        origin = (found.direction, found.topic, found.key)
        if origin in self._reported:
            return
        self._reported.add(origin)
        self._emit(found.message(at), found, at, step)

    def _emit(self, message: str, found: Finding, at: int, step: StepBundle) -> None:
        self.findings.append((at, found))
        label = f"{found.direction}/{found.key or found.topic}"
        self.publish_scalars(step, torch.ones(1), keys=[label], suffix="origin")
        self.bus.log_text(self.output_topic(), message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        if self.options.action == "raise":
            raise NonFiniteError(message, found, at)

    def _grad_scaler(self) -> Any:
        """An enabled ``torch.amp.GradScaler`` of this process (looked up once, at the first
        non-finite step), or None."""
        if self._scaler is None:
            found = next(
                (obj for obj in gc.get_objects()
                 if issubclass(type(obj), torch.amp.GradScaler) and obj.is_enabled()),
                None,
            )
            self._scaler = weakref.ref(found) if found is not None else False
        return self._scaler() if self._scaler else None
