"""Per-sample gradient statistics from a module's ``inputs`` and ``layer_gradients``, without
materialising per-sample gradients where that is avoidable.

For a ``Linear`` layer ``y = x W^T + b`` the gradient of sample ``n`` is ``g_n = Σ_t δ_nt x_nt^T``
(``δ`` the gradient of the batch loss w.r.t. the output, ``t`` the sequence positions, one for
a plain batch), so its squared norm is ``|δ_n|² |x_n|²`` (one position) or
``Σ_ts (δ_nt·δ_ns)(x_nt·x_ns)`` (Gram matrices, the "ghost norm"), its inner product with the
batch gradient ``G = Σ_n g_n`` is ``Σ_t δ_nt^T G x_nt``, and the per-element second moment
``Σ_n g_n²`` of a plain batch is ``(δ²)^T (x²)``. A ``Conv2d`` is the same with the unfolded
input (``x_nt`` one receptive field); transformers' ``Conv1D`` is a ``Linear`` with ``W``
transposed; a ``LayerNorm``'s per-sample gradients are small, ``(B, D)``, and computed as they
are. Where a layer needs its per-sample gradients (second moments of sequences and
convolutions, the 2-d histogram), they are formed a chunk of samples at a time.

Scale: ``g_n`` is the gradient of sample ``n``'s share of a mean-reduced batch loss (BackPACK's
``BatchGrad``, which Cockpit's formulas expect): with a sum-reduced loss every ``δ`` is divided
by the batch size first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SUPPORTED", "Layer", "StepStats", "per_sample_chunks", "prepare_layer", "projections",
    "unsupported_reason",
]

#: Module classes whose per-sample gradients are computed (by class name).
SUPPORTED = ("Linear", "Conv2d", "Conv1D", "LayerNorm")
#: Most per-sample gradient entries formed at once (chunks of samples beyond).
DENSE_BUDGET = 1 << 24


def unsupported_reason(module: nn.Module) -> str | None:
    """Why per-sample gradients of ``module``'s parameters cannot be computed here, or None."""
    kind = type(module).__name__
    if kind not in SUPPORTED:
        return (f"{kind} is not supported (per-sample gradients are computed for "
                f"{', '.join(SUPPORTED)})")
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"Conv2d with groups={module.groups} is not supported (groups=1 only)"
        if module.padding_mode != "zeros":
            return f"Conv2d with padding_mode={module.padding_mode!r} is not supported"
    return None


#: Conv2d layers with at least this many output positions form their per-sample gradients
#: with one grouped weight-gradient convolution (the batch as groups), fewer with
#: ``unfold`` and a batched matrix product (measured on a 2-core CPU: each wins on its side).
GROUPED_MIN_POSITIONS = 64


@dataclass
class Layer:
    """One module's step, as per-sample factors: ``x`` (B, T, Din) and ``d`` (B, T, Dout)
    (weight gradient of sample n: ``d_n^T x_n``, shaped like ``weight`` by ``from_factor``),
    or, for LayerNorm, the per-sample gradients themselves (``dense``: parameter -> (B, D)).
    A Conv2d's ``x`` (its unfolded input) is formed only when asked for."""

    name: str
    kind: str
    weight_shape: torch.Size
    has_bias: bool
    d: torch.Tensor | None = None
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    _x: torch.Tensor | None = None
    _conv: tuple[nn.Conv2d, list[tuple[torch.Tensor, torch.Tensor, Any]]] | None = None

    @property
    def x(self) -> torch.Tensor | None:
        if self._x is None and self._conv is not None:
            conv, calls = self._conv
            xs = [F.unfold(x, conv.kernel_size, conv.dilation, padding, conv.stride
                           ).transpose(1, 2) for x, _, padding in calls]  # (B, L, Cin*k*k)
            self._x = xs[0] if len(xs) == 1 else torch.cat(xs, 1)
        return self._x

    @property
    def batch(self) -> int:
        if self.d is not None:
            return self.d.shape[0]
        return next(iter(self.dense.values())).shape[0]

    def per_sample_weight(self, start: int, stop: int) -> torch.Tensor:
        """Samples ``start:stop``'s weight gradients, (n, Dout, Din)."""
        if self._conv is not None and self.d is not None and (
            self.d.shape[1] >= GROUPED_MIN_POSITIONS and self._x is None
        ):
            conv, calls = self._conv
            total = None
            for x, d, padding in calls:
                xs, ds = x[start:stop], d[start:stop]
                n, cin = xs.shape[:2]
                g = torch.nn.grad.conv2d_weight(
                    xs.reshape(1, n * cin, *xs.shape[2:]),
                    (n * ds.shape[1], cin, *conv.kernel_size),
                    ds.reshape(1, n * ds.shape[1], *ds.shape[2:]), conv.stride, padding,
                    conv.dilation, groups=n,
                ).reshape(n, ds.shape[1], -1)
                total = g if total is None else total + g
            assert total is not None
            return total
        x, d = self.x, self.d
        assert x is not None and d is not None
        return d[start:stop].transpose(1, 2) @ x[start:stop]

    def to_factor(self, weight_like: torch.Tensor) -> torch.Tensor:
        """A weight-shaped tensor (an update) as the (Dout, Din) matrix the factors use."""
        if self.kind == "Conv1D":
            return weight_like.t()
        return weight_like.reshape(weight_like.shape[0], -1)

    def from_factor(self, matrix: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_factor`, for per-sample (B, Dout, Din) or (Dout, Din)."""
        if self.kind == "Conv1D":
            return matrix.transpose(-1, -2)
        return matrix.reshape(*matrix.shape[:-2], *self.weight_shape)


def prepare_layer(
    name: str, module: nn.Module, inputs: list[torch.Tensor], grads: list[torch.Tensor],
    scale: float | None,
) -> Layer:
    """The per-sample factors of ``module`` from its calls' inputs and output gradients (a
    module called several times in a forward: its calls' positions are concatenated).
    ``scale`` multiplies the output gradients (None: 1/B, for a sum-reduced loss)."""
    kind = type(module).__name__
    weight = module.weight
    has_bias = getattr(module, "bias", None) is not None
    layer = Layer(name, kind, weight.shape, has_bias)
    batch = grads[0].shape[0]
    if scale is None:  # a sum-reduced loss: the mean loss's gradients are 1/B of these
        scale = 1.0 / batch
    if scale != 1.0:
        grads = [d * scale for d in grads]
    if kind == "LayerNorm":
        shape = module.normalized_shape
        dims = tuple(range(1, grads[0].dim() - len(shape)))
        gw = gb = None
        for x, d in zip(inputs, grads, strict=True):
            xhat = F.layer_norm(x, shape, None, None, module.eps)
            w_part = (d * xhat).sum(dims) if dims else d * xhat
            b_part = d.sum(dims) if dims else d
            gw = w_part if gw is None else gw + w_part
            gb = b_part if gb is None else gb + b_part
        assert gw is not None and gb is not None
        layer.dense["weight"] = gw.reshape(batch, -1)
        if has_bias:
            layer.dense["bias"] = gb.reshape(batch, -1)
        return layer
    ds = []
    if kind == "Conv2d":
        calls = []
        for x, d in zip(inputs, grads, strict=True):
            if isinstance(module.padding, str):  # "same"/"valid": padded as the conv pads
                x = F.pad(x, module._reversed_padding_repeated_twice)
                padding: Any = 0
            else:
                padding = module.padding
            calls.append((x, d, padding))
            ds.append(d.reshape(batch, d.shape[1], -1).transpose(1, 2))  # (B, L, Cout)
        layer._conv = (module, calls)  # type: ignore[assignment]
    else:  # Linear, Conv1D: (B, ..., D)
        xs = [x.reshape(batch, -1, x.shape[-1]) for x in inputs]
        layer._x = xs[0] if len(xs) == 1 else torch.cat(xs, 1)
        ds = [d.reshape(batch, -1, d.shape[-1]) for d in grads]
    layer.d = ds[0] if len(ds) == 1 else torch.cat(ds, 1)
    return layer


Directions = dict[tuple[str, str], torch.Tensor]


class StepStats:
    """The step's per-sample statistics over a set of layers, computed together and once:
    ``l2`` (B,) Σ over parameters of |g_n|², ``grads`` (the batch gradients G = Σ_n g_n),
    ``dot`` (B,) Σ <g_n, G>, ``sgs`` Σ_n g_n² per parameter, and for each of ``directions``
    (weight-shaped tensors by (layer, parameter)) ``proj`` (B,) Σ <g_n, u>."""

    def __init__(
        self, layers: list[Layer], *, need_sgs: bool = False,
        directions: tuple[Directions, ...] = (),
    ) -> None:
        self.batch = layers[0].batch
        for layer in layers:
            if layer.batch != self.batch:
                raise ValueError(
                    f"gradstats: layer {layer.name!r} saw a batch of {layer.batch} samples, "
                    f"{layers[0].name!r} one of {self.batch}: per-sample statistics need one "
                    "batch dimension (dim 0) throughout"
                )
        self.grads: dict[tuple[str, str], torch.Tensor] = {}
        self.sgs: dict[tuple[str, str], torch.Tensor] = {}
        l2: list[torch.Tensor] = []
        dot: list[torch.Tensor] = []
        proj: list[list[torch.Tensor]] = [[] for _ in directions]
        for layer in layers:
            self._layer(layer, need_sgs, directions, l2, dot, proj)
        self.l2 = torch.stack(l2).sum(0)
        self.dot = torch.stack(dot).sum(0)
        self.proj = [_total(p, self.l2) for p in proj]

    def _layer(
        self,
        layer: Layer,
        need_sgs: bool,
        directions: tuple[Directions, ...],
        l2: list[torch.Tensor],
        dot: list[torch.Tensor],
        proj: list[list[torch.Tensor]],
    ) -> None:
        name = layer.name
        for pname, g in layer.dense.items():  # LayerNorm: per-sample gradients, (B, D)
            total = g.sum(0)
            self.grads[(name, pname)] = total
            l2.append(g.square().sum(1))
            dot.append(g @ total)
            if need_sgs:
                self.sgs[(name, pname)] = g.square().sum(0)
            for out, found in zip(proj, directions, strict=True):
                u = found.get((name, pname))
                if u is not None:
                    out.append(g @ u.reshape(-1).to(g.dtype))
        d = layer.d
        if d is None:
            return
        b, t, dout = d.shape
        din = layer.weight_shape.numel() // dout
        us = [found.get((name, "weight")) for found in directions]
        ufs = [None if u is None else layer.to_factor(u).to(d.dtype) for u in us]
        # dense per-sample gradients cost B·T·Din·Dout; Gram matrices B·T²·(Din+Dout)
        dense = t > 1 and (need_sgs or t * (din + dout) > din * dout)
        chunk = max(1, DENSE_BUDGET // max(1, din * dout))
        if dense and chunk >= b:  # all per-sample gradients at once: G is their sum
            g = layer.per_sample_weight(0, b)  # (B, Dout, Din)
            gw = g.sum(0)
            flat = g.reshape(b, -1)
            l2.append(flat.square().sum(1))
            dot.append(flat @ gw.reshape(-1))
            for out, uf in zip(proj, ufs, strict=True):
                if uf is not None:
                    out.append(flat @ uf.reshape(-1))
            if need_sgs:
                self.sgs[(name, "weight")] = layer.from_factor(g.square().sum(0))
            del g, flat
        else:
            x = layer.x
            assert x is not None
            gw = d.reshape(b * t, dout).t() @ x.reshape(b * t, din)  # (Dout, Din) = Σ_n g_n
        self.grads[(name, "weight")] = layer.from_factor(gw)
        if t == 1:
            x = layer.x
            assert x is not None
            x2, d2 = x[:, 0], d[:, 0]
            l2.append(x2.square().sum(1) * d2.square().sum(1))
            dot.append(((x2 @ gw.t()) * d2).sum(1))
            for out, uf in zip(proj, ufs, strict=True):
                if uf is not None:
                    out.append(((x2 @ uf.t()) * d2).sum(1))
            if need_sgs:
                self.sgs[(name, "weight")] = layer.from_factor(d2.square().t() @ x2.square())
        elif dense and chunk < b:  # a chunk of samples at a time
            parts: list[list[torch.Tensor]] = [[] for _ in range(2 + len(ufs))]
            sgs = torch.zeros_like(gw) if need_sgs else None
            for start in range(0, b, chunk):
                g = layer.per_sample_weight(start, start + chunk)
                flat = g.reshape(g.shape[0], -1)
                parts[0].append(flat.square().sum(1))
                parts[1].append(flat @ gw.reshape(-1))
                for i, uf in enumerate(ufs):
                    if uf is not None:
                        parts[2 + i].append(flat @ uf.reshape(-1))
                if sgs is not None:
                    sgs += g.square().sum(0)
            l2.append(torch.cat(parts[0]))
            dot.append(torch.cat(parts[1]))
            for out, found in zip(proj, parts[2:], strict=True):
                if found:
                    out.append(torch.cat(found))
            if sgs is not None:
                self.sgs[(name, "weight")] = layer.from_factor(sgs)
        elif not dense:  # Gram matrices of the sequence positions
            x = layer.x
            assert x is not None
            gram_x = x @ x.transpose(1, 2)  # (B, T, T)
            gram_d = d @ d.transpose(1, 2)
            l2.append((gram_x * gram_d).sum((1, 2)))
            dot.append(((x @ gw.t()) * d).sum((1, 2)))
            for out, uf in zip(proj, ufs, strict=True):
                if uf is not None:
                    out.append(((x @ uf.t()) * d).sum((1, 2)))
        if layer.has_bias:
            gb_n = d.sum(1)  # (B, Dout)
            gb = gb_n.sum(0)
            self.grads[(name, "bias")] = gb
            l2.append(gb_n.square().sum(1))
            dot.append(gb_n @ gb)
            if need_sgs:
                self.sgs[(name, "bias")] = gb_n.square().sum(0)
            for out, found in zip(proj, directions, strict=True):
                ub = found.get((name, "bias"))
                if ub is not None:
                    out.append(gb_n @ ub.reshape(-1).to(gb_n.dtype))


def _total(parts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if not parts:
        raise ValueError("gradstats: a direction covers no parameter of the covered layers")
    return torch.stack(parts).sum(0).to(like.dtype)


def per_sample_chunks(layer: Layer, param: str) -> Any:
    """The per-sample gradients of one parameter, (chunk, *shape), a chunk of samples at a
    time (for the 2-d histogram, which needs every entry)."""
    if param in layer.dense:
        yield layer.dense[param]
        return
    d = layer.d
    assert d is not None
    if param == "bias":
        yield d.sum(1)
        return
    chunk = max(1, DENSE_BUDGET // layer.weight_shape.numel())
    for start in range(0, d.shape[0], chunk):
        yield layer.from_factor(layer.per_sample_weight(start, start + chunk))



def projections(layers: list[Layer], directions: Directions) -> torch.Tensor:
    """(B,) Σ over the layers' parameters of <g_n, u> for weight-shaped directions ``u``
    (layer name, parameter) -> tensor; parameters without a direction count zero."""
    out: list[torch.Tensor] = []
    for layer in layers:
        name = layer.name
        for pname, g in layer.dense.items():
            u = directions.get((name, pname))
            if u is not None:
                out.append(g @ u.reshape(-1).to(g.dtype))
        if layer.x is None or layer.d is None:
            continue
        x, d = layer.x, layer.d
        u = directions.get((name, "weight"))
        if u is not None:
            out.append(((x @ layer.to_factor(u).to(x.dtype).t()) * d).sum((1, 2)))
        ub = directions.get((name, "bias"))
        if ub is not None and layer.has_bias:
            out.append(d.sum(1) @ ub.reshape(-1).to(d.dtype))
    if not out:
        raise ValueError("gradstats: no direction for any covered parameter")
    return torch.stack(out).sum(0)
