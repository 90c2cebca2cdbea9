"""Subscriber: the base class a metric plugin subclasses.

A subscriber has a ``name`` (used in the run configuration) and declares its options as a
pydantic model (``Options``; every subscriber accepts ``topics``, ``subsample`` and
``publish_as``). It is called once per training step, at the end of the step (after
``optimizer.step()``). The contract is :meth:`Subscriber.compute_step`:

- **per step** (the contract, and the fast path): subclass :class:`Subscriber` and implement
  :meth:`Subscriber.compute_step`, which receives one :class:`~ikkuna_core.StepBundle`
  holding every module's payloads of every topic; reduce them all at once with
  :mod:`ikkuna_core.ops`, and report vectors with :meth:`Subscriber.publish_scalars` /
  :meth:`Subscriber.publish_histograms`;
- **per module** (the simple path): subclass :class:`PerModuleSubscriber` and implement
  :meth:`PerModuleSubscriber.compute`, which receives one :class:`~ikkuna_core.MessageBundle`
  per module (or the network) and topic — or, with ``synchronized = True``, per module
  holding all topics — and reports with :meth:`Subscriber.publish_scalar` /
  :meth:`Subscriber.publish_histogram`. (A :class:`Subscriber` that implements ``compute``
  is called the same way.)

Either way, a subscriber's results of a step travel as one message per output topic, to the
backends and, as topics of their own (``max_abs/weight_gradients``), to other subscribers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import ops
from .messages import MessageBundle, ModuleInfo, StepBundle
from .topics import EVENT_TOPICS

if TYPE_CHECKING:
    from ._bus import MessageBus
    from ._exporter import Exporter

__all__ = ["PerModuleSubscriber", "Subscriber", "SubscriberOptions", "TensorOptions"]


class SubscriberOptions(BaseModel):
    """Options every subscriber accepts. Subclass it to add your own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    topics: list[str] = Field(default_factory=list, description="topics to subscribe to")
    subsample: int = Field(default=1, ge=1, description="only every n-th training step")
    publish_as: str | None = Field(
        default=None, description="name of the topic the results are published under"
    )


class TensorOptions(SubscriberOptions):
    """Options of a subscriber that computes on tensors: event topics (``batch_started``…),
    whose payload is None, are rejected."""

    @field_validator("topics")
    @classmethod
    def _tensor_topics(cls, topics: list[str]) -> list[str]:
        events = [t for t in topics if t in EVENT_TOPICS]
        if events:
            raise ValueError(f"topics {events} carry no tensor payload; choose data topics")
        return topics


class Subscriber:
    """Base class for metric subscribers.

    Subclasses set ``name`` and optionally ``Options``, ``default_topics`` and
    ``synchronized`` (True: its topics are delivered together, for the keys present in all
    of them; False: each topic on its own), and implement :meth:`compute` or
    :meth:`compute_step`.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[SubscriberOptions]] = SubscriberOptions
    default_topics: ClassVar[tuple[str, ...]] = ()
    synchronized: ClassVar[bool] = False
    #: What the results describe: "network" for one value per step whatever the input (a
    #: whole-network norm; published under one topic, :meth:`output_topic`), "module" for
    #: values per module; None: what the inputs describe.
    output_kind: ClassVar[Literal["module", "network"] | None] = None
    #: True: also called (``step.skipped`` True) with the payloads of a step whose optimizer
    #: step was then skipped (GradScaler's overflow, user code that skips a bad step), when
    #: the next training forward shows its gradients were reset without an update.
    sees_skipped_steps: ClassVar[bool] = False
    #: True: the forward topics this subscriber takes as finiteness checks
    #: (:meth:`finiteness_only`: ``activations``, ``inputs``) matter only at a step whose
    #: loss is not finite (a non-finite value that never reaches the loss is no fault of
    #: the step). Where the step's loss call shows a finite loss on the host at no cost (a
    #: CPU tensor), the Exporter reads none of those payloads and delivers none of them at
    #: that step; at a non-finite loss, a loss on an accelerator (reading it would
    #: synchronise), or a step whose loss is not seen before its backward, it delivers them
    #: all. Honoured only when every subscriber of the topic says so.
    finite_loss_clears_forward: ClassVar[bool] = False
    #: How statistics of a sharded parameter (a DTensor: FSDP2's ``fully_shard``, tensor
    #: parallelism) are made. ``"gather"`` (the default, right for any computation): the
    #: subscriber receives full tensors, each all-gathered at the steps it is due.
    #: ``"merge"``: it receives this rank's local shard of each sharded payload and merges
    #: its partial statistics across the ranks with :meth:`merge_shards` (norms as sums of
    #: squares, moments as sums and counts, extremes by max/min, histograms by summed counts
    #: over edges agreed first). A statistic that needs the whole matrix (a spectral norm, a
    #: condition number) keeps ``"gather"``. An instance may set its own (an option that
    #: needs whole tensors).
    sharded: Literal["gather", "merge"] = "gather"
    #: Under DDP the parameter topics are identical on every rank. ``True`` says each result
    #: is one per key, computed from that key's payloads alone: the ranks then split the keys
    #: (balanced by elements), compute their share and exchange the results in one
    #: all-gather per step, and every rank publishes all of them. Off for a subscriber whose
    #: result mixes keys (a global norm) or whose results another subscriber reads.
    ddp_shareable: ClassVar[bool] = False

    def __init__(self, **options: object) -> None:
        if not self.name:
            raise TypeError(f"{type(self).__name__} must set the class attribute 'name'")
        if "topics" not in options:
            options["topics"] = list(self.default_topics)
        try:
            self.options = self.Options(**options)  # type: ignore[arg-type]
        except ValidationError as exc:
            details = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}"
                + ("" if isinstance(e.get("input"), dict) else f" (got {e['input']!r})")
                for e in exc.errors()
            )
            raise ValueError(f"invalid options for subscriber {self.name!r}: {details}") from None
        if not self.options.topics:
            raise ValueError(
                f"invalid options for subscriber {self.name!r}: topics: it needs at least one "
                f"topic (its default: {list(self.default_topics) or 'none'})"
            )
        self.enabled = True
        self._bus: MessageBus | None = None
        self._exporter: Exporter | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"

    # ----------------------------------------------------------- for authors
    def compute(self, bundle: MessageBundle) -> None:
        """Turn one bundle into metrics; call ``publish_scalar``/``publish_histogram``."""
        raise NotImplementedError(
            f"subscriber {self.name!r} implements neither compute() nor compute_step()"
        )

    def compute_step(self, step: StepBundle) -> None:
        """Turn one step's payloads of all modules into metrics; call ``publish_scalars``/
        ``publish_histograms``. The default hands each module's bundle to :meth:`compute`."""
        for bundle in step.bundles(self.synchronized):
            self.compute(bundle)

    def merging(self, step: StepBundle) -> bool:
        """Whether some payload of ``step`` is a local shard whose statistics must be merged
        with :meth:`merge_shards` (only for ``sharded = "merge"``; False outside sharded
        training, where payloads are whole tensors)."""
        view = self.bus.merges.view
        return (self.sharded == "merge" and view is not None
                and bool(view.rows([step[t] for t in step.topics])))

    def merge_shards(
        self,
        step: StepBundle,
        partial: torch.Tensor,
        then: Callable[[torch.Tensor], None],
        *,
        topics: Sequence[str] | None = None,
        op: Literal["sum", "max", "min"] = "sum",
    ) -> None:
        """Merge ``partial`` across the ranks that hold the shards, then call ``then`` with
        the merged tensor (and publish from there). ``partial`` has one row per payload of
        ``topics`` (default: the step's), in their order and concatenated, computed on
        this rank's shards (sums, counts, maxima...); ``op`` says how the rows of shards
        combine; the rows of whole tensors keep this rank's value. Every partial of every
        subscriber of a step travels in one all-reduce per ``op`` kind; ``then`` may merge
        again (a histogram's counts after its edges). Without shards, ``then(partial)`` is
        called at once."""
        self.bus.merges.submit(self, step, partial, then,
                               tuple(step.topics if topics is None else topics), op)

    def sample_size(self, topic: str) -> int | None:
        """How many entries of each payload of a forward topic (``activations``,
        ``layer_gradients``) this subscriber needs: None (the default) for whole tensors, or
        k for a fixed pseudo-random sample of at most k entries (:func:`ikkuna_core.ops.sample`).
        When every subscriber of a topic takes samples, the Exporter copies only samples in
        its hooks: cheap, and immune to in-place changes of the outputs later in the step."""
        return None

    def finiteness_only(self, topic: str) -> bool:
        """Whether this subscriber needs of each payload of a forward topic only whether it
        is finite (False, the default, for whole tensors). When every subscriber that wants
        a module's topic says so, the Exporter keeps no tensor past the step's next batched
        reduction (a fused kernel for all that waits, about 8 a step): each payload becomes a
        0-d float32 that is non-finite iff the tensor has a NaN or inf entry
        (:func:`ikkuna_core.ops.finiteness` of the tensor or, on the CPU, of what tells its
        finiteness: a ``Linear``'s, a convolution's or a normalisation layer's output
        gradient by the module's bias gradient, or a bias-free ``Linear``'s or convolution's
        by its weight gradient where that is at most half as large, while that is finite:
        :mod:`ikkuna_core._exporter.implied`), delivered as the
        payload; integer payloads (always finite) are left out."""
        return False

    def wants_module(self, module: ModuleInfo) -> bool:
        """Whether this subscriber needs the forward topics of ``module`` (a hint: modules that
        no subscriber wants are not captured; others may still be delivered)."""
        return True

    def output_topic(self, suffix: str | None = None) -> str:
        """The topic results are published under: ``publish_as`` if given, otherwise the
        subscriber's name followed by its input topics (``max_abs/weight_gradients``)."""
        base = self.options.publish_as or "/".join([self.name, *self.options.topics])
        return f"{base}/{suffix}" if suffix else base

    def output_topics(self) -> list[str]:
        """Every topic this subscriber may publish; override if you publish suffixes."""
        return list(dict.fromkeys(self._topic_for(t) for t in self.options.topics))

    def _topic_for(self, input_topic: str, suffix: str | None = None) -> str:
        if (
            self.synchronized
            or self.output_kind == "network"  # one value for all its inputs: one topic
            or self.options.publish_as
            or len(self.options.topics) <= 1
        ):
            return self.output_topic(suffix)
        base = f"{self.name}/{input_topic}"
        return f"{base}/{suffix}" if suffix else base

    @property
    def bus(self) -> MessageBus:
        if self._bus is None:
            raise RuntimeError(f"subscriber {self.name!r} is not registered on a bus")
        return self._bus

    @property
    def exporter(self) -> Exporter:
        """The Exporter feeding this subscriber's bus (for silent evaluation forwards)."""
        self.bus  # noqa: B018 - not registered on a bus: its error
        if self._exporter is None:
            raise RuntimeError("this subscriber's bus has no exporter attached")
        return self._exporter

    # ------------------------------------------------------------ publishing
    def publish_scalar(
        self, bundle: MessageBundle, value: torch.Tensor | float, suffix: str | None = None
    ) -> None:
        """Report a scalar for the bundle's module (or network) and step. Keep ``value`` a
        tensor: it stays on its device until the backends flush."""
        if not isinstance(value, torch.Tensor):
            value = torch.tensor(float(value))
        topic = self._topic_for(bundle.topics[0], suffix)
        self.bus.results.add_scalars(self, topic, [bundle.key], value.detach().reshape(1))

    def publish_histogram(
        self,
        bundle: MessageBundle,
        values: torch.Tensor,
        bins: int = 64,
        range: tuple[float, float] | None = None,  # noqa: A002 - mirrors numpy/torch naming
        suffix: str | None = None,
        max_samples: int | None = None,
    ) -> None:
        """Report a histogram of ``values`` for the bundle's module (see
        :func:`ikkuna_core.ops.histograms`)."""
        hist = ops.histograms([values.detach()], bins=bins, range=range, max_samples=max_samples)
        topic = self._topic_for(bundle.topics[0], suffix)
        self.bus.results.add_histograms(self, topic, [bundle.key], hist)

    def publish_scalars(
        self,
        step: StepBundle,
        values: torch.Tensor,
        keys: Sequence[str | None] | None = None,
        *,
        topic: str | None = None,
        suffix: str | None = None,
        at: StepBundle | None = None,
    ) -> None:
        """Report one scalar per key at once: ``values[i]`` for ``keys[i]``. ``topic`` is the
        input topic the values were computed from (default: the step's first); ``keys``
        default to that topic's keys. ``at``: an earlier step's bundle, for values that
        belong to that step but are known only now (Cockpit's ``Alpha``)."""
        values = values.detach().reshape(-1)
        out, key_list = self._destination(step, values.numel(), "values", keys, topic, suffix)
        stamp = None if at is None else (at.global_step, at.epoch, at.batch_index)
        self.bus.results.add_scalars(self, out, key_list, values, stamp)

    def publish_histograms(
        self,
        step: StepBundle,
        hists: ops.Histograms,
        keys: Sequence[str | None] | None = None,
        *,
        topic: str | None = None,
        suffix: str | None = None,
    ) -> None:
        """Report stacked histograms (from :func:`ikkuna_core.ops.histograms`): row ``i``
        for ``keys[i]``; ``topic`` and ``keys`` as for :meth:`publish_scalars`."""
        out, key_list = self._destination(
            step, hists.counts.shape[0], "histograms", keys, topic, suffix
        )
        self.bus.results.add_histograms(self, out, key_list, hists)

    def _destination(
        self,
        step: StepBundle,
        count: int,
        what: str,
        keys: Sequence[str | None] | None,
        topic: str | None,
        suffix: str | None,
    ) -> tuple[str, list[str | None]]:
        """The output topic and the keys of ``count`` results computed from ``topic`` (default:
        the step's first), ``keys`` defaulting to that topic's; one key per result."""
        source = topic or step.topics[0]
        if keys is None:
            keys = step[source].keys
        if count != len(keys):
            raise ValueError(f"subscriber {self.name!r}: {count} {what} for {len(keys)} keys")
        return self._topic_for(source, suffix), list(keys)

    # -------------------------------------------------------------- plumbing
    def bind(self, bus: MessageBus) -> None:
        """Called by the bus this subscriber is registered on (one bus per subscriber)."""
        if self._bus is not None and self._bus is not bus:
            raise RuntimeError(f"subscriber {self.name!r} is already registered on another bus")
        self._bus = bus

    def watched_by(self, exporter: Exporter) -> None:
        """Called by the Exporter that feeds this subscriber's bus."""
        self._exporter = exporter


class PerModuleSubscriber(Subscriber):
    """A subscriber computed one module (or the network) at a time: implement
    :meth:`compute`, which is handed each step's payloads as one
    :class:`~ikkuna_core.MessageBundle` per module and topic (``synchronized = True``: per
    module, holding all its topics)."""

    def compute_step(self, step: StepBundle) -> None:
        for bundle in step.bundles(self.synchronized):
            self.compute(bundle)

    def compute(self, bundle: MessageBundle) -> None:
        """Turn one module's bundle into metrics; call ``publish_scalar``/``publish_histogram``."""
        raise NotImplementedError(f"subscriber {self.name!r} must implement compute(bundle)")
