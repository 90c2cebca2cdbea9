"""The Exporter: the only code that touches torch hooks. Its hooks only stash references (or,
for forward topics whose subscribers want samples, copy small samples); at the end of each
training step it hands everything the step's subscribers want to the bus in one call.

Step model. A *training step* is one optimizer step. It begins with the first training
forward of the watched model (train mode, autograd enabled) after the previous step, and ends
after ``optimizer.step()`` of the optimizers that hold the model's parameters (seen through
torch's global optimizer hooks, so no user code is needed); with several optimizers, after the
last of those that stepped in the previous step. Further forwards before the optimizer step
(gradient accumulation) belong to the same step; forward topics are taken from its first
forward. A step that no forward opened (``optimizer.step(closure)``, or training code that
never calls the watched model's own forward) opens at the optimizer's pre-step hook; an
integration (the Lightning callback) may announce the forwards itself. Without any
optimizer step, the next training forward, ``epoch_finished()`` or ``close()`` ends the
step; a first step that sees a second forward is gradient accumulation when some optimizer
holds the model's parameters. Forwards in eval mode, under ``torch.no_grad()``, or inside
:meth:`Exporter.silenced` publish nothing and count no step.

When each topic is read:

- first training forward of the step: ``input_data`` (first tensor argument or keyword
  argument), ``activations`` (module outputs; the first tensor of a tuple output),
  ``inputs`` (module inputs: the first tensor argument, in the same forward hook);
  ``network_output``, ``input_labels``, ``loss`` at the first loss call (or from a model
  output carrying ``loss`` and ``logits``, as Hugging Face models return)
- its backward: ``layer_gradients`` (through ``output.register_hook``, which, unlike full
  backward hooks, works with in-place ReLU)
- the optimizer's pre-step hook: ``weight_gradients``/``bias_gradients`` = ``p.grad`` as the
  optimizer consumes it (after accumulation, GradScaler's unscaling, clipping, DDP's
  all-reduce; with ``step(closure)``, after the closure ran)
- the optimizer's post-step hook: ``weight_updates``/``bias_updates`` (after minus before),
  then ``weights``/``biases`` (after the update) when the step ends

Only what some subscriber wants at a step costs anything: hooks exist only for subscribed
topics, parameters are copied only at steps where an ``*_updates`` topic is wanted, and
nothing runs a host synchronisation. Nothing inside the hooks may stop training: an internal
error goes through the bus's error policy.
"""

from __future__ import annotations

import functools
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils.hooks import RemovableHandle

from . import _lifecycle, ops
from .bus import MessageBus, Stamp, Subscription
from .errors import IkkunaError
from .messages import ModuleInfo, TopicPayloads, key_of
from .topics import (
    FORWARD_TOPICS,
    GRADIENT_TOPICS,
    UPDATE_TOPICS,
    VALUE_TOPICS,
    parameter_kind,
)

__all__ = ["Exporter", "select_modules", "unwrap_model"]

ROOT_NAME = "model"
_LOSS_TOPICS = frozenset({"network_output", "input_labels", "loss"})
_VALUES = frozenset(VALUE_TOPICS.values())
_GRADIENTS = frozenset(GRADIENT_TOPICS.values())
_UPDATES = frozenset(UPDATE_TOPICS.values())
# Capture modes of a forward topic per module; k > 0: a sample of k entries (a copy).
_SKIP = -1  # no subscriber wants it
_FULL = 0  # a reference, whose version is checked at the end of the step
_CLONE = -2  # a copy: the tensor was seen changing in place later in a step
_PROBE = -3  # first capture: a copy and a reference, to learn which of the two it needs


def _check_depth(depth: int) -> None:
    if depth == 0 or depth < -1:
        raise ValueError(f"depth must be -1 (leaves) or >= 1, got {depth}")


def _outside_graphs(hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook`` kept out of ``torch.compile``'s graphs: the step bookkeeping it does (counters,
    the open step) would otherwise be specialised into the graph and recompile it every
    step. Wrapped when a model is watched, so that ``import ikkuna_core`` does not import
    torch's compiler."""
    return torch.compiler.disable(hook)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose names users know: the model inside DistributedDataParallel /
    DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        return model


def select_modules(
    model: nn.Module, depth: int = -1, include: Sequence[type[nn.Module]] | None = None
) -> list[tuple[str, nn.Module]]:
    """The modules the Exporter watches, as (dotted name, module).

    ``depth=-1`` selects the leaves; ``depth=d`` selects the modules ``d`` levels below the
    model plus shallower leaves, so every part of the model is covered. With ``include``,
    every module of those classes down to ``depth`` (any depth for -1) is selected instead.
    The model itself is called ``"model"`` when it is selected. Wrappers (DDP,
    ``torch.compile``) are looked through.
    """
    _check_depth(depth)
    model = unwrap_model(model)
    include_t = tuple(include) if include else None
    chosen = []
    for name, module in model.named_modules():
        level = 0 if name == "" else name.count(".") + 1
        is_leaf = next(module.children(), None) is None
        if include_t is not None:
            ok = isinstance(module, include_t) and (depth < 0 or level <= depth)
        elif depth < 0:
            ok = is_leaf
        else:
            ok = level == depth or (is_leaf and level < depth)
        if ok:
            chosen.append((name or ROOT_NAME, module))
    return chosen


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            found = _first_tensor(item)
            if found is not None:
                return found
    if isinstance(output, dict):
        for item in output.values():
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _field(output: Any, name: str) -> Any:
    """``output.name`` or ``output[name]`` (Hugging Face ``ModelOutput`` is both)."""
    if isinstance(output, dict):
        return output.get(name)
    return getattr(output, name, None)


class _Param:
    """A watched parameter: one tensor (a tied parameter is one), reported once under its
    first owner, with the other names it has in the model."""

    __slots__ = ("aliases", "handle", "info", "key", "kind", "name", "tensor")

    def __init__(self, info: ModuleInfo, key: str, name: str, tensor: nn.Parameter) -> None:
        self.info = info
        self.key = key
        self.name = name  # dotted name in the model
        self.kind = parameter_kind(name)
        self.tensor = tensor
        self.aliases: list[str] = []
        self.handle: RemovableHandle | None = None


#: A stashed payload: (module index, call, tensor, version, original). The tensor is a
#: reference whose version is checked at the end of the step, or a copy (version -1); on a
#: module's first capture, a copy plus the original, to learn whether something changes the
#: original in place later in the step.
_Entry = tuple[int, int, torch.Tensor, int, torch.Tensor | None]


class _Forward:
    """What the current step stashed in the hooks of its first forward and backward."""

    __slots__ = ("__weakref__", "acts", "calls", "inputs", "lgrad_plan", "lgrads", "network",
                 "ref")

    def __init__(self, n_modules: int, lgrad_plan: tuple[int, ...] | None = None) -> None:
        # The layer-gradient hooks hold only this weak reference: an output tensor holding
        # a hook that held the forward holding that output was a cycle through autograd
        # the garbage collector cannot see (activations + layer_gradients leaked every step)
        self.ref = weakref.ref(self)
        self.calls = [0] * n_modules
        self.lgrad_plan = lgrad_plan
        self.acts: list[_Entry] = []
        self.lgrads: list[_Entry] = []
        self.inputs: list[_Entry] = []
        self.network: dict[str, tuple[torch.Tensor, int]] = {}


class Exporter:
    """Attaches to a model and publishes its training data on ``self.bus``.

    >>> exporter = Exporter(depth=-1)            # or include=(nn.Conv2d, nn.Linear)
    >>> exporter.set_model(model)
    >>> loss_fn = exporter.set_loss(loss_fn)     # see labels, outputs and the loss
    >>> exporter.bus.register_subscriber(subscriber)
    """

    def __init__(
        self,
        depth: int = -1,
        include: Sequence[type[nn.Module]] | None = None,
        *,
        bus: MessageBus | None = None,
        publish_in_eval: bool = False,
        config: Any = None,
        registry: Any = None,
    ) -> None:
        _check_depth(depth)
        self.depth = depth
        self.include = tuple(include) if include else None
        self.publish_in_eval = publish_in_eval
        self.bus = bus if bus is not None else MessageBus()
        self.bus.exporter = self
        self.bus.add_listener(self._sync_hooks)
        self.model: nn.Module | None = None
        self.modules: dict[str, ModuleInfo] = {}
        self.global_step = -1  # index of the current (or last) training step
        self.epoch = 0
        self.batch_index = -1
        self.loss_fn: Callable[..., torch.Tensor] | None = None
        self.config: Any = config  # the IkkunaConfig of a run started by watch()
        self.registry: Any = registry  # the PluginRegistry of a run started by watch()
        self._on_close: list[Callable[[], None]] = []
        self._module_objs: list[tuple[ModuleInfo, nn.Module]] = []
        self._call_keys: list[list[str]] = []  # per module: key of its n-th call in a forward
        self._params: list[_Param] = []
        self._param_index: dict[int, int] = {}  # id(tensor) -> index in _params
        self._by_topic: dict[str, list[int]] = {}  # parameter topic -> indices in _params
        self._optimizers: weakref.WeakKeyDictionary[Any, tuple[tuple[int, ...], list[int]]] = (
            weakref.WeakKeyDictionary()
        )
        self._handles: list[RemovableHandle] = []
        self._forward_handles: list[RemovableHandle] = []
        self._loss_handle: RemovableHandle | None = None
        self._snapshot: dict[int, torch.Tensor] = {}  # param index -> buffer (-> update)
        self._plans: dict[tuple[Subscription, ...], tuple[Any, Any, Any]] = {}
        self._clone: set[tuple[str, int]] = set()  # (topic, module) changed in place before
        self._probed: set[tuple[str, int]] = set()  # (topic, module) known either way
        self._learned_plans: dict[Any, tuple[int, ...]] = {}
        self._closed = False
        self._silent = False
        # the open step
        self._open = False
        self._stamp: Stamp = (0, 0, 0)
        self._wanted: frozenset[str] = frozenset()
        self._forwards = 0
        self._fwd = _Forward(0)
        self._act_plan: tuple[int, ...] | None = None  # capture modes in this forward
        self._lgrad_plan: tuple[int, ...] | None = None
        self._in_plan: tuple[int, ...] | None = None
        self._loss_pending = False  # the step's first loss call is still to come
        self._grads: dict[int, tuple[torch.Tensor, int]] = {}
        self._updates: dict[int, torch.Tensor] = {}
        self._stepped: list[Any] = []
        self._inside: Any = None  # the optimizer whose step() is running
        self._closure = False
        # optimizers expected to step in each step (those that stepped in the last one)
        self._expected: weakref.WeakSet[Any] = weakref.WeakSet()
        self._seen_optimizer = False
        self._has_optimizer: bool | None = None  # see _optimizer_exists
        self._sharded = False  # some parameter is a DTensor (FSDP2): see _gathered
        self._driven = False  # forwards are announced by an integration: _external_forward
        self._watched_forward = False
        self._steps_without_forward = 0
        self._steps_without_loss = 0
        self._skip_aware = False  # some subscriber sees skipped steps: see _gradients_reset
        _lifecycle.opened(self)  # closed at exit and on SIGTERM if close() is never called

    # ------------------------------------------------------------------ setup
    def set_model(self, model: nn.Module) -> None:
        """Discover the modules and parameters to watch and attach the hooks subscribed
        topics need. Wrappers (DDP, ``torch.compile``) may be passed: names are those of the
        wrapped model."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"set_model expects a torch.nn.Module, got {type(model).__name__}")
        if self.model is not None:
            raise RuntimeError("this Exporter already watches a model; create a new Exporter")
        self._check_open()
        selected = select_modules(model, self.depth, self.include)
        if not selected:
            raise ValueError(
                f"no module of {type(model).__name__} matches depth={self.depth}"
                f" include={[c.__name__ for c in self.include or ()]}"
            )
        self.model = model
        inner = unwrap_model(model)
        for name, module in selected:
            info = ModuleInfo(name=name, type=type(module).__name__)
            self.modules[name] = info
            self._module_objs.append((info, module))
            self._call_keys.append([name])
        self._discover_parameters(inner)
        self._sharded = any(_is_dtensor(p.tensor) for p in self._params)
        self._handles.append(
            model.register_forward_pre_hook(
                _outside_graphs(self._on_forward_start), with_kwargs=True
            )
        )
        self._handles.append(register_optimizer_step_pre_hook(self._on_optimizer_pre))
        self._handles.append(register_optimizer_step_post_hook(self._on_optimizer_post))
        self._fwd = _Forward(len(self._module_objs))
        self._sync_hooks()

    def _discover_parameters(self, model: nn.Module) -> None:
        """Each parameter is reported under its closest watched module (``module`` for its
        weight/bias, ``module.rest`` otherwise); parameters outside every watched module (a
        ViT's ``cls_token``) under their owner, unless ``include`` restricts the modules."""
        selected = {
            ("" if info.name == ROOT_NAME else info.name): info for info, _ in self._module_objs
        }
        owners = dict(model.named_modules())
        for full, p in model.named_parameters(remove_duplicate=False):
            found = self._param_index.get(id(p))
            if found is not None:
                self._params[found].aliases.append(full)  # tied: one tensor, one report
                continue
            owner, _, rel = full.rpartition(".")
            prefix = owner
            while prefix not in selected and prefix:
                prefix = prefix.rpartition(".")[0]
            if prefix in selected:
                info = selected[prefix]
                rel = full[len(prefix) + 1 :] if prefix else full
            elif self.include is None:
                module = owners[owner]
                info = ModuleInfo(name=owner or ROOT_NAME, type=type(module).__name__)
            else:
                continue
            key = key_of(info.name, rel)
            self._param_index[id(p)] = len(self._params)
            self._params.append(_Param(info, key, full, p))
        for kind_topics in (VALUE_TOPICS, GRADIENT_TOPICS, UPDATE_TOPICS):
            for kind, topic in kind_topics.items():
                self._by_topic[topic] = [i for i, p in enumerate(self._params) if p.kind == kind]

    def set_loss(self, loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """Watch a loss called as ``loss_fn(output, target)``. An ``nn.Module`` loss is hooked
        in place and returned; a plain function is returned wrapped: use the returned
        callable."""
        self._check_open()
        if isinstance(loss_fn, nn.Module):
            self._handles.append(
                loss_fn.register_forward_hook(self._on_loss_module, with_kwargs=True)
            )
            self.loss_fn = loss_fn
            return loss_fn

        @functools.wraps(loss_fn)
        def watched_loss(*args: Any, **kwargs: Any) -> torch.Tensor:
            loss = loss_fn(*args, **kwargs)
            if self._loss_pending:
                self._stash_loss(args, kwargs, loss)
            return loss

        self.loss_fn = watched_loss
        return watched_loss

    # --------------------------------------------------------------- control
    def epoch_finished(self) -> None:
        """Close the running step, publish ``epoch_finished`` and start a new epoch."""
        self._check_open()
        if self._open:
            self._finish_step()
        stamp = (max(self.global_step, 0), self.epoch, max(self.batch_index, 0))
        self.bus.deliver_event(stamp, "epoch_finished")
        self.bus.flush()
        self.epoch += 1
        self.batch_index = -1

    @contextmanager
    def silenced(self) -> Iterator[None]:
        """Forwards inside this block publish nothing and count no step (the thesis'
        ``should_train=False``). Used by subscribers that evaluate the model."""
        saved = (self._silent, self._act_plan, self._lgrad_plan, self._in_plan,
                 self._loss_pending)
        self._silent, self._act_plan, self._lgrad_plan, self._in_plan, self._loss_pending = (
            True, None, None, None, False
        )
        try:
            yield
        finally:
            (self._silent, self._act_plan, self._lgrad_plan, self._in_plan,
             self._loss_pending) = saved

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model in eval mode without autograd and without messages; every module's
        train/eval mode is restored afterwards."""
        model = self._require_model()
        modes = [(m, m.training) for m in model.modules()]  # e.g. a frozen BatchNorm stays
        model.eval()
        try:
            with torch.no_grad(), self.silenced():
                return model(*args, **kwargs)
        finally:
            for module, training in modes:
                module.training = training

    def close(self) -> None:
        """Finish the running step, flush and close the backends, and remove every hook."""
        if self._closed:
            return
        try:
            if self._open:
                self._finish_step()
        finally:
            self._remove_hooks()
            self._closed = True
            _lifecycle.closed(self)
            try:
                self.bus.close()
            finally:
                for callback in self._on_close:
                    callback()

    def _remove_hooks(self) -> None:
        for h in self._handles + self._forward_handles:
            h.remove()
        if self._loss_handle is not None:
            self._loss_handle.remove()
            self._loss_handle = None
        for p in self._params:
            if p.handle is not None:
                p.handle.remove()
                p.handle = None
        self._handles.clear()
        self._forward_handles.clear()
        self._snapshot.clear()
        self._act_plan = self._lgrad_plan = self._in_plan = None
        self._loss_pending = False

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` when the Exporter closes, after the backends (how ``watch``
        tells plugins that the run finished)."""
        self._on_close.append(callback)

    def __enter__(self) -> Exporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def hook_count(self) -> int:
        """Number of hooks currently installed (diagnostics: pay only for what is used)."""
        grad = sum(p.handle is not None for p in self._params)
        loss = self._loss_handle is not None
        return len(self._handles) + len(self._forward_handles) + grad + loss

    # ------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Exporter is closed")

    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("no model: call exporter.set_model(model) first")
        return self.model

    def _sync_hooks(self) -> None:
        """Install exactly the hooks the subscribed topics need; remove the others."""
        if self.model is None or self._closed:
            return
        topics = self.bus.subscribed_topics()
        self._plans.clear()
        want_forward = bool(topics & FORWARD_TOPICS)
        if want_forward and not self._forward_handles:
            for i, (_, module) in enumerate(self._module_objs):
                hook = functools.partial(self._on_module_forward, i)
                self._forward_handles.append(module.register_forward_hook(hook))
        elif not want_forward and self._forward_handles:
            for h in self._forward_handles:
                h.remove()
            self._forward_handles.clear()
        want_output = bool(topics & _LOSS_TOPICS)
        if want_output and self._loss_handle is None:
            self._loss_handle = self.model.register_forward_hook(
                _outside_graphs(self._on_forward_end), with_kwargs=True
            )
        elif not want_output and self._loss_handle is not None:
            self._loss_handle.remove()
            self._loss_handle = None
        # Until an optimizer shows up, gradients are taken when they are accumulated (loops
        # without an optimizer); the optimizer's pre-step hook then takes over. A subscriber
        # that sees skipped steps keeps them: a skipped step's gradients are only seen there.
        self._skip_aware = any(s.subscriber.sees_skipped_steps for s in self.bus.subscriptions)
        kinds = set() if self._seen_optimizer and not self._skip_aware else {
            kind for kind, topic in GRADIENT_TOPICS.items() if topic in topics
        }
        for i, p in enumerate(self._params):
            want_grads = p.kind in kinds
            if want_grads and p.handle is None and p.tensor.requires_grad:
                p.handle = p.tensor.register_post_accumulate_grad_hook(
                    functools.partial(self._on_grad_accumulated, i)
                )
            elif not want_grads and p.handle is not None:
                p.handle.remove()
                p.handle = None

    def _capture_plans(self, step: int) -> tuple[Any, Any, Any]:
        """Per watched module, how the step's forward topics are captured: skipped, whole
        (a reference), or a sample of k entries (a copy), from what the subscriptions due at
        the step ask for (:meth:`Subscriber.sample_size`, :meth:`Subscriber.wants_module`)."""
        active = self.bus.active(step)
        plans = self._plans.get(active)
        if plans is None:
            found: list[tuple[int, ...] | None] = []
            for topic in ("activations", "layer_gradients", "inputs"):
                subs = [s.subscriber for s in active if topic in s.topics]
                if not subs:
                    found.append(None)
                    continue
                plan = []
                for info, _ in self._module_objs:
                    sizes = [s.sample_size(topic) for s in subs if s.wants_module(info)]
                    if not sizes:
                        plan.append(_SKIP)
                    elif None in sizes:
                        plan.append(_FULL)
                    else:
                        plan.append(max(k for k in sizes if k is not None))
                found.append(tuple(plan) if any(m != _SKIP for m in plan) else None)
            plans = self._plans[active] = (found[0], found[1], found[2])
        return plans

    # -------------------------------------------------------------- steps
    def _open_step(self) -> None:
        self.global_step += 1
        self.batch_index += 1
        self._open = True
        self._stamp = (self.global_step, self.epoch, self.batch_index)
        self._wanted = self.bus.wanted_topics(self.global_step)
        self._forwards = 0
        self._stepped = []

    def _on_forward_start(self, module: nn.Module, args: tuple[Any, ...], kwargs: Any) -> None:
        if not self._driven:
            self._forward_started(module.training, args, kwargs)

    def _external_forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """A training forward announced by an integration (the Lightning callback, at each
        training batch), for code that never calls the watched model's own forward (a
        LightningModule whose training_step calls ``self.net``): it counts like a forward of
        the model (a new step, or a micro-batch of the open one), forward topics are captured
        from the watched modules, and ``args``/``kwargs`` (the batch) give ``input_data``.
        From the first call on, the model's own forward no longer counts."""
        self._driven = True
        model = self._require_model()
        self._forward_started(model.training, args, kwargs)

    def _external_loss(self, loss: torch.Tensor) -> None:
        """The step's loss, announced by an integration (Lightning's on_before_backward), for
        a loss computed without a watched loss function. The first of the step counts, as
        for a watched loss; a watched loss function that already reported wins."""
        if self._loss_pending and not self._closed:
            self._stash_loss((), {}, loss)

    def _forward_started(self, training: bool, args: tuple[Any, ...], kwargs: Any) -> None:
        if self._silent or self._closed:
            return
        try:
            if not (training and torch.is_grad_enabled()) and not self.publish_in_eval:
                self._act_plan = self._lgrad_plan = self._in_plan = None
                self._loss_pending = False
                return
            self._watched_forward = True
            if self._inside is not None:  # a closure's forward inside optimizer.step()
                if not self._open:
                    self._open_step()
            elif self._open and (
                self._stepped or not (self._expected or self._optimizer_exists())
            ):
                self._finish_step()  # a loop without optimizer, or one that skipped a step
                self._open_step()
            elif self._open and self._skip_aware and not self._stepped and self._gradients_reset():
                self._deliver_skipped()
            elif not self._open:
                self._open_step()
            self._forwards += 1
            if self._forwards > 1 or not self._wanted:
                # a later micro-batch of the same step: forward topics come from the first
                self._act_plan = self._lgrad_plan = self._in_plan = None
                self._loss_pending = False
                return
            self._begin_capture(args, kwargs)
        except IkkunaError:
            raise  # a subscriber's or backend's error under on_error="raise": as it is
        except Exception as exc:  # noqa: BLE001 - never stop training
            self._act_plan = self._lgrad_plan = self._in_plan = None
            self.bus.internal_error("the model's forward pre-hook", exc, self.global_step)

    def _gradients_reset(self) -> bool:
        """Whether gradients accumulated in this step were reset (``zero_grad``) or changed
        (GradScaler's unscaling) without an optimizer step: the step was skipped, not
        accumulated, and the forward now starting is the next attempt at it."""
        params = self._params
        return any(
            params[i].tensor.grad is not grad or grad._version != version
            for i, (grad, version) in self._grads.items()
        )

    def _deliver_skipped(self) -> None:
        """Hand a skipped step's payloads to the subscribers that see skipped steps, then
        start the step's capture afresh under the same number: its forward, its layer
        gradients and its gradients as the backward left them (unscaled in place by a
        GradScaler; a gradient zeroed in place, ``set_to_none=False``, is left out)."""
        params = self._params
        grads = {
            i: (grad, grad._version) for i, (grad, _) in self._grads.items()
            if params[i].tensor.grad is not grad
        }
        fwd, wanted = self._fwd, self._wanted
        self._fwd = _Forward(len(self._module_objs))
        self._grads, self._updates, self._forwards = {}, {}, 0
        self.bus.deliver_skipped(self._stamp, self._payloads(wanted, fwd, grads, {}))

    def _begin_capture(self, args: tuple[Any, ...], kwargs: Any) -> None:
        wanted = self._wanted
        act, lgrad, inp = self._capture_plans(self.global_step)
        self._act_plan = self._learned_plan("activations", act)
        self._lgrad_plan = self._learned_plan("layer_gradients", lgrad)
        self._in_plan = self._learned_plan("inputs", inp)
        self._fwd = fwd = _Forward(len(self._module_objs), self._lgrad_plan)
        self._loss_pending = bool(wanted & _LOSS_TOPICS)
        if "input_data" in wanted:
            data = _first_tensor(args)
            if data is None and kwargs:
                data = _first_tensor(kwargs)
            if data is not None:
                fwd.network["input_data"] = self._stash_network("input_data", data)

    def _stash_network(self, topic: str, tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
        if (topic, -1) in self._clone:
            return (tensor.detach().clone(), -1)
        return (tensor, tensor._version)

    def _on_module_forward(self, index: int, module: nn.Module, args: Any, output: Any) -> None:
        # Runs for every watched module in every forward: keep it short (and traceable by
        # torch.compile): read the plan, stash a reference or copy a sample.
        act, lgrad, inp = self._act_plan, self._lgrad_plan, self._in_plan
        if act is None and lgrad is None and inp is None:
            return
        out = output if isinstance(output, torch.Tensor) else _first_tensor(output)
        x = None if inp is None or inp[index] == _SKIP else _first_tensor(args)
        if out is None and x is None:
            return
        fwd = self._fwd
        call = fwd.calls[index]
        fwd.calls[index] = call + 1
        if x is not None and inp is not None:
            fwd.inputs.append(self._capture(index, call, x, inp[index]))
        if out is None:
            return
        if act is not None and act[index] != _SKIP:
            fwd.acts.append(self._capture(index, call, out, act[index]))
        if lgrad is not None and lgrad[index] != _SKIP and out.requires_grad:
            out.register_hook(functools.partial(self._on_layer_gradient, fwd.ref, index, call))

    def _learned_plan(
        self, topic: str, plan: tuple[int, ...] | None
    ) -> tuple[int, ...] | None:
        """The capture plan with what earlier steps taught: whole tensors that something
        changes in place later in a step are copied, the others referenced; a module not seen
        yet is probed (copied and referenced once)."""
        if plan is None:
            return None
        key = (topic, plan, len(self._clone), len(self._probed))
        found = self._learned_plans.get(key)
        if found is None:
            found = tuple(
                m if m != _FULL
                else _CLONE if (topic, i) in self._clone
                else _FULL if (topic, i) in self._probed
                else _PROBE
                for i, m in enumerate(plan)
            )
            if len(self._learned_plans) > 64:
                self._learned_plans.clear()
            self._learned_plans[key] = found
        return found

    @staticmethod
    def _capture(index: int, call: int, tensor: torch.Tensor, mode: int) -> _Entry:
        """A stash entry: a sample (a copy), a copy of a tensor seen changing in place
        before, a reference and its version, or, the first time, a copy and the original."""
        if mode > 0:
            return (index, call, ops.sample(tensor.detach(), mode), -1, None)
        if mode == _FULL and not torch.compiler.is_compiling():
            return (index, call, tensor, tensor._version, None)
        copy = tensor.detach().clone()
        if mode == _PROBE and not torch.compiler.is_compiling():
            return (index, call, copy, tensor._version, tensor)
        # a copy: the tensor changes in place later in a step, or (compiled) the graph keeps
        # no version counters to tell
        return (index, call, copy, -1, None)

    def _on_layer_gradient(
        self, ref: weakref.ref[_Forward], index: int, call: int, grad: torch.Tensor
    ) -> None:
        fwd = ref()
        if fwd is None or fwd is not self._fwd or fwd.lgrad_plan is None:
            return  # the backward of a forward whose step has ended
        try:
            fwd.lgrads.append(self._capture(index, call, grad, fwd.lgrad_plan[index]))
        except IkkunaError:
            raise  # a subscriber's or backend's error under on_error="raise": as it is
        except Exception as exc:  # noqa: BLE001 - never stop training
            self.bus.internal_error(
                f"the layer-gradient hook of {self._module_objs[index][0].name!r}",
                exc,
                self.global_step,
            )

    def _on_forward_end(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: Any, output: Any
    ) -> None:
        """Models that compute their own loss (``model(**batch).loss``, Hugging Face): the
        output's ``loss`` and ``logits`` and the ``labels`` keyword are the loss topics."""
        if not self._loss_pending or self.loss_fn is not None:
            return
        loss = _field(output, "loss")
        if isinstance(loss, torch.Tensor):
            logits = _field(output, "logits")
            self._stash_loss((logits, kwargs.get("labels")), {}, loss)

    def _on_loss_module(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], loss: Any
    ) -> None:
        if self._loss_pending:
            self._stash_loss(args, kwargs, loss)

    def _stash_loss(self, args: Sequence[Any], kwargs: dict[str, Any], loss: Any) -> None:
        self._loss_pending = False
        network = self._fwd.network
        output = args[0] if len(args) > 0 else kwargs.get("input")
        target = args[1] if len(args) > 1 else kwargs.get("target")
        for topic, value in (("network_output", output), ("input_labels", target),
                             ("loss", loss)):
            if topic in self._wanted and isinstance(value, torch.Tensor):
                network[topic] = self._stash_network(topic, value)

    def _on_grad_accumulated(self, index: int, tensor: torch.Tensor) -> None:
        if self._open and tensor.grad is not None:
            self._grads[index] = (tensor.grad, tensor.grad._version)

    # ------------------------------------------------------------ optimizer
    def _optimizer_params(self, optimizer: Any) -> list[int]:
        """Indices (in ``self._params``) of the watched parameters ``optimizer`` holds."""
        groups = optimizer.param_groups
        signature = tuple(len(g["params"]) for g in groups)
        cached = self._optimizers.get(optimizer)
        if cached is None or cached[0] != signature:
            index = self._param_index
            found = sorted({index[id(p)] for g in groups for p in g["params"] if id(p) in index})
            cached = self._optimizers[optimizer] = (signature, found)
        return cached[1]

    def _optimizer_exists(self) -> bool:
        """Whether a live torch optimizer holds some watched parameter. Asked once, when the
        first step sees a second training forward before any optimizer step: gradient
        accumulation (the same step: an optimizer step will end it) or a loop without an
        optimizer (each forward a step)? Without this, the first step of an accumulating loop
        published a half-accumulated gradient (test_real_loops). Looked up among the objects
        the garbage collector tracks, once per Exporter."""
        if self._has_optimizer is None:
            import gc

            optimizer = torch.optim.Optimizer
            # type(), not isinstance(): isinstance reads __class__, which some objects
            # compute (deprecated torch attributes warn when it is read)
            self._has_optimizer = any(
                issubclass(type(obj), optimizer) and bool(self._optimizer_params(obj))
                for obj in gc.get_objects()
            )
        return self._has_optimizer

    def _on_optimizer_pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._closed or self._silent:
            return
        started = self.bus.cost.clock()
        try:
            params = self._optimizer_params(optimizer)
            if not params:
                return  # not an optimizer of this model
            if not self._seen_optimizer:
                self._seen_optimizer = True
                self._sync_hooks()  # gradients now come from here
            # torch hands the hook the step's arguments with the optimizer itself first
            # (args[0] is never the closure): reading args[0] took every step for a closure
            # step, so a second optimizer opened a step of its own (test_real_loops).
            closure = (args[1] if len(args) > 1 else kwargs.get("closure")) is not None
            if not self._open:
                if not (closure or optimizer in self._expected or self.global_step < 0):
                    # an optimizer stepping after the step it belongs to has ended (the
                    # second of two optimizers, on the first step): expect it from now on
                    self._expected.add(optimizer)
                    return
                # a step no watched forward opened (step(closure) runs the forward later, or
                # the training code never calls the watched model's own forward) opens here:
                # with a closure, for an optimizer that stepped in the last step, or at the
                # very first step (test_real_loops)
                self._open_step()
            self._inside, self._closure = optimizer, closure
            if not closure:
                self._read_grads(params)
            self._snapshot_params(params)
            self.bus.cost.own(self.bus.cost.clock() - started)
        except IkkunaError:
            raise  # a subscriber's or backend's error under on_error="raise": as it is
        except Exception as exc:  # noqa: BLE001 - never stop training
            self._inside = None
            self.bus.internal_error("the optimizer pre-step hook", exc, self.global_step)

    def _on_optimizer_post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._inside is not optimizer:
            return
        self._inside = None
        started = self.bus.cost.clock()
        try:
            params = self._optimizer_params(optimizer)
            if self._closure:
                self._read_grads(params)
            self._compute_updates(params)
            self._stepped.append(optimizer)
            stepped = set(map(id, self._stepped))
            self.bus.cost.own(self.bus.cost.clock() - started)
            if all(id(o) in stepped for o in self._expected):
                self._finish_step()
        except IkkunaError:
            raise  # a subscriber's or backend's error under on_error="raise": as it is
        except Exception as exc:  # noqa: BLE001 - never stop training
            self.bus.internal_error("the optimizer post-step hook", exc, self.global_step)

    def _read_grads(self, params: list[int]) -> None:
        wanted = self._wanted
        if wanted.isdisjoint(_GRADIENTS):
            return
        for i in params:
            p = self._params[i]
            if GRADIENT_TOPICS[p.kind] in wanted:
                grad = p.tensor.grad
                if grad is not None:
                    self._grads[i] = (grad, grad._version)

    def _snapshot_params(self, params: list[int]) -> None:
        wanted = self._wanted
        if wanted.isdisjoint(_UPDATES):
            return
        chosen = [i for i in params if UPDATE_TOPICS[self._params[i].kind] in wanted]
        if not chosen:
            return
        # One preallocated copy of the parameters, reused every step.
        bufs = []
        for i in chosen:
            t = self._params[i].tensor
            buf = self._snapshot.get(i)
            if buf is None or (buf.shape, buf.device, buf.dtype) != (t.shape, t.device, t.dtype):
                buf = self._snapshot[i] = torch.empty_like(t, requires_grad=False)
            bufs.append(buf)
        with torch.no_grad():
            sources: list[torch.Tensor] = [self._params[i].tensor for i in chosen]
            if self._sharded:  # DTensors (FSDP2) have no _foreach_copy_: one copy_ each
                for buf, source in zip(bufs, sources, strict=True):
                    buf.copy_(source)
            else:
                torch._foreach_copy_(bufs, sources)
        for i, buf in zip(chosen, bufs, strict=True):
            self._updates[i] = buf

    def _compute_updates(self, params: list[int]) -> None:
        chosen = [i for i in params if i in self._updates]
        if not chosen:
            return
        bufs = [self._updates[i] for i in chosen]
        with torch.no_grad():
            # buf <- after - before, in place: the snapshot becomes the update.
            after: list[torch.Tensor] = [self._params[i].tensor for i in chosen]
            if self._sharded:  # DTensors (FSDP2): pointwise ops, one tensor at a time
                for buf, tensor in zip(bufs, after, strict=True):
                    buf.sub_(tensor).neg_()
                return
            torch._foreach_sub_(bufs, after)
            torch._foreach_neg_(bufs)

    def _note_missing_forward(self) -> None:
        """Optimizer steps of the model's parameters without a forward of the watched model:
        forward topics can never be published. Said once, after three such steps."""
        self._steps_without_forward += 1
        if self._steps_without_forward == 3 and not self._watched_forward:
            self.bus._warn_once(
                "no-forward",
                f"the optimizer stepped 3 times but the watched {type(self.model).__name__} "
                "never ran a training forward, so activations, the loss and the outputs are "
                "not published. Watch the module your training code calls (e.g. the network "
                "a LightningModule's training_step calls), or use the Lightning callback",
            )

    def _note_missing_loss(self, topics: frozenset[str]) -> None:
        """Steps whose forward ran but whose loss was never seen: the loss topics cannot be
        published. Said once, at the second such step (a close() right after a forward
        does not count as a mistake)."""
        self._steps_without_loss += 1
        if self._steps_without_loss != 2:
            return
        missing = sorted(topics)
        if self.loss_fn is None:
            self.bus._warn_once(
                "no-loss",
                f"{missing} are subscribed but no loss function is set and the model's output "
                "carries no loss, so they are never published. Watch the loss: "
                "loss_fn = exporter.set_loss(loss_fn) (or ik.watch(model, loss_fn, ...)) and "
                "compute the loss with the returned callable; or let the model compute it, as "
                "Hugging Face models do: an output with 'loss' and 'logits' fields, the labels "
                "passed as the labels= keyword",
            )
        else:
            self.bus._warn_once(
                "loss-not-called",
                f"{missing} are subscribed but the loss function given to set_loss was not "
                "called in the step, so they are never published. Compute the "
                "loss with the callable set_loss returned (exporter.loss_fn): a plain "
                "function is wrapped, not changed in place",
            )

    # ------------------------------------------------------------ end of step
    def _finish_step(self) -> None:
        """Hand the step's payloads to the bus and forget them."""
        self.bus.cost.step_ending()
        self._open = False
        self._act_plan = self._lgrad_plan = self._in_plan = None
        loss_missing, self._loss_pending = self._loss_pending, False
        self._inside = None
        if self._stepped:
            self._expected = weakref.WeakSet(self._stepped)
        stamp, wanted = self._stamp, self._wanted
        if not self._forwards and self._stepped and wanted & (FORWARD_TOPICS | _LOSS_TOPICS):
            self._note_missing_forward()
        if loss_missing and self._forwards:
            self._note_missing_loss(wanted & _LOSS_TOPICS)
        fwd, grads, updates = self._fwd, self._grads, self._updates
        self._fwd = _Forward(len(self._module_objs))
        self._grads, self._updates = {}, {}
        if not wanted:
            self.bus.deliver(stamp, {})
            return
        try:
            payloads = self._payloads(wanted, fwd, grads, updates)
            if self._sharded:
                payloads = _gathered(payloads)
        except IkkunaError:
            raise  # a subscriber's or backend's error under on_error="raise": as it is
        except Exception as exc:  # noqa: BLE001 - never stop training
            self.bus.internal_error("collecting the step's payloads", exc, stamp[0])
            payloads = {}
        self.bus.deliver(stamp, payloads)

    def _payloads(
        self,
        wanted: frozenset[str],
        fwd: _Forward,
        grads: dict[int, tuple[torch.Tensor, int]],
        updates: dict[int, torch.Tensor],
    ) -> dict[str, TopicPayloads]:
        out: dict[str, TopicPayloads] = {}
        params = self._params
        for topic in wanted:
            indices = self._by_topic.get(topic)
            if indices is None:
                continue
            chosen: list[tuple[int, torch.Tensor]]
            if topic in _VALUES:
                chosen = [(i, params[i].tensor) for i in indices]
            elif topic in _GRADIENTS:
                chosen = [(i, g) for i in indices if (i in grads and
                          (g := self._valid(grads[i], topic, i)) is not None)]
            else:
                chosen = [(i, updates[i]) for i in indices if i in updates]
            if chosen:
                out[topic] = TopicPayloads(
                    topic=topic,
                    keys=[params[i].key for i, _ in chosen],
                    modules=[params[i].info for i, _ in chosen],
                    data=[t for _, t in chosen],
                )
        for topic, stash in (("activations", fwd.acts), ("layer_gradients", fwd.lgrads),
                             ("inputs", fwd.inputs)):
            if stash and topic in wanted:
                out[topic] = self._forward_payloads(topic, stash)
        for topic, entry in fwd.network.items():
            data = self._valid(entry, topic, -1)
            if data is not None:
                out[topic] = TopicPayloads(topic=topic, keys=[None], modules=[None], data=[data])
        for topic in ("batch_started", "batch_finished"):
            if topic in wanted:
                out[topic] = TopicPayloads.event(topic)
        if self.batch_index == 0 and "epoch_started" in wanted:
            out["epoch_started"] = TopicPayloads.event("epoch_started")
        return out

    def _valid(self, entry: tuple[torch.Tensor, int], topic: str, index: int) -> Any:
        """The stashed tensor, or None (and a copy from the next step on) when something
        changed it in place after it was stashed (an in-place ReLU after a module, a +=)."""
        tensor, version = entry
        if version < 0 or tensor._version == version:
            return tensor
        self._clone.add((topic, index))
        return None

    def _learned(self, topic: str, entry: _Entry) -> torch.Tensor | None:
        """The payload of a stash entry; a first capture teaches whether the module's tensor
        is changed in place later in a step (then it is copied from now on)."""
        index, _, tensor, version, original = entry
        if original is None:
            return self._valid((tensor, version), topic, index)
        self._probed.add((topic, index))
        if original._version != version:
            self._clone.add((topic, index))
        return tensor

    def _forward_payloads(self, topic: str, stash: list[_Entry]) -> TopicPayloads:
        keys: list[str | None] = []
        modules: list[ModuleInfo | None] = []
        data: list[torch.Tensor | None] = []
        for entry in sorted(stash, key=lambda e: (e[0], e[1])):
            index, call = entry[0], entry[1]
            valid = self._learned(topic, entry)
            if valid is None:
                continue
            keys.append(self._call_key(index, call))
            modules.append(self._module_objs[index][0])
            data.append(valid)
        return TopicPayloads(topic=topic, keys=keys, modules=modules, data=data)

    def _call_key(self, index: int, call: int) -> str:
        """``name`` for a module's first call in a forward, ``name#1`` for its second..."""
        keys = self._call_keys[index]
        while len(keys) <= call:
            keys.append(f"{keys[0]}#{len(keys)}")
        return keys[call]


def _is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (none can exist before
    that module is imported, so this never imports it)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def _gathered(payloads: dict[str, TopicPayloads]) -> dict[str, TopicPayloads]:
    """The payloads with every sharded tensor (a DTensor: FSDP2's ``fully_shard``, tensor
    parallelism) replaced by the full tensor, gathered from all ranks, so that every metric
    is of the whole parameter, never silently of this rank's shard. A collective: every rank
    runs it at the same steps, for the same topics in the same (sorted) order. It costs one
    all-gather per sharded payload at published steps (``subsample`` bounds it) and, for a
    moment, the memory of the full tensors of the subscribed topics."""
    with torch.no_grad():
        for topic in sorted(payloads):
            found = payloads[topic]
            if any(_is_dtensor(t) for t in found.data):
                payloads[topic] = TopicPayloads(
                    topic=topic,
                    keys=found.keys,
                    modules=found.modules,
                    data=[t.full_tensor() if _is_dtensor(t) else t  # type: ignore[union-attr]
                          for t in found.data],
                )
    return payloads


def modules_of(names: Iterable[str]) -> tuple[type[nn.Module], ...]:
    """Resolve ``torch.nn`` class names (``"Conv2d"``) or dotted class paths
    (``"transformers.pytorch_utils.Conv1D"``) for the ``include`` option."""
    import importlib

    out = []
    for name in names:
        if "." in name:
            module_name, _, attr = name.rpartition(".")
            try:
                cls = getattr(importlib.import_module(module_name), attr, None)
            except ImportError as exc:
                raise ValueError(f"include: cannot import {name!r}: {exc}") from None
        else:
            cls = getattr(nn, name, None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(
                f"include: {name!r} is not a torch.nn module class (e.g. 'Conv2d', or a dotted "
                "path such as 'transformers.pytorch_utils.Conv1D')"
            )
        out.append(cls)
    return tuple(out)
