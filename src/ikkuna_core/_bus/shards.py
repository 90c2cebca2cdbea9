"""Payloads of sharded tensors (DTensors: FSDP2's ``fully_shard``, tensor parallelism) and
the merge of the statistics computed on them.

A step whose payloads hold DTensors is seen two ways. A subscriber whose ``sharded`` is
``"merge"`` receives each rank's local shard and merges its partial statistics with
:meth:`~ikkuna_core.Subscriber.merge_shards`; every such partial of a step (all subscribers,
all topics) travels in one all-reduce per kind of reduction (sums; maxima, minima as negated
maxima) and round (a histogram agrees on its edges first). A subscriber whose ``sharded`` is
``"gather"`` (the default: correct whatever it computes) receives full tensors, all-gathered
once per topic at the steps such a subscriber is due. Every rank runs the same subscribers at
the same steps, so the collectives come in the same order on every rank; a merging
subscriber that fails on some rank is disabled on every rank, agreed in the step's next
round (see :mod:`.agreed`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..messages import TopicPayloads
from .agreed import Layout, merge_round
from .ddp import DDPShare

__all__ = ["FailedOnAnotherRank", "Merges", "ShardedStep", "is_dtensor", "local_view", "merges"]

#: How partial statistics of shards combine.
Reduction = Literal["sum", "max", "min"]
REDUCTIONS: tuple[str, ...] = ("sum", "max", "min")


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (none can exist before
    that module is imported, so this never imports it)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def _shard_group(tensor: Any) -> Any | None:
    """The process group over which ``tensor`` (a DTensor) is split into disjoint local
    shards: its mesh's, when the mesh is 1-d and the placement a ``Shard``; None otherwise
    (replicated, a pending sum, a mesh of more dimensions)."""
    from torch.distributed.tensor import Shard

    mesh = tensor.device_mesh
    if mesh.ndim != 1 or not isinstance(tensor.placements[0], Shard):
        return None
    return mesh.get_group()


def _same_ranks(group: Any, other: Any) -> bool:
    """Whether two process groups join the same ranks in the same order (two meshes over
    the same ranks may have distinct groups; their shards merge alike)."""
    if group is other:
        return True
    import torch.distributed as dist

    return bool(dist.get_process_group_ranks(group) == dist.get_process_group_ranks(other))


def _is_replicated(tensor: Any) -> bool:
    from torch.distributed.tensor import Replicate

    return all(isinstance(p, Replicate) for p in tensor.placements)


def local_view(payloads: dict[str, TopicPayloads]) -> ShardedStep:
    """The step's payloads with every DTensor as this rank's local tensor, and which rows are
    shards to merge. The shards of one process group are merged (that of the first sharded
    tensor, in sorted topic order); a DTensor laid out otherwise (a pending sum, a 2-d mesh, a
    second group) is replaced by its full tensor, so its statistics need no merge."""
    group: Any | None = None
    local: dict[str, TopicPayloads] = {}
    sharded: dict[str, frozenset[str | None]] = {}
    with torch.no_grad():
        for topic in sorted(payloads):
            found = payloads[topic]
            if not any(is_dtensor(t) for t in found.data):
                local[topic] = found
                continue
            data: list[torch.Tensor | None] = []
            keys: set[str | None] = set()
            for key, t in zip(found.keys, found.data, strict=True):
                if not is_dtensor(t):
                    data.append(t)
                    continue
                assert t is not None
                mine = _shard_group(t)
                if mine is not None and group is None:
                    group = mine
                if mine is not None and _same_ranks(mine, group):
                    data.append(t.to_local())  # type: ignore[attr-defined]
                    keys.add(key)
                elif _is_replicated(t):
                    data.append(t.to_local())  # type: ignore[attr-defined]
                else:
                    data.append(t.full_tensor())  # type: ignore[attr-defined]
            local[topic] = TopicPayloads(topic=topic, keys=found.keys, modules=found.modules,
                                         data=data)
            if keys:
                sharded[topic] = frozenset(keys)
    return ShardedStep(payloads, local, sharded, group)


class ShardedStep:
    """One step's payloads seen as local shards (``local``; ``sharded[topic]``: the keys whose
    payload is a shard of ``group``) and, on demand, as full tensors (:meth:`full`)."""

    def __init__(
        self, raw: dict[str, TopicPayloads], local: dict[str, TopicPayloads],
        sharded: dict[str, frozenset[str | None]], group: Any | None,
    ) -> None:
        self.raw, self.local, self.sharded, self.group = raw, local, sharded, group
        self._full: dict[str, TopicPayloads] = {}

    def full(self, topic: str) -> TopicPayloads:
        """The payloads of ``topic`` with every DTensor gathered (one all-gather each, the
        first time a topic is asked for in the step: a collective, asked for in the same
        order on every rank)."""
        found = self._full.get(topic)
        if found is None:
            raw = self.raw[topic]
            with torch.no_grad():
                found = TopicPayloads(
                    topic=topic, keys=raw.keys, modules=raw.modules,
                    data=[t.full_tensor() if is_dtensor(t) else t  # type: ignore[union-attr]
                          for t in raw.data],
                )
            self._full[topic] = found
        return found

    def rows(self, payloads: Sequence[TopicPayloads]) -> list[int]:
        """Indices, in the concatenation of ``payloads``' rows, of those that are shards."""
        out: list[int] = []
        offset = 0
        for p in payloads:
            keys = self.sharded.get(p.topic)
            if keys:
                out.extend(offset + i for i, k in enumerate(p.keys) if k in keys)
            offset += len(p.keys)
        return out


@dataclass(eq=False)
class _Pending:
    owner: Any
    partial: torch.Tensor
    rows: list[int]
    op: str
    then: Callable[[torch.Tensor], None]
    merged: torch.Tensor | None = None


class FailedOnAnotherRank(Exception):
    """A merging subscriber failed on another rank: it is disabled here too."""


def merges(subscriber: Any) -> bool:
    """Whether ``subscriber`` merges statistics of local shards (``sharded = "merge"``)."""
    return getattr(subscriber, "sharded", "gather") == "merge"


class Merges:
    """A bus's view of the step it delivers when the payloads are sharded (``view``), and the
    partial statistics waiting for the step's all-reduce, in the order they came."""

    def __init__(self) -> None:
        self.view: ShardedStep | None = None
        self.pending: list[_Pending] = []
        #: under DDP: the parameter topics' work shared between the ranks (see :mod:`.ddp`)
        self.ddp: DDPShare | None = None
        #: merging subscriptions (registration index) that failed here, not yet told to the
        #: other ranks -> whether one stands in for partials the others merge in this step
        self.failed: dict[int, bool] = {}
        self._everyone: Sequence[Any] = ()
        self._subs: tuple[int, ...] = ()  # the step's merging subscriptions, the same everywhere
        self._round = 0
        self._layouts: dict[tuple[tuple[int, ...], int], Layout] = {}
        self._rounds: dict[tuple[int, ...], int] = {}  # rounds a step of those subscriptions had

    def begin(
        self, payloads: dict[str, TopicPayloads], active: Sequence[Any] = (), step: int = 0,
        everyone: Sequence[Any] = (),
    ) -> dict[str, TopicPayloads]:
        """A step's delivery to ``active`` begins: the payloads subscribers choose from,
        DTensors seen as this rank's local tensors (no DTensor exists before torch's module
        of them is imported: no search at all in a run without one); under DDP with
        ``ddp_forward = "merge"``, the forward topics seen as shards of the global batch."""
        self.pending.clear()
        sharded = "torch.distributed.tensor" in sys.modules and any(
            is_dtensor(t) for p in payloads.values() for t in p.data)
        self.view = local_view(payloads) if sharded else None
        if self.ddp is not None:
            self.ddp.begin(payloads, active)
            batch = self.ddp.forward_shards(payloads) if self.view is None else {}
            if batch:
                self.view = ShardedStep(payloads, dict(payloads), batch, self.ddp.group)
        self._everyone, self._round, self._subs = everyone, 0, ()
        if self.view is not None:
            index = {id(s): i for i, s in enumerate(everyone)}
            # a failure not yet told stands in for the partials its subscriber, due, merges
            # on the other ranks (where it is still enabled, so among their active ones)
            due = {i for i in self.failed
                   if i < len(everyone) and step % everyone[i].subsample == 0}
            for i in due:
                self.failed[i] = self._stands_in(everyone[i])
            self._subs = tuple(sorted(
                {index[id(s)] for s in active if merges(s.subscriber)} | due))
        return dict(payloads if self.view is None else self.view.local)

    def _index(self, sub: Any) -> int | None:
        """``sub``'s registration index (the same on every rank)."""
        return next((i for i, s in enumerate(self._everyone) if s is sub), None)

    def _stands_in(self, sub: Any) -> bool:
        view = self.view
        return view is not None and any(t in view.sharded for t in sub.topics)

    def fail(self, sub: Any) -> None:
        """The subscription ``sub`` failed here (in its ``compute_step``): its partials are
        forgotten and, if it merges, its failure told to the other ranks in the next round
        (of this step if it would have merged in it)."""
        self.drop(sub.subscriber)
        index = self._index(sub) if merges(sub.subscriber) else None
        if index is not None:
            self.failed[index] = self._stands_in(sub)

    def end(self, payloads: dict[str, TopicPayloads], put: Callable[[Any], None]) -> None:
        """The step's delivery ends: under DDP the shared results exchanged and ``put``."""
        if self.ddp is not None:
            self.ddp.end(payloads, put)
        if self.view is not None and self._subs:
            self._rounds[self._subs] = self._round
        for i in self.failed:  # told in a later step's round
            self.failed[i] = False
        self.view = None
        self.pending.clear()

    def source(self, sub: Any, available: dict[str, TopicPayloads]) -> dict[str, TopicPayloads]:
        """What the subscription ``sub`` chooses its topics' payloads from: the local shards
        if its subscriber merges, else the full tensors of its sharded topics (gathered on
        first demand); under DDP, this rank's share of the keys when it shares its work."""
        subscriber, topics = sub.subscriber, sub.topics
        if self.ddp is not None and self.ddp.takes(sub):
            return self.ddp.select(sub, available)
        view = self.view
        if view is None or not view.sharded or merges(subscriber):
            return available
        return {**available, **{t: view.full(t) for t in topics
                                if t in view.sharded and t in available}}

    def hold(self, sub: Any, messages: list[Any]) -> bool:
        """Whether ``sub``'s results wait for the DDP exchange (:meth:`end` puts them)."""
        return self.ddp is not None and self.ddp.hold(sub, messages)

    def submit(
        self, owner: Any, step: Any, partial: torch.Tensor,
        then: Callable[[torch.Tensor], None], topics: Sequence[str], op: str,
    ) -> None:
        """See :meth:`ikkuna_core.Subscriber.merge_shards`."""
        parts = [step[t] for t in topics]
        rows = sum(len(p) for p in parts)
        if partial.dim() == 0 or partial.shape[0] != rows:
            raise ValueError(
                f"subscriber {owner.name!r}: merge_shards needs one row per payload of "
                f"{list(topics)} ({rows}), got a tensor of shape {tuple(partial.shape)}"
            )
        index = self.view.rows(parts) if self.view is not None and merges(owner) else []
        if not index:
            then(partial)
            return
        self.add(owner, partial, index, op, then)

    def settle_points(self, active: Sequence[Any], everyone: Sequence[Any], step: int
                      ) -> Sequence[Any]:
        """The subscriptions a step's delivery settles before (:meth:`settle` with
        ``before``): those due, ``active``; at the first step of a set of merging
        subscriptions, where each settle ends with a closing round, every subscription due
        by its cadence, disabled here or not (a subscriber that does not merge may have
        failed on one rank only), so that every rank settles as often."""
        if self.view is None or not self._subs or self._subs in self._rounds:
            return active
        return tuple(s for s in everyone if step % s.subsample == 0)

    def settle(
        self, held: dict[Any, object], results: Any,
        finish: Callable[[Any, Exception | None], None], before: Any | None = None,
    ) -> None:
        """Merge the ``held`` subscriptions' partials across the shards' ranks (one all-reduce
        per reduction and round), hand each its merged values with its results reopened
        (``results.resume``), then ``finish(sub, None)`` once nothing of it waits any more,
        or ``finish(sub, exc)`` when it failed (:class:`FailedOnAnotherRank`: on another
        rank). With ``before`` (a subscription about to run), only if it reads what one of
        them publishes."""
        # the first step of these subscriptions: their rounds are not known yet, so a rank
        # cannot tell whether the others merge again; each settle ends with a closing round
        # every rank takes part in (which tells a failure the others would wait on)
        probe = self.view is not None and bool(self._subs) and self._subs not in self._rounds
        if before is not None and not (self._feeds(before) if probe
                                       else self._reads(before, held)):
            return
        while True:
            closing = not (self.pending or any(self.failed.values()))
            if closing and not probe:
                break
            assert self.view is not None
            taken, self.pending = self.pending, []
            key = (self._subs, self._round)
            if not closing:
                self._round += 1
            told, layout = merge_round(taken, self.view.group, list(self.failed),
                                       len(self._everyone), self._layouts.get(key))
            if closing and not told:
                break
            if told:  # a subscriber failed on some rank: the round again without it
                self._round -= not closing  # (counted once it is done)
                self.failed.clear()
                gone = [self._everyone[i] for i in told]
                self.pending = [p for p in taken if not any(p.owner is g.subscriber for g in gone)]
                for sub in gone:
                    if sub in held:
                        results.resume(held.pop(sub))
                    finish(sub, FailedOnAnotherRank())
                continue
            if layout is not None:
                self._layouts[key] = layout
            self._merged(taken, held, results, finish)

    def _merged(
        self, entries: list[_Pending], held: dict[Any, object], results: Any,
        finish: Callable[[Any, Exception | None], None],
    ) -> None:
        for sub in [s for s in list(held) if any(e.owner is s.subscriber for e in entries)]:
            results.resume(held.pop(sub))
            try:
                for entry in entries:
                    if entry.owner is sub.subscriber:
                        assert entry.merged is not None
                        entry.then(entry.merged)
            except Exception as exc:  # noqa: BLE001 - the bus's error policy decides
                self.drop(sub.subscriber)
                index = self._index(sub)
                if index is not None:  # told in the next round: this step's if it has one
                    rounds = self._rounds.get(self._subs)
                    self.failed[index] = rounds is None or rounds > self._round
                finish(sub, exc)
                continue
            if self.waiting(sub.subscriber):
                held[sub] = results.hold()
            else:
                finish(sub, None)

    def _feeds(self, before: Any) -> bool:
        """Whether ``before`` reads what a merging subscription of the step registered
        before it publishes (the same on every rank, whatever failed where)."""
        at = self._index(before)
        at = len(self._everyone) if at is None else at
        return any(t in before.topics for i in self._subs if i < at
                   for t in self._everyone[i].subscriber.output_topics())

    def _reads(self, before: Any, held: dict[Any, object]) -> bool:
        """Whether ``before`` reads what a held subscription publishes (or a failure that
        stands in for one held on the other ranks, registered before it)."""
        owners = [h.subscriber for h in held]
        if any(self.failed.values()):
            at = self._index(before)
            at = len(self._everyone) if at is None else at
            owners += [self._everyone[i].subscriber for i, live in self.failed.items()
                       if live and i < at]
        return any(t in before.topics for o in owners for t in o.output_topics())

    def add(
        self, owner: Any, partial: torch.Tensor, rows: list[int], op: str,
        then: Callable[[torch.Tensor], None],
    ) -> None:
        if op not in REDUCTIONS:
            raise ValueError(f"op must be one of {', '.join(REDUCTIONS)}, got {op!r}")
        self.pending.append(_Pending(owner, partial, rows, op, then))

    def waiting(self, owner: Any) -> bool:
        """Whether a partial of ``owner`` waits for the next all-reduce."""
        return any(p.owner is owner for p in self.pending)

    def drop(self, owner: Any) -> None:
        """Forget ``owner``'s partials (it failed)."""
        self.pending = [p for p in self.pending if p.owner is not owner]
