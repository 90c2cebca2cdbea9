"""The Exporter: the only code that touches torch hooks. It pulls data out of a training
process and publishes it as typed messages on a MessageBus.

Step model. A *training step* begins with each forward of the watched model in train mode
with autograd enabled, and ends after the ``optimizer.step()`` of an optimizer that holds the
model's parameters (noticed through torch's global optimizer hooks, so no user code is
needed), or at the next training forward, ``epoch_finished()`` or ``close()`` when there is
no optimizer step. Forwards in eval mode, under ``torch.no_grad()``, or inside
:meth:`Exporter.silenced` publish nothing and count no step.

Within a step, topics are published when their data exists:

- forward: ``batch_started``, ``epoch_started`` (first step of an epoch), ``input_data``,
  ``activations`` (module outputs; the first tensor of a tuple output)
- loss: ``network_output``, ``input_labels``, ``loss``
- backward: ``layer_gradients`` (through ``output.register_hook``, which, unlike full backward
  hooks, works with in-place ReLU), ``weight_gradients``/``bias_gradients`` (through
  ``register_post_accumulate_grad_hook``: the value of ``p.grad`` after backward)
- optimizer step: ``weight_updates``/``bias_updates`` (parameter after minus before)
- end: ``weights``/``biases`` (after the update), ``batch_finished``

Only what some subscriber wants at a step costs anything: hooks exist only for subscribed
topics, the parameter snapshot for updates is taken only at steps where an ``*_updates`` topic
is wanted, and nothing runs a host synchronisation.
"""

from __future__ import annotations

import functools
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

from .bus import MessageBus
from .messages import ModuleInfo, ModuleMessage, NetworkMessage

__all__ = ["Exporter", "select_modules"]

_FORWARD_TOPICS = frozenset({"activations", "layer_gradients"})
_GRAD_TOPICS = {"weight": "weight_gradients", "bias": "bias_gradients"}
_UPDATE_TOPICS = {"weight": "weight_updates", "bias": "bias_updates"}
_VALUE_TOPICS = {"weight": "weights", "bias": "biases"}
ROOT_NAME = "model"


def _check_depth(depth: int) -> None:
    if depth == 0 or depth < -1:
        raise ValueError(f"depth must be -1 (leaves) or >= 1, got {depth}")


def select_modules(
    model: nn.Module, depth: int = -1, include: Sequence[type[nn.Module]] | None = None
) -> list[tuple[str, nn.Module]]:
    """The modules the Exporter watches, as (dotted name, module).

    ``depth=-1`` selects the leaves; ``depth=d`` selects the modules ``d`` levels below the
    model plus shallower leaves, so every part of the model is covered. With ``include``,
    every module of those classes down to ``depth`` (any depth for -1) is selected instead.
    The model itself is called ``"model"`` when it is selected.
    """
    _check_depth(depth)
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


class _Param:
    __slots__ = ("handle", "info", "kind", "name", "tensor")

    def __init__(self, info: ModuleInfo, name: str, tensor: nn.Parameter) -> None:
        self.info = info
        self.name = name
        self.kind = "bias" if "bias" in name else "weight"
        self.tensor = tensor
        self.handle: RemovableHandle | None = None


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
        self._module_objs: list[tuple[ModuleInfo, nn.Module]] = []
        self._params: list[_Param] = []
        self._param_ids: set[int] = set()
        self._owned_optimizers: weakref.WeakKeyDictionary[Any, bool] = (
            weakref.WeakKeyDictionary()
        )
        self._handles: list[RemovableHandle] = []
        self._forward_handles: list[RemovableHandle] = []
        self._snapshot: dict[int, torch.Tensor] = {}
        self._step_open = False
        self._recording = False
        self._silent = False
        self._closed = False
        self._wanted: frozenset[str] = frozenset()
        self._stamp: tuple[int, int, int] = (0, 0, 0)  # (global_step, epoch, batch_index)
        self.loss_fn: Callable[..., torch.Tensor] | None = None
        self.config: Any = config  # the IkkunaConfig of a run started by watch()
        self.registry: Any = registry  # the PluginRegistry of a run started by watch()
        self._on_close: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ setup
    def set_model(self, model: nn.Module) -> None:
        """Discover the modules to watch and attach the hooks subscribed topics need."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"set_model expects a torch.nn.Module, got {type(model).__name__}")
        if self.model is not None:
            raise RuntimeError("this Exporter already watches a model; create a new Exporter")
        self._check_open()
        self.model = model
        for name, module in select_modules(model, self.depth, self.include):
            info = ModuleInfo(name=name, type=type(module).__name__)
            self.modules[name] = info
            self._module_objs.append((info, module))
            for pname, p in module.named_parameters(recurse=False):
                self._params.append(_Param(info, pname, p))
        if not self._module_objs:
            raise ValueError(
                f"no module of {type(model).__name__} matches depth={self.depth}"
                f" include={[c.__name__ for c in self.include or ()]}"
            )
        self._param_ids = {id(p) for p in model.parameters()}
        self._handles.append(model.register_forward_pre_hook(self._on_forward_start))
        self._handles.append(
            register_optimizer_step_pre_hook(self._on_optimizer_pre)
        )
        self._handles.append(
            register_optimizer_step_post_hook(self._on_optimizer_post)
        )
        self._sync_hooks()

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
            if self._recording:
                self._publish_loss(args, kwargs, loss)
            return loss

        self.loss_fn = watched_loss
        return watched_loss

    # --------------------------------------------------------------- control
    def epoch_finished(self) -> None:
        """Close the running step, publish ``epoch_finished`` and start a new epoch."""
        self._check_open()
        if self._step_open:
            self._finish_step()
        if "epoch_finished" in self.bus.wanted_topics(max(self.global_step, 0)):
            self._stamp = self._make_stamp()
            self._publish_network("epoch_finished", None)
        self.bus.flush()
        self.epoch += 1
        self.batch_index = -1

    @contextmanager
    def silenced(self) -> Iterator[None]:
        """Forwards inside this block publish nothing and count no step (the thesis'
        ``should_train=False``). Used by subscribers that evaluate the model."""
        saved = (self._silent, self._recording)
        self._silent, self._recording = True, False
        try:
            yield
        finally:
            self._silent, self._recording = saved

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model in eval mode without autograd and without messages; the model's
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
        if self._step_open:
            self._finish_step()
        for h in self._handles + self._forward_handles:
            h.remove()
        for p in self._params:
            if p.handle is not None:
                p.handle.remove()
                p.handle = None
        self._handles.clear()
        self._forward_handles.clear()
        self._snapshot.clear()
        self._closed = True
        self._recording = False
        try:
            self.bus.close()
        finally:
            for callback in self._on_close:
                callback()

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
        return len(self._handles) + len(self._forward_handles) + grad

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
        want_forward = bool(topics & _FORWARD_TOPICS)
        if want_forward and not self._forward_handles:
            for info, module in self._module_objs:
                hook = functools.partial(self._on_module_forward, info)
                self._forward_handles.append(module.register_forward_hook(hook))
        elif not want_forward and self._forward_handles:
            for h in self._forward_handles:
                h.remove()
            self._forward_handles.clear()
        for p in self._params:
            wanted = _GRAD_TOPICS[p.kind] in topics and p.tensor.requires_grad
            if wanted and p.handle is None:
                hook = functools.partial(self._on_grad_accumulated, p)
                p.handle = p.tensor.register_post_accumulate_grad_hook(hook)
            elif not wanted and p.handle is not None:
                p.handle.remove()
                p.handle = None

    def _make_stamp(self) -> tuple[int, int, int]:
        return (max(self.global_step, 0), self.epoch, max(self.batch_index, 0))

    def _on_forward_start(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self._silent:
            return
        if not (module.training and torch.is_grad_enabled()) and not self.publish_in_eval:
            self._recording = False
            return
        if self._step_open:
            self._finish_step()
        self.global_step += 1
        self.batch_index += 1
        self._step_open = True
        self._recording = True
        self._stamp = self._make_stamp()
        self._wanted = wanted = self.bus.wanted_topics(self.global_step)
        if not wanted:
            return
        if "batch_started" in wanted:
            self._publish_network("batch_started", None)
        if self.batch_index == 0 and "epoch_started" in wanted:
            self._publish_network("epoch_started", None)
        if "input_data" in wanted:
            data = _first_tensor(args)
            if data is not None:
                self._publish_network("input_data", data.detach())

    def _on_module_forward(
        self, info: ModuleInfo, module: nn.Module, args: Any, output: Any
    ) -> None:
        if not self._recording:
            return
        wanted = self._wanted
        if "activations" not in wanted and "layer_gradients" not in wanted:
            return
        out = _first_tensor(output)
        if out is None:
            return
        if "activations" in wanted:
            self._publish_module("activations", info, None, out.detach())
        if "layer_gradients" in wanted and out.requires_grad:
            stamp = self._stamp
            out.register_hook(functools.partial(self._on_layer_gradient, info, stamp))

    def _on_layer_gradient(
        self, info: ModuleInfo, stamp: tuple[int, int, int], grad: torch.Tensor
    ) -> None:
        if not self._closed:
            self._publish_module("layer_gradients", info, None, grad.detach(), stamp)

    def _on_grad_accumulated(self, p: _Param, tensor: torch.Tensor) -> None:
        topic = _GRAD_TOPICS[p.kind]
        if self._step_open and topic in self._wanted and tensor.grad is not None:
            self._publish_module(topic, p.info, p.name, tensor.grad.detach())

    def _owns(self, optimizer: Any) -> bool:
        owned = self._owned_optimizers.get(optimizer)
        if owned is None:
            owned = any(
                id(p) in self._param_ids for g in optimizer.param_groups for p in g["params"]
            )
            self._owned_optimizers[optimizer] = owned
        return owned

    def _update_params(self) -> list[_Param]:
        wanted = self._wanted
        return [p for p in self._params if _UPDATE_TOPICS[p.kind] in wanted]

    def _on_optimizer_pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._step_open or not self._owns(optimizer):
            return
        params = self._update_params()
        if not params:
            return
        # One preallocated copy of the parameters, reused every step.
        bufs = []
        for p in params:
            buf = self._snapshot.get(id(p.tensor))
            if buf is None or buf.shape != p.tensor.shape or buf.device != p.tensor.device:
                buf = self._snapshot[id(p.tensor)] = torch.empty_like(p.tensor.detach())
            bufs.append(buf)
        with torch.no_grad():
            torch._foreach_copy_(bufs, [p.tensor.detach() for p in params])

    def _on_optimizer_post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._step_open or not self._owns(optimizer):
            return
        params = self._update_params()
        if params:
            bufs = [self._snapshot[id(p.tensor)] for p in params]
            with torch.no_grad():
                # buf <- after - before, in place: the snapshot becomes the update.
                torch._foreach_sub_(bufs, [p.tensor.detach() for p in params])
                torch._foreach_neg_(bufs)
            for p, buf in zip(params, bufs, strict=True):
                self._publish_module(_UPDATE_TOPICS[p.kind], p.info, p.name, buf)
        self._finish_step()

    def _on_loss_module(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], loss: Any
    ) -> None:
        if self._recording:
            self._publish_loss(args, kwargs, loss)

    def _publish_loss(self, args: Sequence[Any], kwargs: dict[str, Any], loss: Any) -> None:
        wanted = self._wanted
        if not wanted:
            return
        output = args[0] if len(args) > 0 else kwargs.get("input")
        target = args[1] if len(args) > 1 else kwargs.get("target")
        if "network_output" in wanted and isinstance(output, torch.Tensor):
            self._publish_network("network_output", output.detach())
        if "input_labels" in wanted and isinstance(target, torch.Tensor):
            self._publish_network("input_labels", target.detach())
        if "loss" in wanted and isinstance(loss, torch.Tensor):
            self._publish_network("loss", loss.detach())

    def _finish_step(self) -> None:
        wanted = self._wanted
        self._step_open = False
        self._recording = False
        if wanted:
            values = [p for p in self._params if _VALUE_TOPICS[p.kind] in wanted]
            for p in values:
                self._publish_module(
                    _VALUE_TOPICS[p.kind], p.info, p.name, p.tensor.detach()
                )
            if "batch_finished" in wanted:
                self._publish_network("batch_finished", None)
        self.bus.step_finished(self.global_step)

    def _publish_module(
        self,
        topic: str,
        info: ModuleInfo,
        parameter: str | None,
        data: torch.Tensor,
        stamp: tuple[int, int, int] | None = None,
    ) -> None:
        step, epoch, batch = stamp or self._stamp
        self.bus.publish(
            ModuleMessage(
                topic=topic,
                global_step=step,
                epoch=epoch,
                batch_index=batch,
                module=info,
                parameter=parameter,
                data=data,
            )
        )

    def _publish_network(self, topic: str, data: torch.Tensor | None) -> None:
        step, epoch, batch = self._stamp
        self.bus.publish(
            NetworkMessage(topic=topic, global_step=step, epoch=epoch, batch_index=batch, data=data)
        )


def modules_of(names: Iterable[str]) -> tuple[type[nn.Module], ...]:
    """Resolve ``torch.nn`` class names (``"Conv2d"``) for the ``include`` option."""
    out = []
    for name in names:
        cls = getattr(nn, name, None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(f"include: {name!r} is not a torch.nn module class (e.g. 'Conv2d')")
        out.append(cls)
    return tuple(out)
