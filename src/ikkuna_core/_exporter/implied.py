"""Layer gradients whose finiteness their module's bias or weight gradient already tells.

The bias gradient of a ``Linear``, a convolution or a normalisation layer is the sum of the
module's output gradient over every dimension but the channel: a NaN or inf entry of the
output gradient makes it non-finite (NaN and inf survive a sum; ``inf + -inf`` is NaN). So
where that bias gradient is finite, so is the output gradient, and a finiteness check of the
output gradient (``layer_gradients`` under ``Subscriber.finiteness_only``) need not read it:
on the CPU, the output gradient waits, like any tensor waiting for the next batched
reduction, until its bias gradient has been accumulated; the reduction then reads the bias
gradient instead (a few hundred entries where the output gradient has millions), and reads
the output gradient itself only if the bias gradient is not finite (a sum that overflowed
from finite entries is told apart there). Exact types only: a subclass may compute its
output (and so its bias gradient) otherwise.

Without such a bias (a convolution before a normalisation layer has none), the weight
gradient of a ``Linear`` or a convolution tells it as well: each of its entries is a sum of
products of output-gradient entries with input entries, and every output-gradient entry is
in some of them (each output position's window holds an input entry), so a NaN or inf there
makes it non-finite (``NaN * x`` is NaN, ``inf * 0`` NaN, ``inf * x`` inf). It is read instead
where it is at most half the size of the output gradient (early convolutions: a few
thousand entries where the output gradient has millions). A transposed convolution's is
not: with a stride above its kernel, some output positions are in no product.

An elementwise activation, a dropout or a pooling layer (:data:`PASSING`) that takes the
previous watched module's output borrows that module's teller: the activation's input
gradient is part of the previous module's output gradient, and a non-finite entry of its
output gradient reaches its input gradient (a product keeps NaN, ``inf * 0`` is NaN), except
where a ReLU-like backward puts a zero instead (a NaN there reaches no other gradient: it
is not reported). So does one that takes an output of one of the latest watched modules
unchanged (a ResNet block's ``Identity`` shortcut, whose output is the block's input), or a
sum one of whose terms is such an output (a residual connection, ``relu(bn2(h) + x)``): an
addition's backward hands its output gradient to each term as it is (scaled by ``alpha``,
summed over broadcast dimensions: a non-finite entry stays one), read from the autograd
graph (:class:`RecentOutputs`). Forward, an in-place activation that makes no non-finite
value of finite ones (:data:`FINITE_IN_PLACE`) changes the previous module's output only in
ways its finiteness check may ignore: the changed tensor is non-finite only where the
module's output was, so that output stays held and is checked only if the loss is not
finite, instead of being read in its hook at every step (a value the ReLU turned from -inf
to 0 reaches nothing: it is not reported).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["RecentOutputs", "TellingGradients", "finite_in_place", "passing", "summed_bias",
           "telling_weight"]

#: The modules whose bias gradient is the sum of their output gradient over all entries of
#: each channel.
SUMMED_BIAS: frozenset[type[nn.Module]] = frozenset({
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
    nn.ConvTranspose3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.GroupNorm,
})


def _cpu_parameter(module: nn.Module, name: str, types: frozenset[type[nn.Module]]
                   ) -> nn.Parameter | None:
    """``module.<name>`` if ``module`` is exactly one of ``types`` and it is a plain CPU
    parameter that requires grad (not a DTensor), else None."""
    param = getattr(module, name, None)
    if type(module) not in types or type(param) is not nn.Parameter:
        return None
    return param if param.requires_grad and param.device.type == "cpu" else None


def summed_bias(module: nn.Module) -> nn.Parameter | None:
    """``module``'s bias if its gradient is the sum of the output gradient (a plain CPU
    parameter that requires grad; not a DTensor), else None."""
    return _cpu_parameter(module, "bias", SUMMED_BIAS)


#: The modules whose weight gradient has every output-gradient entry in its products.
PRODUCT_WEIGHT: frozenset[type[nn.Module]] = frozenset({
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
})


def telling_weight(module: nn.Module) -> nn.Parameter | None:
    """``module``'s weight if its gradient tells the output gradient's finiteness (a plain
    CPU parameter that requires grad; not a DTensor), else None."""
    return _cpu_parameter(module, "weight", PRODUCT_WEIGHT)


#: Activations that may change their input in place and make no non-finite value of finite
#: ones (LeakyReLU and RReLU only with slopes of at most 1: no overflow).
FINITE_IN_PLACE: frozenset[type[nn.Module]] = frozenset({
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SiLU,
    nn.Hardsigmoid, nn.Hardswish, nn.Mish, nn.Threshold,
})
#: Modules whose backward passes every non-finite entry of their output gradient on to
#: their input gradient (or puts a zero there): they may borrow their producer's teller.
PASSING: frozenset[type[nn.Module]] = FINITE_IN_PLACE | frozenset({
    nn.GELU, nn.Sigmoid, nn.Tanh, nn.Softsign, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d,
    nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Flatten, nn.Identity,
})


def finite_in_place(module: nn.Module) -> bool:
    """Whether ``module`` is an activation of :data:`FINITE_IN_PLACE` (exact type)."""
    if type(module) not in FINITE_IN_PLACE:
        return False
    slopes = [getattr(module, name, 0.0) for name in ("negative_slope", "upper", "lower")]
    return all(isinstance(v, (int, float)) and abs(v) <= 1 for v in slopes)


def passing(module: nn.Module) -> bool:
    """Whether ``module`` may borrow its producer's teller (:data:`PASSING`, exact type)."""
    return type(module) in PASSING and (type(module) not in FINITE_IN_PLACE
                                        or finite_in_place(module))


class RecentOutputs:
    """The latest watched outputs of the running forward, by the autograd node that made
    each: what a passing module takes may be one of them, unchanged (an ``Identity``
    shortcut takes a block's input, the output of the module six before it), or a sum
    ``a + b`` (a residual connection) one of whose terms is one. The sum's gradient is its
    terms' gradient, so the passing module's output gradient borrows that output's
    module's teller."""

    #: how many are looked at
    SIZE = 8

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        #: (the output's id, its version then, the node that made it, its output number,
        #: module, call)
        self._entries: list[tuple[int, int, Any, int, int, int]] = []

    def clear(self) -> None:
        self._entries.clear()

    def add(self, out: torch.Tensor, index: int, call: int) -> None:
        entries = self._entries
        entries.append((id(out), out._version, out.grad_fn, out.output_nr, index, call))
        if len(entries) > self.SIZE:
            del entries[0]

    def producer_of(self, arg: torch.Tensor, out: torch.Tensor, in_place: bool
                    ) -> tuple[int, int] | None:
        """(module, call) whose output ``arg``, the input of a passing module's call that
        returned ``out``, is (unchanged), or is a term of (``arg`` made by an
        ``AddBackward0``; for a module that changes its input in place, ``in_place``, the
        node before the call's own op); None if neither. What something else changed in
        place in between (a ``copy_`` whose backward hands the old value no gradient) is
        not looked through."""
        node = arg.grad_fn
        if node is None:
            return None
        entries = self._entries
        ident, version, number = id(arg), arg._version, arg.output_nr
        for made_id, made_version, made, made_number, producer, producer_call in reversed(
                entries):
            if (made_id == ident and made is node and made_version == version
                    and made_number == number):
                return producer, producer_call
        if out is arg:  # the call's own op made ``arg`` last, or another one did
            if not in_place:
                return None
            node = node.next_functions[0][0] if node.next_functions else None
        if node is None or node.name() != "AddBackward0":
            return None
        for term, number in node.next_functions:
            for _, _, made, made_number, producer, producer_call in reversed(entries):
                if made is term and made_number == number:
                    return producer, producer_call
        return None


class TellingGradients:
    """The watched modules' parameters whose gradient tells their output gradient's
    finiteness (a summed bias, else a product weight), and a post-accumulate-grad hook on
    each that is used, installed the first time: it says (``on_ready(index)``) that the
    running backward has accumulated that module's gradient."""

    def __init__(self, modules: Sequence[nn.Module], on_ready: Callable[[int], None]) -> None:
        self._biases = [summed_bias(m) for m in modules]
        self._weights = [telling_weight(m) for m in modules]
        self._on_ready = on_ready
        self._handles: dict[int, RemovableHandle] = {}

    def of(self, index: int, numel: int) -> nn.Parameter | None:
        """The parameter of module ``index`` whose gradient tells the finiteness of an
        output gradient of ``numel`` entries (its own, or a passing module's that borrows
        it), its hook installed: the summed bias, else the weight if at most half that size;
        None if neither."""
        teller = self._biases[index] if index < len(self._biases) else None
        if teller is None and index < len(self._weights):
            weight = self._weights[index]
            teller = weight if weight is not None and 2 * weight.numel() <= numel else None
        if teller is not None and index not in self._handles:
            self._handles[index] = teller.register_post_accumulate_grad_hook(
                functools.partial(self._accumulated, index)
            )
        return teller

    def _accumulated(self, index: int, teller: torch.Tensor) -> None:
        self._on_ready(index)

    def remove(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
