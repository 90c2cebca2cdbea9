"""One round of a sharded step's merge (see :mod:`.shards`), agreed by every rank even when a
merging subscriber failed on some of them.

A round's first collective carries, besides its partials, a header: each rank's number of
values of each kind (sums; maxima and negated minima) and a flag per subscription that
failed on the rank since the last round. Every rank reads the same header, so every rank
drops a failed subscriber's partials and disables it (the round is then done again without
them), and every rank takes the same decisions about the next collectives: a rank where a
subscriber failed before its partial has fewer values than the others, so the first
collective's size cannot be the rank's own: it is agreed from the same round of the last
step of the same subscriptions (``layout``: which kind comes first, how many values it had;
at the first such step, sums first and room for :data:`FIRST_CAPACITY` values, a second
collective only where more came). In the steady state a round issues one collective per
kind present, as without the header. At that first step no rank knows whether the others
merge again after a round (a callback may submit more), so each settle of the step ends with
a closing round of no values that every rank takes part in (:meth:`.shards.Merges.settle`):
it tells a failure the other ranks would otherwise wait on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..ops import constant

__all__ = ["FIRST_CAPACITY", "Layout", "merge_round"]

#: values a round's first collective has room for at the first step of its subscriptions
FIRST_CAPACITY = 1024
#: (the kind of a round's first collective, its number of values), agreed by every rank
Layout = tuple[str, int]
_KINDS = {"sum": ("sum",), "max": ("max", "min")}


def _flat(p: Any) -> torch.Tensor:
    rows = p.partial if len(p.rows) == p.partial.shape[0] else p.partial[
        constant(p.rows, torch.long, p.partial.device)]
    rows = rows.reshape(-1).double()
    return -rows if p.op == "min" else rows


def _device(group: Any) -> torch.device:
    import torch.distributed as dist

    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def merge_round(
    entries: Sequence[Any], group: Any, failed: Sequence[int], slots: int,
    layout: Layout | None,
) -> tuple[list[int], Layout | None]:
    """All-reduce ``entries``' shard rows over ``group`` (each entry's ``merged`` set) with
    the header of the subscriptions that ``failed`` here (indices below ``slots``). Returns
    the subscriptions that failed on some rank (then nothing is merged: the round is to be
    done again without them) and the layout of this round for its next time."""
    import torch.distributed as dist

    world, me = dist.get_world_size(group), dist.get_rank(group)
    data: dict[str, list[torch.Tensor]] = {
        kind: [_flat(p) for p in entries if p.op in ops] for kind, ops in _KINDS.items()}
    need = {kind: sum(t.numel() for t in parts) for kind, parts in data.items()}
    first, capacity = layout or ("sum", FIRST_CAPACITY)
    second = "max" if first == "sum" else "sum"
    device = entries[0].partial.device if entries else _device(group)
    head = torch.zeros(2 * world + slots, dtype=torch.float64)
    head[me], head[world + me] = need[first], need[second]
    for i in failed:
        head[2 * world + i] = 1
    body = torch.zeros(capacity, dtype=torch.float64, device=device)
    n = min(capacity, need[first])
    if n:
        body[:n] = torch.cat(data[first])[:n]
    buffer = torch.cat([head.to(device), body])
    dist.all_reduce(buffer, op=_op(first), group=group)
    told = buffer[:2 * world + slots].tolist()
    agreed = [i for i, flag in enumerate(told[2 * world:]) if flag > 0]
    if agreed:
        return agreed, layout
    for kind, needs, got in ((first, told[:world], buffer[2 * world + slots:]),
                             (second, told[world:2 * world], None)):
        most = int(max(needs))
        if int(min(needs)) != most:
            raise RuntimeError(
                "ikkuna: the ranks merged partial statistics of different sizes "
                f"({[int(v) for v in needs]} values): a merging subscriber must merge the "
                "same partials on every rank")
        if not most:
            continue
        if got is None or most > capacity:
            got = torch.cat(data[kind]) if len(data[kind]) > 1 else data[kind][0].clone()
            dist.all_reduce(got, op=_op(kind), group=group)
        _scatter([p for p in entries if p.op in _KINDS[kind]], data[kind], got[:most])
    kind = "sum" if need["sum"] else "max"
    return [], (kind, need[kind])


def _op(kind: str) -> Any:
    import torch.distributed as dist

    return dist.ReduceOp.SUM if kind == "sum" else dist.ReduceOp.MAX


def _scatter(entries: Sequence[Any], parts: Sequence[torch.Tensor], merged: torch.Tensor
             ) -> None:
    """Each entry's share of ``merged`` back in its partial's shape (``merged`` rows)."""
    for p, part in zip(entries, merged.split([t.numel() for t in parts]), strict=True):
        if p.op == "min":
            part = -part
        if len(p.rows) == p.partial.shape[0]:
            p.merged = part.view(p.partial.shape).to(p.partial.dtype)
        else:
            out = p.partial.clone()
            index = constant(p.rows, torch.long, out.device)
            out[index] = part.view(len(p.rows), *p.partial.shape[1:]).to(out.dtype)
            p.merged = out
