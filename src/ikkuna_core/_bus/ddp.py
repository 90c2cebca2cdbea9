"""DDP: share the parameter topics' metric work between the ranks.

Under DistributedDataParallel the parameters, their (all-reduced) gradients and their updates
are identical on every rank, so each rank computes only its share of the sharing
subscriptions' results, and one ``all_gather`` per step (all results packed into one float64
tensor) hands every rank every result: what is published is what one rank computing
everything publishes (float64 holds each float32, int64 count and float64 value exactly).

The share, the same on every rank: at a subscription's first step every rank computes it
whole (its results are then every rank's, nothing is exchanged) and counts its work (aten
ops, and the elements they read, :data:`_ELEMENTS_PER_OP` to an op: deterministic, unlike a
clock on a busy machine); the step's exchange carries the counts, and each subscription is
placed (:meth:`DDPShare._place`, from the most any rank counted): computed whole by one
rank, largest first to the least loaded rank, where that keeps the rank within
``WHOLE_SLACK`` of an even split of the work placed; its keys split between the ranks
(balanced by numel) only where it does not fit. A subscriber batches over keys (one foreach
op for all of them), so splitting its keys halves the elements it reads but not its ops;
placing it whole halves both when several subscriptions share. A subscription keeps its
place for the run, and every rank has seen all of its keys once: a subscriber's state per
key (the spectral norm's power-iteration vectors) is on each rank that computes that key
later.

The forward topics differ per rank (each its own batch). By default their statistics are
each rank's own (said once); with ``ddp_forward = "merge"`` each rank's payloads are seen as
shards of the global batch, and the subscribers that merge shards (``sharded = "merge"``:
norms, moments, histograms) publish statistics of the global batch, as under FSDP2."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..messages import HistogramsMessage, ScalarsMessage, TopicPayloads
from .results import tags

__all__ = ["FORWARD_TOPICS", "PARAMETER_TOPICS", "WHOLE_SLACK", "DDPShare", "partition"]

#: Topics identical on every DDP rank.
PARAMETER_TOPICS = frozenset({
    "weights", "weight_gradients", "weight_updates", "biases", "bias_gradients", "bias_updates",
})
#: Topics of each rank's own batch under DDP.
FORWARD_TOPICS = frozenset({"activations", "layer_gradients", "inputs", "outputs", "labels",
                            "loss"})
_FORWARD_RANK = (
    "ikkuna: under DDP the forward topics (activations, layer_gradients, inputs, outputs, "
    "labels) differ per rank: their statistics are each rank's own batch (rank 0's in what "
    "rank 0 writes); ddp_forward = \"merge\" publishes those of the global batch"
)
_HIST_FIELDS = ("counts", "edges", "min", "max", "num", "sum", "sum_squares", "nonfinite")
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
           torch.int32, torch.bool)
Message = ScalarsMessage | HistogramsMessage


#: A rank may take up to this many times its even share of the shared work so that a
#: subscription is computed whole (one call, on one rank) instead of split (one on each).
WHOLE_SLACK = 1.25
#: The elements read that count as much work as one aten op, per device type (a
#: subscription's measured work is its ops plus its elements in these units): on the CPU an
#: op's dispatch costs about as much as reading a few thousand elements, on a GPU the host's
#: launch as reading about a million.
_ELEMENTS_PER_OP = {"cpu": 4096.0, "cuda": float(1 << 20)}
#: Floats a rank's part of the exchange holds before any result is packed: room for a
#: step's header (failures, work counted), so that the first exchanges need no resize.
_HEAD = 256


def partition(numels: Sequence[int], world: int) -> list[int]:
    """The rank of each item: largest first to the least loaded rank (ties: lower index),
    the same on every rank."""
    load = [0] * world
    owner = [0] * len(numels)
    for i in sorted(range(len(numels)), key=lambda i: (-numels[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += numels[i]
    return owner


class DDPShare:
    """One rank's share of a step's work under DDP, and the step's one collective.

    Which subscriptions share is decided from those due at the step (:meth:`begin`), not
    from what happened on this rank (a subscriber that failed or has no key here), so every
    rank takes part in the same exchanges in the same order. ``forward = "merge"``: the
    forward topics (each rank's own batch) are seen as shards of the global batch, merged
    by the subscribers that merge (``sharded = "merge"``), see :class:`.shards.Merges`."""

    def __init__(self, rank: int, world: int, group: Any, bus: Any) -> None:
        self.rank, self.world, self.group, self.bus = rank, world, group, bus
        self.forward: Literal["rank", "merge"] = "rank"
        #: the rank computing each placed subscription whole, by registration index
        self._whole: dict[int, int] = {}
        #: the subscriptions split by keys: each key's rank, per set of keys
        self._split: dict[int, dict[tuple[tuple[str | None, ...], ...],
                                    dict[str | None, int]]] = {}
        self._load = [0.0] * world  # work a step placed on each rank
        self._capacity = _HEAD  # floats per rank in the packed tensor, agreed by all ranks
        self._taking: dict[int, int] = {}  # id of a sharing subscription -> its index
        self._measuring: set[int] = set()  # indices computed whole on every rank, measured
        self._work: dict[int, float] = {}
        self._full = 0  # floats their results would take in the exchange
        self._per_op = _ELEMENTS_PER_OP["cpu"]
        self._pieces: list[tuple[int, Message]] = []
        self._device: torch.device | None = None
        self.collectives = 0

    def begin(self, payloads: Mapping[str, TopicPayloads], active: Sequence[Any]) -> None:
        """A step's delivery to ``active`` begins: the subscriptions that share their work
        at it, named by registration index (the same on every rank, whose subscribers stay
        enabled alike: see :meth:`end`; a budget keeps the configured cadences in a
        distributed run); those not placed yet are measured at it."""
        self._pieces, self._work, self._full = [], {}, 0
        everyone = self.bus.subscriptions
        consumed = frozenset(t for s in everyone for t in s.topics)
        index = {id(s): i for i, s in enumerate(everyone)}
        self._taking = {
            id(s): index[id(s)] for s in active
            if _shareable(s.topics, s.subscriber, consumed)
            and any(len(payloads[t]) for t in s.topics if t in payloads)}
        self._measuring = {i for i in self._taking.values()
                           if i not in self._whole and i not in self._split}
        if self.forward == "rank" and any(t in FORWARD_TOPICS and t != "loss"
                                          for s in active for t in s.topics):
            self.bus.warn_once("ddp-forward", _FORWARD_RANK)

    def forward_shards(self, payloads: Mapping[str, TopicPayloads]) -> dict[str, frozenset]:
        """With ``forward = "merge"``: the keys of each forward topic, all shards of the
        global batch; else none."""
        if self.forward != "merge":
            return {}
        return {t: frozenset(p.keys) for t, p in payloads.items()
                if t in FORWARD_TOPICS and len(p)}

    def takes(self, sub: Any) -> bool:
        """Whether ``sub`` shares its work at this step."""
        return id(sub) in self._taking

    def select(self, sub: Any, available: dict[str, TopicPayloads]) -> dict[str, TopicPayloads]:
        """What ``sub`` chooses from: all of its topics' keys if this rank computes it
        whole (or every rank does: measured), none if another rank does, else this rank's
        share of the keys (a key is one rank's in all the topics, so a synchronized
        subscriber keeps its sets whole)."""
        parts = _parts(sub, available)
        for p in parts.values():
            if self._device is None and p.data and p.data[0] is not None:
                self._device = _collective_device(self.group, p.data[0].device)
                self._per_op = _ELEMENTS_PER_OP.get(p.data[0].device.type, self._per_op)
        index = self._taking[id(sub)]
        whole = self._whole.get(index)
        if index in self._measuring or whole == self.rank:
            return available
        owner = {} if whole is not None else self._owner(index, parts)
        out = dict(available)
        for topic, p in parts.items():
            out[topic] = p.select([i for i, k in enumerate(p.keys)
                                   if owner.get(k, -1) == self.rank])
        return out

    def _owner(self, index: int, parts: dict[str, TopicPayloads]) -> dict[str | None, int]:
        """The rank of each key of the split subscription ``index``: balanced by the
        elements of its payloads in ``parts``, the same on every rank (cached per set of
        keys; placed with the rest at its first: :meth:`_place`)."""
        known = self._split.setdefault(index, {})
        ident = tuple(tuple(p.keys) for p in parts.values())
        found = known.get(ident)
        if found is None:
            numels = _numels(parts)
            ranks = partition(list(numels.values()), self.world)
            found = known[ident] = dict(zip(numels, ranks, strict=True))
        return found

    def hold(self, sub: Any, messages: list[Message]) -> bool:
        """Keep ``sub``'s results for the exchange (True) if it shares its work; those of a
        subscription measured at this step are every rank's already (False)."""
        index = self._taking.get(id(sub))
        if index is None:
            return False
        if index in self._measuring:
            self._full += sum(_packed_size(m) for m in messages)
            return False
        self._pieces.extend((index, m) for m in messages)
        return True

    def end(self, payloads: Mapping[str, TopicPayloads], put: Callable[[Message], None]
            ) -> None:
        """Exchange the held results (if a subscription shared at this step) and ``put``
        every rank's, merged per subscription and topic, keys in the step's order. A
        subscriber that failed on some rank is disabled on every rank (so all ranks go on
        taking part in the same exchanges). Those measured at this step are then placed."""
        if not self._taking:
            return
        everyone = self.bus.subscriptions
        failed = [i for i in self._taking.values() if not everyone[i].subscriber.enabled]
        measured = {i: self._work.get(i, 0.0) for i in sorted(self._measuring)}
        self._taking = {}
        pieces, self._pieces = self._pieces, []
        keys = list(dict.fromkeys(k for p in payloads.values() for k in p.keys))
        topics = sorted(self.bus.topics)  # the derived ones too: the same table on every rank
        step = self.exchange(pieces, failed, measured, self._full, keys, topics)
        for _, message in step.merged:
            put(message)
        for i in sorted(step.failures):
            sub = everyone[i].subscriber
            if sub.enabled:
                sub.enabled = False
                self.bus.warn_once(f"ddp-failed:{i}", (
                    f"ikkuna: subscriber {sub.name!r} failed on another rank and is disabled "
                    "on this one too (its DDP ranks share its work)"))
        if step.work:
            self._place(step.work, payloads)
            self._capacity = max(self._capacity, _HEAD + step.full)

    def measured(self, sub: Any) -> contextlib.AbstractContextManager[object]:
        """Around ``sub``'s ``compute_step``: at its first sharing step, its work counted
        (aten ops, and the elements they read in units of :data:`_ELEMENTS_PER_OP`:
        deterministic, so the same on every rank whatever else the machine does)."""
        index = self._taking.get(id(sub))
        if index is None or index not in self._measuring:
            return contextlib.nullcontext()
        return _Work(lambda ops, elements: self._work.__setitem__(
            index, ops + elements / self._per_op))

    def _place(self, work: Mapping[int, float], payloads: Mapping[str, TopicPayloads]
               ) -> None:
        """Place the subscriptions measured at this step (``work``: each one's, the most
        any rank measured; the same on every rank): whole, on the least loaded rank, where
        that keeps the rank within ``WHOLE_SLACK`` of an even split of all the work placed
        (largest first); the others split by keys."""
        fair = (sum(self._load) + sum(work.values())) / self.world
        for i in sorted(work, key=lambda i: (-work[i], i)):
            rank = min(range(self.world), key=lambda r: (self._load[r], r))
            if self._load[rank] + work[i] <= WHOLE_SLACK * fair:
                self._whole[i] = rank
                self._load[rank] += work[i]
            else:
                self._owner(i, _parts(self.bus.subscriptions[i], payloads))
                for r in range(self.world):
                    self._load[r] += work[i] / self.world

    def exchange(
        self, pieces: list[tuple[int, Message]], failed: Sequence[int],
        measured: Mapping[int, float], full: int, keys: Sequence[str | None],
        topics: Sequence[str],
    ) -> Exchanged:
        """Every rank's ``(subscription index, message)`` pieces of the step, merged per
        subscription and topic in key order; the indices of the subscriptions that failed
        on some rank; the most work any rank measured for each measured one, and the most
        floats their results would take. ``keys``/``topics`` index the step's names."""
        key_ix = {k: i for i, k in enumerate(keys)}
        topic_ix = {t: i for i, t in enumerate(topics)}
        head: list[float] = [0, len(failed), *failed, len(measured), full]
        head += [v for i, w in measured.items() for v in (i, w)]
        local = torch.cat([torch.tensor(head, dtype=torch.float64)]
                          + [_pack(s, m, key_ix, topic_ix) for s, m in pieces])
        merged: dict[tuple[int, int], list[Message]] = {}
        out = Exchanged()
        for row in self._gather(local):
            values = row[1:1 + int(row[0].item())]
            nfailed = int(values[0].item())
            out.failures.update(int(v) for v in values[1:1 + nfailed].tolist())
            at = 1 + nfailed
            nmeasured, most = (int(v) for v in values[at:at + 2].tolist())
            out.full = max(out.full, most)
            counted = values[at + 2:at + 2 + 2 * nmeasured].tolist()
            for i, w in zip(counted[::2], counted[1::2], strict=True):
                out.work[int(i)] = max(out.work.get(int(i), 0.0), w)
            for sub, msg in _unpack(values[at + 2 + 2 * nmeasured:], keys, topics):
                merged.setdefault((sub, topic_ix[msg.topic]), []).append(msg)
        out.merged = [(sub, _merge(msgs, key_ix)) for (sub, _), msgs in sorted(merged.items())]
        return out

    def _gather(self, local: torch.Tensor) -> list[torch.Tensor]:
        """All ranks' packed results: one all-gather of a buffer of the agreed capacity (a
        second only at a step where some rank's results outgrew it)."""
        import torch.distributed as dist

        need = local.numel() - 1
        device = self._device or torch.device("cpu")
        for _ in range(2):
            buf = torch.zeros(self._capacity + 1, dtype=torch.float64)
            buf[0] = need
            n = min(need, self._capacity)
            buf[1:1 + n] = local[1:1 + n]
            buf = buf.to(device)
            out = [torch.empty_like(buf) for _ in range(self.world)]
            dist.all_gather(out, buf, group=self.group)
            self.collectives += 1
            out = [o.cpu() for o in out]
            most = max(int(o[0].item()) for o in out)
            if most <= self._capacity:
                return out
            self._capacity = most
        raise RuntimeError("ikkuna: the ranks' DDP results disagree in size")


@dataclass
class Exchanged:
    """What a step's exchange brought (:meth:`DDPShare.exchange`)."""

    merged: list[tuple[int, Message]] = field(default_factory=list)
    failures: set[int] = field(default_factory=set)
    work: dict[int, float] = field(default_factory=dict)
    full: int = 0


class _Work(TorchDispatchMode):
    """Counts the aten ops run inside it and the elements of their tensor arguments, and
    hands both to ``done`` on the way out."""

    def __init__(self, done: Callable[[int, int], None]) -> None:
        super().__init__()
        self.ops = self.elements = 0
        self._done = done

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops += 1
        self.elements += sum(a.numel() for a in tree_leaves((args, kwargs or {}))
                             if isinstance(a, torch.Tensor))
        return func(*args, **(kwargs or {}))

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._done(self.ops, self.elements)


def _parts(sub: Any, available: Mapping[str, TopicPayloads]) -> dict[str, TopicPayloads]:
    return {t: available[t] for t in sub.topics if t in available}


def _numels(parts: Mapping[str, TopicPayloads]) -> dict[str | None, int]:
    """The elements of each key's payloads in ``parts``, keys in their order."""
    numels: dict[str | None, int] = {}
    for p in parts.values():
        for k, d in zip(p.keys, p.data, strict=True):
            numels[k] = numels.get(k, 0) + (0 if d is None else d.numel())
    return numels


def _shareable(topics: Sequence[str], subscriber: Any, consumed: frozenset[str]) -> bool:
    """A subscriber that says each result is one per key, computed from that key's payloads
    alone (``ddp_shareable = True``), of parameter topics only (identical on every DDP
    rank), whose results no other subscriber reads in the step."""
    return (bool(getattr(subscriber, "ddp_shareable", False))
            and all(t in PARAMETER_TOPICS for t in topics)
            and not any(o in consumed for o in subscriber.output_topics()))


def _collective_device(group: Any, device: torch.device) -> torch.device:
    """Where the exchange's buffer must be: on the payloads' CUDA device for NCCL, else
    on the CPU (gloo)."""
    import torch.distributed as dist

    return device if "nccl" in str(dist.get_backend(group)) else torch.device("cpu")


def _packed_size(m: Message) -> int:
    """The floats :func:`_pack` makes of ``m``."""
    n = len(m.keys)
    if isinstance(m, HistogramsMessage):
        bins = m.counts.shape[1]
        return 8 + len(_HIST_FIELDS) + n + n * bins + n * (bins + 1) + 6 * n
    return 8 + 1 + n + m.data.numel()


def _pack(sub: int, m: Message, key_ix: dict[str | None, int], topic_ix: dict[str, int]
          ) -> torch.Tensor:
    n = len(m.keys)
    hist = isinstance(m, HistogramsMessage)
    fields = ([getattr(m, f) for f in _HIST_FIELDS] if isinstance(m, HistogramsMessage)
              else [m.data])
    bins = fields[0].shape[1] if hist else 0
    head = [sub, topic_ix[m.topic], int(hist), n, bins, m.global_step, m.epoch, m.batch_index]
    head += [_DTYPES.index(f.dtype) for f in fields]
    head += [-1 if k is None else key_ix[k] for k in m.keys]
    body = [f.detach().reshape(-1).to("cpu", torch.float64) for f in fields]
    return torch.cat([torch.tensor(head, dtype=torch.float64), *body])


def _unpack(row: torch.Tensor, keys: Sequence[str | None], topics: Sequence[str]
            ) -> list[tuple[int, Message]]:
    out: list[tuple[int, Message]] = []
    at = 0
    values = row.tolist()
    while at < len(values):
        sub, topic, hist, n, bins, step, epoch, batch = (int(v) for v in values[at:at + 8])
        at += 8
        nfields = len(_HIST_FIELDS) if hist else 1
        dtypes = [_DTYPES[int(v)] for v in values[at:at + nfields]]
        at += nfields
        names = [None if v < 0 else keys[int(v)] for v in values[at:at + n]]
        at += n
        shapes = ([(n, bins), (n, bins + 1)] + [(n,)] * 6) if hist else [(n,)]
        tensors = []
        for shape, dtype in zip(shapes, dtypes, strict=True):
            size = int(torch.Size(shape).numel())
            tensors.append(row[at:at + size].reshape(shape).to(dtype))
            at += size
        name = topics[topic]
        common: dict[str, Any] = dict(topic=name, global_step=step, epoch=epoch, batch_index=batch,
                      keys=names, tags=tags(name, names))
        fields: dict[str, Any] = dict(zip(_HIST_FIELDS, tensors, strict=False))
        msg: Message = (HistogramsMessage(**common, **fields) if hist
                        else ScalarsMessage(**common, data=tensors[0]))
        out.append((sub, msg))
    return out


def _merge(msgs: list[Message], key_ix: dict[str | None, int]) -> Message:
    """One message of the pieces, keys in the step's order."""
    first = msgs[0]
    names = [k for m in msgs for k in m.keys]
    order = sorted(range(len(names)), key=lambda i: key_ix.get(names[i], -1))
    keys = [names[i] for i in order]
    index = torch.tensor(order, dtype=torch.long)
    common: dict[str, Any] = dict(topic=first.topic, global_step=first.global_step,
                                  epoch=first.epoch, batch_index=first.batch_index,
                                  keys=keys, tags=tags(first.topic, keys))
    if isinstance(first, HistogramsMessage):
        fields: dict[str, Any] = {f: torch.cat([getattr(m, f) for m in msgs])[index]
                                  for f in _HIST_FIELDS}
        return HistogramsMessage(**common, **fields)
    data = torch.cat([m.data for m in msgs])[index]  # type: ignore[union-attr]
    return ScalarsMessage(**common, data=data)
