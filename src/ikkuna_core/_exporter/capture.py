"""What the hooks of a step's first forward and backward stash, and how: a reference whose
version is checked at the end of the step, a copy, or a sample; learned per module and
topic from what earlier steps saw (a tensor changed in place later in a step is copied)."""

from __future__ import annotations

import contextlib
import enum
import functools
import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .. import ops
from .._bus import FINITENESS, FINITENESS_IF_LOSS
from ..messages import ModuleInfo, TopicPayloads
from . import traced
from .hooks import guard, in_backward
from .implied import RecentOutputs, TellingGradients, finite_in_place, passing
from .traced import first_tensor

__all__ = ["Capture", "Mode", "Stash", "first_tensor", "output_field"]


class Mode(enum.IntEnum):
    """How a forward topic is captured for one module; an int k > 0 in a plan instead
    means a sample of k entries (a copy)."""

    SKIP = -1  #: no subscriber wants it
    FULL = 0  #: a reference, whose version is checked at the end of the step
    CLONE = -2  #: a copy: the tensor was seen changing in place later in a step
    PROBE = -3  #: first capture: a copy and a reference, to learn which of the two it needs
    #: only a finiteness check (``Subscriber.finiteness_only``): the tensor is held until the
    #: next batched reduction (:class:`Reduction`), then only its 0-d result
    REDUCE = FINITENESS
    #: reduced at once, with all that waits: the tensor was seen changing in place later
    REDUCE_NOW = -5
    REDUCE_PROBE = -6  #: first capture: reduced at once, its version checked at the reduction
    #: a finiteness check needed only if the step's loss is not finite: on the CPU the
    #: tensor is held until the loss call (alive then anyway: autograd saved it), and read
    #: only if the loss is not finite or the backward begins without a loss seen
    REDUCE_IF_LOSS = FINITENESS_IF_LOSS


_SKIP, _FULL, _CLONE, _PROBE = (int(m) for m in (Mode.SKIP, Mode.FULL, Mode.CLONE, Mode.PROBE))
_REDUCE, _REDUCE_NOW, _REDUCE_PROBE, _REDUCE_IF_LOSS = (
    int(m) for m in (Mode.REDUCE, Mode.REDUCE_NOW, Mode.REDUCE_PROBE, Mode.REDUCE_IF_LOSS)
)
#: A batched reduction is due once the tensors waiting hold 1/_REDUCTION_SHARE of the bytes
#: the previous step reduced, or _MIN_UNREDUCED_BYTES, whichever is more: about 8
#: reductions a step (one fused kernel each) for what waits at most 1/8 of those bytes
_REDUCTION_SHARE = 8
_MIN_UNREDUCED_BYTES = 1 << 20
#: One capture mode per watched module (a ``Mode`` or a sample size).
Plan = tuple[int, ...]
#: A stashed payload: (module index, call, tensor, version, original). The tensor is a
#: reference whose version is checked at the end of the step, or a copy (version -1); on a
#: module's first capture, a copy plus the original, to learn whether something changes the
#: original in place later in the step.
Entry = tuple[int, int, torch.Tensor, int, torch.Tensor | None]
Versioned = tuple[torch.Tensor, int]
Plans = tuple[Plan | None, Plan | None, Plan | None]
#: Reports an error inside a hook: (where, error).
Report = Callable[[str, BaseException], None]

def output_field(output: Any, name: str) -> Any:
    """``output.name`` or ``output[name]`` (Hugging Face ``ModelOutput`` is both)."""
    if isinstance(output, dict):
        return output.get(name)
    return getattr(output, name, None)


class Stash:
    """What the current step stashed in the hooks of its first forward and backward."""

    __slots__ = ("__weakref__", "acts", "backward", "borrowed", "calls", "cursor", "gated",
                 "inputs", "lgrad_plan", "lgrads", "network", "pending", "reduction", "ref",
                 "traced", "traced_at")

    def __init__(self, n_modules: int, lgrad_plan: Plan | None = None) -> None:
        # The layer-gradient hooks hold only this weak reference: an output holding a hook
        # that held the stash holding that output is a cycle through autograd that the
        # garbage collector cannot see
        self.ref = weakref.ref(self)
        self.calls = [0] * n_modules
        self.lgrad_plan = lgrad_plan
        self.acts: list[Entry] = []
        self.lgrads: list[Entry] = []
        self.inputs: list[Entry] = []
        self.network: dict[str, Versioned] = {}
        #: (module, call, starts) of the calls whose layer gradient is wanted but whose
        #: output did not require grad (a reentrant checkpoint's forward runs under
        #: no_grad): their gradient is hooked in the recomputation; a taken one becomes
        #: (-1, -1, False). ``starts``: its input requires grad, so it was made outside the
        #: no_grad block: the call may begin a checkpointed segment
        self.pending: list[tuple[int, int, bool]] = []
        self.cursor = -1  # the pending call the next recomputed one is expected to be
        #: (module, call) of the calls in compiled forwards, and the one a recomputation in
        #: a compiled backward is expected to repeat next
        self.traced: list[tuple[int, int]] = []
        self.traced_at = -1
        self.reduction = Reduction()
        #: forward payloads checked only if the loss is not finite (``Mode.REDUCE_IF_LOSS``):
        #: (the list its result goes to, topic, module index, call, tensor, its version)
        self.gated: list[tuple[list[Entry], str, int, int, torch.Tensor, int]] = []
        self.backward = False  # a layer-gradient hook of this step ran
        #: (module, call) of a passing module's call -> the module whose output it took,
        #: whose teller tells its output gradient (:mod:`.implied`)
        self.borrowed: dict[tuple[int, int], int] = {}

    def ungate(self) -> None:
        """The held forward checks join the reduction: the loss was not finite, or the
        backward begins (or the step ends) without a loss seen."""
        for entries, topic, index, call, tensor, version in self.gated:
            self.reduction.add(entries, topic, index, call, tensor, None, version)
        self.gated.clear()

    def borrow(self, index: int, call: int, producer: int, producer_call: int) -> None:
        """Module ``index``'s call borrows the teller of ``producer``'s call (or the one
        that call borrowed)."""
        self.borrowed[(index, call)] = self.borrowed.get((producer, producer_call), producer)

    def changed_finitely(self, tensor: torch.Tensor) -> None:
        """``tensor``, a held forward payload, was just changed in place by an activation
        that makes no non-finite value of finite ones: its finiteness check is of the
        changed tensor (non-finite only where the old one was), not a change to learn."""
        version = tensor._version
        gated, waiting = self.gated, self.reduction.waiting
        for i in range(len(gated) - 1, max(len(gated) - 5, -1), -1):
            if gated[i][4] is tensor:
                gated[i] = (*gated[i][:5], version)
        for i in range(len(waiting) - 1, max(len(waiting) - 5, -1), -1):
            if waiting[i][4] is tensor:
                waiting[i] = (*waiting[i][:5], version, waiting[i][6])

    def loss_seen(self, loss: Any, learn: Callable[[str, int, bool], None]) -> None:
        """The step's loss call: the held forward checks are dropped when the loss is finite
        on the host (nothing of the forward is read at this step), else reduced now."""
        if not self.gated:
            return
        if _finite_on_host(loss):
            self.gated.clear()
        else:
            self.ungate()
            self.reduction.run(learn)

    def recomputed_call(self, index: int, starts: bool) -> int | None:
        """The call of module ``index`` that a recomputation in backward repeats, or None.
        A checkpointed segment is recomputed in the order of its forward, the segments in
        the reverse order. ``starts``: the recomputed call's input is a leaf (the segment's
        input, detached), so it begins a segment: this module's last call not yet matched
        that may begin one; else the call after the last one matched if it is this
        module's, else this module's last call not yet matched."""
        pending, pos = self.pending, self.cursor
        if starts or not (0 <= pos < len(pending) and pending[pos][0] == index):
            pos = self._last(index, starts)
            if pos < 0 and starts:
                pos = self._last(index, False)
            if pos < 0:
                return None
        call = pending[pos][1]
        pending[pos] = (-1, -1, False)
        self.cursor = pos + 1
        return call

    def traced_call(self, plans: Plans, index: int, output: torch.Tensor | None,
                    inputs: torch.Tensor | None) -> int:
        """A watched module's call in a compiled forward: counted, and what ``plans`` (as
        given) want copied (or sampled), as the compiled graph may reuse the tensors'
        memory. The call's number, or -1."""
        act, lgrad, inp = plans
        if act is None and lgrad is None and inp is None:
            return -1
        x = None if inp is None or inp[index] == _SKIP else inputs
        if output is None and x is None:
            return -1
        call = self.calls[index]
        self.calls[index] = call + 1
        self.traced.append((index, call))
        if x is not None and inp is not None:
            self.inputs.append(_capture(index, call, x, _copied(inp[index])))
        if output is not None and act is not None and act[index] != _SKIP:
            self.acts.append(_capture(index, call, output, _copied(act[index])))
        return call

    def retraced_call(self, index: int) -> int:
        """The call of module ``index`` that a compiled backward repeats (it recomputes the
        ops of a checkpointed region, ``ikkuna::module_forward`` too), or -1: the call after
        the last one matched if it is this module's, else this module's last call not yet
        matched (the regions are recomputed in the reverse order of the forward)."""
        calls, pos = self.traced, self.traced_at
        if not (0 <= pos < len(calls) and calls[pos][0] == index):
            pos = next((p for p in range(len(calls) - 1, -1, -1) if calls[p][0] == index), -1)
            if pos < 0:
                return -1
        call = calls[pos][1]
        calls[pos] = (-1, -1)
        self.traced_at = pos + 1
        return call

    def _last(self, index: int, starts: bool) -> int:
        pending = self.pending
        return next((p for p in range(len(pending) - 1, -1, -1)
                     if pending[p][0] == index and (pending[p][2] or not starts)), -1)


#: A payload waiting for its reduction: (the stash's list its result goes to, topic,
#: module index, call, tensor, its version in the hook, its value if reduced in the hook).
Unreduced = tuple[list[Entry], str, int, int, torch.Tensor, int, torch.Tensor | None]


class Reduction:
    """The payloads of a step that only need a finiteness check, waiting to be reduced
    together (one fused kernel), and the bytes reduced so far in the step."""

    __slots__ = ("bytes", "done", "held", "implied", "known", "ready", "unready_bytes",
                 "waiting")

    def __init__(self) -> None:
        self.waiting: list[Unreduced] = []
        #: output gradients whose module's bias or weight gradient tells their finiteness
        #: (:mod:`.implied`): (the payload, module index, that parameter), read instead once
        #: the backward has accumulated it (the module index in ``ready``)
        self.implied: list[tuple[Unreduced, int, torch.Tensor]] = []
        self.ready: set[int] = set()
        self.unready_bytes: dict[int, int] = {}  # counted in ``bytes`` once ready
        self.held: set[int] = set()  # the ids of the tensors waiting
        self.bytes = 0  # theirs
        self.done = 0
        #: the tensors reduced so far in the step, by id: (a weak reference, the version
        #: reduced, the value). A module's input is the previous one's output, a container's
        #: output its last child's: each is read once, not once per topic and module.
        self.known: dict[int, tuple[weakref.ref[torch.Tensor], int, torch.Tensor]] = {}

    def add(self, entries: list[Entry], topic: str, index: int, call: int,
            tensor: torch.Tensor, value: torch.Tensor | None, version: int | None = None,
            teller: tuple[int, torch.Tensor] | None = None) -> None:
        """Wait for the next run; ``version``: the tensor's in its hook, if not now (one
        changed since is left out by the run, and learned); ``teller``: (module index, its
        parameter) whose gradient tells this output gradient's finiteness (a summed bias, a
        weight; the module's own, or its producer's for a passing module)."""
        if version is None:
            version = tensor._version
        if value is None:
            if version == tensor._version:
                value = self.known_value(tensor)
        else:
            self.known[id(tensor)] = (weakref.ref(tensor), version, value)
        item = (entries, topic, index, call, tensor, version, value)
        if value is None and teller is not None:
            owner, param = teller
            self.implied.append((item, owner, param))
            self.unready_bytes[owner] = self.unready_bytes.get(owner, 0) + _nbytes(tensor)
            return
        self.waiting.append(item)
        if value is not None:
            return
        if id(tensor) not in self.held:  # a module's input is often the previous one's output
            self.held.add(id(tensor))
            self.bytes += _nbytes(tensor)

    def known_value(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The tensor's value if it was reduced earlier in the step and is unchanged since."""
        seen = self.known.get(id(tensor))
        if seen is not None and seen[1] == tensor._version and seen[0]() is tensor:
            return seen[2]
        return None

    def unready(self) -> int:
        """Bytes of the output gradients waiting for their module's telling gradient."""
        return sum(self.unready_bytes.values())

    def mark_ready(self, index: int) -> None:
        """The backward accumulated module ``index``'s telling gradient."""
        self.ready.add(index)
        self.bytes += self.unready_bytes.pop(index, 0)

    def run(self, learn: Callable[[str, int, bool], None], final: bool = False) -> None:
        """Reduce the waiting tensors (each once), append the results to their lists and
        forget the tensors. One changed in place since its hook no longer holds the module's
        value: it is left out; ``learn(topic, index, changed)`` is told about it and about
        each tensor reduced in its hook the first time. An implied output gradient is told
        by its bias or weight gradient once that is accumulated (``final``: the backward is
        over, whatever is left is read)."""
        waiting = self.waiting
        checked: list[tuple[Unreduced, int, torch.Tensor]] = []
        kept: list[tuple[Unreduced, int, torch.Tensor]] = []
        for item in self.implied:
            if item[1] in self.ready and item[2].grad is not None:
                checked.append(item)
            elif final:
                waiting.append(item[0])
            else:
                kept.append(item)
        self.implied = kept
        if not waiting and not checked:
            return
        self.waiting, self.done, self.bytes = [], self.done + self.bytes, 0
        self.held.clear()
        position: dict[int, int] = {}
        todo: list[torch.Tensor] = []
        for *_, tensor, version, value in waiting:
            if value is None and tensor._version == version and id(tensor) not in position:
                position[id(tensor)] = len(todo)
                todo.append(tensor)
        for _, _, teller in checked:
            grad = teller.grad
            if grad is not None and id(grad) not in position:
                position[id(grad)] = len(todo)
                todo.append(grad)
        with torch.no_grad():
            values = ops.finiteness(todo)
        known = self.known
        for tensor, value in zip(todo, values, strict=True):
            known[id(tensor)] = (weakref.ref(tensor), tensor._version, value)
        for entries, topic, index, call, tensor, version, value in waiting:
            changed = tensor._version != version
            if value is not None or changed:
                learn(topic, index, changed)
            if value is None and not changed:
                value = values[position[id(tensor)]]
            if value is not None:
                entries.append((index, call, value, -1, None))
        if checked:
            self._told(checked, values, position, learn)

    def _told(self, checked: list[tuple[Unreduced, int, torch.Tensor]],
              values: Sequence[torch.Tensor], position: dict[int, int],
              learn: Callable[[str, int, bool], None]) -> None:
        """The implied output gradients, by their teller's gradient's value (read on the host:
        no kernel on the CPU); the output gradient itself where that is not finite."""
        again: list[tuple[list[Entry], int, int, torch.Tensor]] = []
        for (entries, topic, index, call, tensor, version, _), _, teller in checked:
            if tensor._version != version:
                learn(topic, index, True)
                continue
            value = values[position[id(teller.grad)]]
            if math.isfinite(_host_value(value)):
                entries.append((index, call, value, -1, None))
                self.known[id(tensor)] = (weakref.ref(tensor), version, value)
            else:
                again.append((entries, index, call, tensor))
        if again:
            with torch.no_grad():
                found = ops.finiteness([tensor for *_, tensor in again])
            for (entries, index, call, _), value in zip(again, found, strict=True):
                entries.append((index, call, value, -1, None))


class _Payloads:
    """The end of a step, for :class:`Capture`: the forward topics of its stash as payloads,
    and what their versions taught (which modules' tensors change in place later)."""

    modules: list[ModuleInfo]
    _call_keys: list[list[str]]
    _probed: set[tuple[str, int]]
    _clone: set[tuple[str, int]]
    _learned_plans: dict[Any, Plan]

    def payloads(self, stash: Stash, wanted: frozenset[str]) -> dict[str, TopicPayloads]:
        """The forward and network topics of a step's stash (``wanted`` at that step)."""
        out: dict[str, TopicPayloads] = {}
        for topic, entries in (("activations", stash.acts), ("layer_gradients", stash.lgrads),
                               ("inputs", stash.inputs)):
            if entries and topic in wanted:
                out[topic] = self._forward_payloads(topic, entries)
        for topic, entry in stash.network.items():
            data = self.valid(entry, topic, -1)
            if data is not None:
                out[topic] = TopicPayloads(topic=topic, keys=[None], modules=[None], data=[data])
        return out

    def valid(self, entry: Versioned, topic: str, index: int) -> torch.Tensor | None:
        """The stashed tensor, or None (and a copy from the next step on) when something
        changed it in place after it was stashed (an in-place ReLU after a module, a +=)."""
        tensor, version = entry
        if version < 0 or tensor._version == version:
            return tensor
        self._clone.add((topic, index))
        return None

    def _learned(self, topic: str, entry: Entry) -> torch.Tensor | None:
        """The payload of a stash entry; a first capture teaches whether the module's tensor
        is changed in place later in a step (then it is copied from now on)."""
        index, _, tensor, version, original = entry
        if original is None:
            return self.valid((tensor, version), topic, index)
        self._probed.add((topic, index))
        if original._version != version:
            self._clone.add((topic, index))
        return tensor

    def _forward_payloads(self, topic: str, entries: list[Entry]) -> TopicPayloads:
        keys: list[str | None] = []
        modules: list[ModuleInfo | None] = []
        data: list[torch.Tensor | None] = []
        for entry in sorted(entries, key=lambda e: (e[0], e[1])):
            index, call = entry[0], entry[1]
            valid = self._learned(topic, entry)
            if valid is None:
                continue
            keys.append(self._call_key(index, call))
            modules.append(self.modules[index])
            data.append(valid)
        return TopicPayloads(topic=topic, keys=keys, modules=modules, data=data)

    def _call_key(self, index: int, call: int) -> str:
        """``name`` for a module's first call in a forward, ``name#1`` for its second..."""
        keys = self._call_keys[index]
        while len(keys) <= call:
            keys.append(f"{keys[0]}#{len(keys)}")
        return keys[call]

    def _versioned(self, topic: str, tensor: torch.Tensor) -> Versioned:
        if (topic, -1) in self._clone:
            return (tensor.detach().clone(), -1)
        return (tensor, tensor._version)

    def _learned_plan(self, topic: str, plan: Plan | None) -> Plan | None:
        """The capture plan with what earlier steps taught: whole tensors that something
        changes in place later in a step are copied, the others referenced; a module not seen
        yet is probed (copied and referenced once)."""
        if plan is None:
            return None
        key = (topic, plan, len(self._clone), len(self._probed))
        found = self._learned_plans.get(key)
        if found is None:
            found = tuple(_learned_mode(m, (topic, i) in self._clone, (topic, i) in self._probed)
                          for i, m in enumerate(plan))
            if len(self._learned_plans) > 64:
                self._learned_plans.clear()
            self._learned_plans[key] = found
        return found


def _learned_mode(mode: int, changes: bool, probed: bool) -> int:
    """Whole tensors: copied, referenced or probed; finiteness checks: reduced in the hook,
    batched or probed (from what earlier steps taught about the module's tensor: whether it
    ``changes`` in place later in a step, or was ``probed`` for that yet)."""
    if mode not in (_FULL, _REDUCE, _REDUCE_IF_LOSS):
        return mode
    if changes:
        return _CLONE if mode == _FULL else _REDUCE_NOW
    if probed:
        return mode
    return _PROBE if mode == _FULL else _REDUCE_PROBE


class Capture(_Payloads):
    """The forward topics of the watched modules (``activations``, ``layer_gradients``,
    ``inputs``) and the network topics of the step's first forward and loss call."""

    def __init__(self, modules: Sequence[ModuleInfo], report: Report,
                 watched: Sequence[nn.Module] = ()) -> None:
        self.modules = list(modules)
        self.tellers = TellingGradients(watched, lambda i: self.stash.reduction.mark_ready(i))
        self._passing = [passing(m) for m in watched]
        self._in_place = [finite_in_place(m) for m in watched]
        #: the latest watched module's output in the running forward, its module, call and
        #: version then
        self._last: tuple[torch.Tensor, int, int, int] | None = None
        #: the latest watched modules' outputs in the running forward, while layer gradients
        #: are captured
        self._recent = RecentOutputs()
        #: the bus's cost meter (:class:`ikkuna_core.cost.CostMeter`): what the hooks do
        #: beyond keeping a reference is Ikkuna's own time in the step
        self.meter: Any = None
        self._report = report
        self._call_keys: list[list[str]] = [[m.name] for m in self.modules]
        self.act_plan: Plan | None = None  # capture modes in this forward
        self.lgrad_plan: Plan | None = None
        self.in_plan: Plan | None = None
        self.stash = Stash(len(self.modules))
        self.wanted: frozenset[str] = frozenset()  # the open step's topics
        self._clone: set[tuple[str, int]] = set()  # (topic, module) changed in place before
        self._probed: set[tuple[str, int]] = set()  # (topic, module) known either way
        self._learned_plans: dict[Any, Plan] = {}
        self._budget = _MIN_UNREDUCED_BYTES  # unreduced bytes that make a reduction due
        #: a loss call was seen: forward checks can wait for it (``Mode.REDUCE_IF_LOSS``)
        self._loss_seen = False
        #: the plans as the bus gave them, read under torch.compile (by the op, eagerly): a
        #: compiled graph copies whole tensors anyway, and what the capture learns must not
        #: recompile it; the traced hook reads only which of them are set (``traced_wants``)
        self._compiled_plans: Plans = (None, None, None)
        self.traced_wants = (False, False, False)
        self.number = traced.register(self)  # how compiled graphs name this capture

    # ---------------------------------------------------------------- a step
    def begin(
        self, plans: tuple[Plan | None, Plan | None, Plan | None], args: tuple[Any, ...],
        kwargs: Any,
    ) -> None:
        """The step's first forward begins: capture per the plans (what the bus asks for,
        with what earlier steps taught) and ``input_data``."""
        self.act_plan = self._learned_plan("activations", plans[0])
        self.lgrad_plan = self._learned_plan("layer_gradients", plans[1])
        self.in_plan = self._learned_plan("inputs", plans[2])
        self._give(plans)
        self.stash = stash = Stash(len(self.modules), self.lgrad_plan)
        if "input_data" in self.wanted:
            data = first_tensor(args)
            if data is None and kwargs:
                data = first_tensor(kwargs)
            if data is not None:
                stash.network["input_data"] = self._versioned("input_data", data)

    def stop(self) -> None:
        """Capture nothing more (a later micro-batch, an eval forward, the step's end)."""
        self.act_plan = self.lgrad_plan = self.in_plan = None
        self._last = None
        self._recent.clear()
        self._give((None, None, None))

    def _give(self, plans: Plans) -> None:
        self._compiled_plans = plans
        self.traced_wants = (plans[0] is not None, plans[1] is not None, plans[2] is not None)

    @property
    def plans(self) -> tuple[Plans, Plans]:
        """The capture plans of the running forward, learned and as given (saved and
        restored around an evaluation)."""
        return ((self.act_plan, self.lgrad_plan, self.in_plan), self._compiled_plans)

    @plans.setter
    def plans(self, plans: tuple[Plans, Plans]) -> None:
        (self.act_plan, self.lgrad_plan, self.in_plan), given = plans
        self._give(given)

    def take(self) -> Stash:
        """The step's stash, forgotten here (what waits for its reduction reduced)."""
        stash, self.stash = self.stash, Stash(len(self.modules))
        stash.ungate()
        reduction = stash.reduction
        reduction.run(self._learn, final=True)
        if reduction.done:
            self._budget = max(_MIN_UNREDUCED_BYTES, reduction.done // _REDUCTION_SHARE)
        return stash

    def loss(self, args: Sequence[Any], kwargs: dict[str, Any], loss: Any) -> None:
        """The step's loss call: its output, target and value, as far as wanted."""
        wanted, network = self.wanted, self.stash.network
        output = args[0] if len(args) > 0 else kwargs.get("input")
        target = args[1] if len(args) > 1 else kwargs.get("target")
        for topic, value in (("network_output", output), ("input_labels", target),
                             ("loss", loss)):
            if topic in wanted and isinstance(value, torch.Tensor):
                network[topic] = self._versioned(topic, value)
        self._loss_seen = True
        self.stash.loss_seen(loss, self._learn)

    # ----------------------------------------------------------------- hooks
    def on_module_forward(self, index: int, module: nn.Module, args: Any, output: Any) -> None:
        """A watched module's forward hook, run eagerly (:meth:`on_traced_forward` is the one
        torch.compile traces). Runs for every watched module in every forward: keep it short:
        read the plan, stash a reference or copy a sample."""
        act, lgrad, inp = self.act_plan, self.lgrad_plan, self.in_plan
        if act is None and lgrad is None and inp is None:
            return
        if in_backward():
            # a forward inside a backward: activation checkpointing's recomputation
            self._on_recomputed(index, args, output)
            return
        out = output if isinstance(output, torch.Tensor) else first_tensor(output)
        x = None if inp is None or inp[index] == _SKIP else first_tensor(args)
        if out is None and x is None:
            return
        stash = self.stash
        call = stash.calls[index]
        stash.calls[index] = call + 1
        if x is not None and inp is not None:
            self._stash(stash, stash.inputs, "inputs", index, call, x, inp[index])
        if out is None:
            return
        last, self._last = self._last, (out, index, call, out._version)
        if index < len(self._passing) and self._passing[index]:
            arg = first_tensor(args) if x is None else x
            took = (arg is not None and last is not None
                    and self._took(stash, index, call, last, arg, out))
            # the latest outputs are kept (and looked through) only for layer gradients
            if not took and arg is not None and lgrad is not None:
                found = self._recent.producer_of(arg, out, self._in_place[index])
                if found is not None:
                    stash.borrow(index, call, *found)
        if lgrad is not None and out.grad_fn is not None:
            self._recent.add(out, index, call)
        if act is not None and act[index] != _SKIP:
            self._stash(stash, stash.acts, "activations", index, call, out, act[index])
        if lgrad is not None and lgrad[index] != _SKIP:
            if out.requires_grad:
                out.register_hook(
                    functools.partial(self._on_layer_gradient, stash.ref, index, call)
                )
            elif not torch.is_grad_enabled():
                arg = first_tensor(args) if x is None else x
                stash.pending.append((index, call, arg is not None and arg.requires_grad))

    def _took(self, stash: Stash, index: int, call: int,
              last: tuple[torch.Tensor, int, int, int], arg: torch.Tensor,
              out: torch.Tensor) -> bool:
        """A passing module's call took the previous watched module's output, unchanged
        since (but for an in-place activation's own change): its output gradient borrows that
        module's teller (or the one that module borrowed), and an in-place change of that
        output by a finite activation keeps the output's held finiteness check
        (:mod:`.implied`). Whether it did."""
        produced, producer, producer_call, version = last
        own = out is arg and self._in_place[index]  # an in-place activation's own change
        if arg is not produced or arg._version != version + own:
            return False
        stash.borrow(index, call, producer, producer_call)
        if own:
            stash.changed_finitely(out)
        return True

    def compiled_forward(self, index: int, output: torch.Tensor | None,
                         inputs: torch.Tensor | None) -> int:
        """A watched module's call in a compiled forward (the op ``ikkuna::module_forward``,
        eagerly); :meth:`Stash.traced_call`."""
        if in_backward():  # a checkpointed region recomputed in a compiled backward
            return self.stash.retraced_call(index)
        return self.stash.traced_call(self._compiled_plans, index, output, inputs)

    def _on_recomputed(self, index: int, args: Any, output: Any) -> None:
        """A watched module's forward recomputed in backward (activation checkpointing): no
        call, nothing stashed. Where the step's forward ran it under no_grad (reentrant
        checkpointing), the layer gradient of the call it repeats is hooked here."""
        stash = self.stash
        plan = stash.lgrad_plan
        if not stash.pending or plan is None or plan[index] == _SKIP:
            return
        out = output if isinstance(output, torch.Tensor) else first_tensor(output)
        if out is None or not out.requires_grad:
            return
        arg = first_tensor(args)
        call = stash.recomputed_call(index, arg is not None and arg.grad_fn is None)
        if call is not None:
            out.register_hook(functools.partial(self._on_layer_gradient, stash.ref, index, call))

    def _on_layer_gradient(
        self, ref: weakref.ref[Stash], index: int, call: int, grad: torch.Tensor
    ) -> None:
        stash = ref()
        if stash is None or stash is not self.stash or stash.lgrad_plan is None:
            return  # the backward of a forward whose step has ended
        with guard(self._report, f"the layer-gradient hook of {self.modules[index].name!r}"):
            if not stash.backward:  # the step's backward begins: the forward is done
                stash.backward = True
                stash.ungate()
                self._timed(stash.reduction.run, self._learn)
                _at_backward_end(functools.partial(self._backward_done, ref))
            self._stash(stash, stash.lgrads, "layer_gradients", index, call, grad,
                        stash.lgrad_plan[index])

    def _backward_done(self, ref: weakref.ref[Stash]) -> None:
        """The end of the step's backward: what waits for its reduction is reduced."""
        stash = ref()
        if stash is not None and stash is self.stash:
            with guard(self._report, "the reduction at the end of the backward"):
                self._timed(stash.reduction.run, self._learn, True)

    def _stash(self, stash: Stash, entries: list[Entry], topic: str, index: int, call: int,
               tensor: torch.Tensor, mode: int) -> None:
        """Stash a payload per its mode. One that only needs a finiteness check waits for
        the next reduction of the step, due once enough bytes wait, or at once, with all
        that waits, when it was seen changing in place later in a step (the first time it is
        reduced on its own, and its version checked at the next reduction). What runs
        kernels (a sample, a copy, a reduction) is timed (:meth:`_timed`)."""
        if mode > _REDUCE:  # a reference (no kernel, not timed), a sample or a copy
            entries.append(_capture(index, call, tensor, mode) if mode == _FULL
                           else self._timed(_capture, index, call, tensor, mode))
            return
        if type(tensor) not in (torch.Tensor, nn.Parameter) or tensor.layout != torch.strided:
            # a subclass (a DTensor) or a sparse tensor is the subscriber's to reduce: a copy
            entries.append(self._timed(_capture, index, call, tensor, _CLONE))
            return
        if not tensor.is_floating_point():
            return  # always finite
        if mode == _REDUCE_IF_LOSS:
            if self._loss_seen and tensor.device.type == "cpu" and not stash.backward:
                stash.gated.append((entries, topic, index, call, tensor, tensor._version))
                return
            mode = _REDUCE  # the loss is read on the host only where that costs nothing
        reduction = stash.reduction
        if reduction.bytes >= self._budget:
            self._timed(reduction.run, self._learn)
        value = reduction.known_value(tensor)
        if value is None and mode == _REDUCE_PROBE:
            with torch.no_grad():
                value = ops.finiteness([tensor])[0]
        # told by a parameter's gradient once that is accumulated, so held until then: one,
        # or no more bytes of them than of those waiting (a module called many times, a tied
        # weight: accumulated at the end of the backward)
        implied = (topic == "layer_gradients" and mode == _REDUCE and tensor.device.type == "cpu"
                   and (not reduction.unready_bytes
                        or reduction.unready() + _nbytes(tensor) <= self._budget))
        teller = None
        if implied:
            owner = stash.borrowed.get((index, call), index)
            param = self.tellers.of(owner, tensor.numel())
            teller = None if param is None else (owner, param)
        reduction.add(entries, topic, index, call, tensor, value, teller=teller)
        if mode == _REDUCE_NOW:
            self._timed(reduction.run, self._learn)

    def _timed(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, kernels of a hook (a sample, a copy, a reduction), on the cost
        meter's clock: Ikkuna's own time in the step
        (:meth:`ikkuna_core.cost.CostMeter.own`)."""
        meter = self.meter
        if meter is None:
            return fn(*args)
        started = meter.clock()
        try:
            return fn(*args)
        finally:
            meter.own(meter.clock() - started)

    def _learn(self, topic: str, index: int, changed: bool) -> None:
        self._probed.add((topic, index))
        if changed:
            self._clone.add((topic, index))

    def compiled_layer_gradient(self, index: int, call: int, grad: torch.Tensor) -> None:
        """A layer gradient from a compiled backward (the op ``ikkuna::layer_gradient``):
        stashed as a copy (or a sample), as the compiled graph may reuse its memory."""
        stash = self.stash
        plan = stash.lgrad_plan
        if plan is None or plan[index] == _SKIP:
            return  # the backward of a forward whose step has ended
        with guard(self._report, f"the layer-gradient hook of {self.modules[index].name!r}"):
            mode = plan[index]
            data = grad.detach()
            copy = ops.sample(data, mode) if mode > 0 else data.clone()
            stash.lgrads.append((index, call, copy, -1, None))

def _capture(index: int, call: int, tensor: torch.Tensor, mode: int) -> Entry:
    """A stash entry: a sample (a copy), a copy of a tensor seen changing in place before, a
    reference and its version, or, the first time, a copy and the original."""
    if mode > 0:
        with torch.no_grad():  # a sample without a graph, and no detach op per capture
            return (index, call, ops.sample(tensor, mode), -1, None)
    if mode == _FULL:
        return (index, call, tensor, tensor._version, None)
    copy = tensor.detach().clone()
    if mode == _PROBE:
        return (index, call, copy, tensor._version, tensor)
    # a copy: the tensor changes in place later in a step, or (compiled) the graph may reuse
    # its memory
    return (index, call, copy, -1, None)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _host_value(tensor: torch.Tensor) -> float:
    """A one-entry CPU tensor's value, read without a kernel (``item()`` dispatches one)."""
    value: Any = tensor.tolist()
    while isinstance(value, list):
        value = value[0]
    return float(value)


def _finite_on_host(loss: Any) -> bool:
    """Whether ``loss`` is a CPU tensor (read at no cost) whose entries are all finite."""
    if not isinstance(loss, torch.Tensor) or loss.device.type != "cpu":
        return False
    if loss.numel() == 1:
        return math.isfinite(_host_value(loss))
    with torch.no_grad():
        return bool(torch.isfinite(loss).all())


def _copied(mode: int) -> int:
    """A capture mode for a compiled graph's tensor: a sample, else a copy."""
    return mode if mode > 0 else _CLONE


def _at_backward_end(callback: Callable[[], None]) -> None:
    """Call ``callback`` when the running backward ends (as DDP does); where autograd's
    engine does not take one, the step's end reduces what waits."""
    engine = torch.autograd.Variable._execution_engine  # type: ignore[attr-defined]
    with contextlib.suppress(RuntimeError):
        engine.queue_callback(callback)
