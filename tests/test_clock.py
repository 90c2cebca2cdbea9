"""The step model as tables: events of a training loop in, what the Exporter does and which
steps end out, for every case of the README's "When is each topic read?". The clock imports
no torch, so these run without a model; tests/test_real_loops.py checks the same cases with
real training loops and independently computed values."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ikkuna_core._exporter.clock import Act, StepClock


def _act(text: str) -> int:
    act = Act.NONE
    for name in filter(None, text.split("|")):
        act |= getattr(Act, name)
    return act


def _run(clock: StepClock, events: str) -> list[tuple[str, Act]]:
    """Feed ``events`` (space-separated): ``F`` a training forward, ``E`` an eval or no_grad
    forward, ``X`` a forward announced by an integration, ``R`` a forward recomputed inside
    a backward (activation checkpointing), ``L`` a loss call, ``<o>`` / ``<o>*`` optimizer
    ``o``'s pre-step (``*``: with a closure), ``/<o>`` its post-step, ``epoch``, ``close``,
    ``gone:<o>``."""
    out = []
    for event in events.split():
        if event == "F":
            act = clock.forward(training=True)
        elif event == "E":
            act = clock.forward(training=False)
        elif event == "X":
            act = clock.forward(training=True, external=True)
        elif event == "R":
            act = clock.forward(training=True, recomputed=True)
        elif event == "L":
            act = Act.CAPTURE if clock.loss() else Act.NONE  # CAPTURE: the step's loss
        elif event == "epoch":
            act = clock.epoch_finished()
            clock.next_epoch()
        elif event == "close":
            act = clock.close()
        elif event.startswith("gone:"):
            clock.forget(event[5:])
            act = Act.NONE
        elif event.startswith("/"):
            act = clock.optimizer_post(event[1:])
        else:
            act = clock.optimizer_pre(event.rstrip("*"), closure=event.endswith("*"))
        if act & Act.END:
            assert clock.last_ended is not None
        out.append((event, act))
    return out


def _ended(clock: StepClock, events: str) -> list[tuple[int, int, int, int, bool, bool]]:
    """(step, epoch, batch, forwards, stepped, loss_missing) of each step that ended."""
    ended = []
    for event in events.split():
        (_, act), = _run(clock, event)
        if act & Act.END:
            e = clock.last_ended
            assert e is not None
            ended.append((*e.stamp, e.forwards, e.stepped, e.loss_missing))
    return ended


#: (case, optimizer_exists, events, acts: one per event)
ACTS = [
    ("one optimizer", True,
     "F L a /a F L a /a",
     "OPEN|CAPTURE CAPTURE OPTIMIZER_GRADS|READ_GRADS|SNAPSHOT UPDATES|END "
     "OPEN|CAPTURE CAPTURE READ_GRADS|SNAPSHOT UPDATES|END"),
    ("accumulation: later forwards are micro-batches of the step", True,
     "F L F L F L a /a F",
     "OPEN|CAPTURE CAPTURE NO_CAPTURE NONE NO_CAPTURE NONE "
     "OPTIMIZER_GRADS|READ_GRADS|SNAPSHOT UPDATES|END OPEN|CAPTURE"),
    ("no optimizer: each training forward is a step", False,
     "F L F L F",
     "OPEN|CAPTURE CAPTURE END|OPEN|CAPTURE CAPTURE END|OPEN|CAPTURE"),
    ("step(closure): the forward runs inside the step; grads read after the closure", True,
     "a* F L /a a* F L /a",
     "OPEN|OPTIMIZER_GRADS|SNAPSHOT CAPTURE CAPTURE READ_GRADS|UPDATES|END "
     "OPEN|SNAPSHOT CAPTURE CAPTURE READ_GRADS|UPDATES|END"),
    ("LBFGS: the closure runs several forwards, one step", True,
     "a* F L F L F L /a",
     "OPEN|OPTIMIZER_GRADS|SNAPSHOT CAPTURE CAPTURE NO_CAPTURE NONE NO_CAPTURE NONE "
     "READ_GRADS|UPDATES|END"),
    ("two optimizers: step 0 ends after the first, then after the last", True,
     "F a /a b /b F a /a b /b F",
     "OPEN|CAPTURE OPTIMIZER_GRADS|READ_GRADS|SNAPSHOT UPDATES|END NONE NONE "
     "OPEN|CAPTURE READ_GRADS|SNAPSHOT UPDATES READ_GRADS|SNAPSHOT UPDATES|END OPEN|CAPTURE"),
    ("GradScaler skips a step: its forward merges into the next one", True,
     "F a /a F L F L a /a",
     "OPEN|CAPTURE OPTIMIZER_GRADS|READ_GRADS|SNAPSHOT UPDATES|END OPEN|CAPTURE CAPTURE "
     "NO_CAPTURE NONE READ_GRADS|SNAPSHOT UPDATES|END"),
    ("eval or no_grad forwards count nothing and take the pending loss away", True,
     "E F E L a /a E",
     "NO_CAPTURE OPEN|CAPTURE NO_CAPTURE NONE OPTIMIZER_GRADS|READ_GRADS|SNAPSHOT UPDATES|END "
     "NO_CAPTURE"),
    ("optimizer steps without any forward open their own steps", True,
     "a /a a /a",
     "OPEN|OPTIMIZER_GRADS|READ_GRADS|SNAPSHOT UPDATES|END OPEN|READ_GRADS|SNAPSHOT UPDATES|END"),
    ("an integration announces forwards: the model's own no longer count", True,
     "X F L a /a F X",
     "OPEN|CAPTURE NONE CAPTURE OPTIMIZER_GRADS|READ_GRADS|SNAPSHOT UPDATES|END NONE "
     "OPEN|CAPTURE"),
    ("activation checkpointing: a forward recomputed in backward is no call", True,
     "F L R R a /a F L R a /a",
     "OPEN|CAPTURE CAPTURE NONE NONE OPTIMIZER_GRADS|READ_GRADS|SNAPSHOT UPDATES|END "
     "OPEN|CAPTURE CAPTURE NONE READ_GRADS|SNAPSHOT UPDATES|END"),
    ("no optimizer: a recomputed forward ends no step and keeps the pending loss", False,
     "F R L F",
     "OPEN|CAPTURE NONE CAPTURE END|OPEN|CAPTURE"),
    ("epoch_finished ends the open step", False,
     "F L epoch F epoch epoch",
     "OPEN|CAPTURE CAPTURE END OPEN|CAPTURE END NONE"),
    ("close ends the open step; nothing counts afterwards", True,
     "F L close F a /a L close",
     "OPEN|CAPTURE CAPTURE END NONE NONE NONE NONE NONE"),
    ("an optimizer that is gone is no longer waited for", True,
     "F a /a b /b F a /a gone:b F a /a",
     "OPEN|CAPTURE OPTIMIZER_GRADS|READ_GRADS|SNAPSHOT UPDATES|END NONE NONE "
     "OPEN|CAPTURE READ_GRADS|SNAPSHOT UPDATES NONE END|OPEN|CAPTURE READ_GRADS|SNAPSHOT "
     "UPDATES|END"),
]


@pytest.mark.parametrize(("case", "has_optimizer", "events", "acts"), ACTS,
                         ids=[a[0] for a in ACTS])
def test_events_give_these_acts(case: str, has_optimizer: bool, events: str, acts: str) -> None:
    clock = StepClock(optimizer_exists=lambda: has_optimizer)
    got = _run(clock, events)
    assert [a for _, a in got] == [_act(a) for a in acts.split()], case


#: (case, optimizer_exists, events, ended steps: (step, epoch, batch, forwards, stepped,
#: loss_missing))
ENDED = [
    ("one optimizer", True, "F L a /a F L a /a",
     [(0, 0, 0, 1, True, False), (1, 0, 1, 1, True, False)]),
    ("accumulation over three micro-batches is one step", True, "F L F L F L a /a",
     [(0, 0, 0, 3, True, False)]),
    ("no optimizer", False, "F L F L F L close",
     [(0, 0, 0, 1, False, False), (1, 0, 1, 1, False, False), (2, 0, 2, 1, False, False)]),
    ("step(closure)", True, "a* F L /a a* F L /a",
     [(0, 0, 0, 1, True, False), (1, 0, 1, 1, True, False)]),
    ("two optimizers", True, "F L a /a b /b F L a /a b /b",
     [(0, 0, 0, 1, True, False), (1, 0, 1, 1, True, False)]),
    ("GradScaler-skipped step merges into the next", True, "F L a /a F L F L a /a",
     [(0, 0, 0, 1, True, False), (1, 0, 1, 2, True, False)]),
    ("eval and no_grad forwards are no steps", True, "E E F L E a /a E close",
     [(0, 0, 0, 1, True, False)]),
    ("the loss missing is reported with the step", True, "F a /a F E L a /a",
     [(0, 0, 0, 1, True, True), (1, 0, 1, 1, True, False)]),
    ("epochs: batch indices restart, steps go on", False, "F L F L epoch F L epoch",
     [(0, 0, 0, 1, False, False), (1, 0, 1, 1, False, False), (2, 1, 0, 1, False, False)]),
    ("recomputed forwards are no forwards of the step", True, "F L R R F L R a /a",
     [(0, 0, 0, 2, True, False)]),
    ("close ends the step, once", True, "F L close close", [(0, 0, 0, 1, False, False)]),
    ("optimizer steps without a forward", True, "a /a a /a",
     [(0, 0, 0, 0, True, False), (1, 0, 1, 0, True, False)]),
]


@pytest.mark.parametrize(("case", "has_optimizer", "events", "ended"), ENDED,
                         ids=[e[0] for e in ENDED])
def test_events_end_these_steps(case: str, has_optimizer: bool, events: str, ended: list) -> None:
    clock = StepClock(optimizer_exists=lambda: has_optimizer)
    assert _ended(clock, events) == ended, case


def test_the_optimizer_question_is_asked_once_and_only_when_needed() -> None:
    asked: list[int] = []

    def exists() -> bool:
        asked.append(1)
        return True

    clock = StepClock(optimizer_exists=exists)
    _run(clock, "F L a /a F F a /a")
    assert asked == []  # an optimizer stepped before the second forward: nothing to ask
    clock = StepClock(optimizer_exists=exists)
    _run(clock, "F F F a /a F F")
    assert asked == [1]


def test_silenced_counts_nothing_and_keeps_the_pending_loss() -> None:
    clock = StepClock()
    assert clock.forward(training=True) == Act.OPEN | Act.CAPTURE
    with clock.silenced():
        assert clock.forward(training=True) == Act.NONE
        assert clock.optimizer_pre("a", closure=False) == Act.NONE
        assert not clock.loss()
    assert clock.loss()  # the step's loss, after the evaluation
    assert clock.stamp == (0, 0, 0)


def test_now_is_never_negative() -> None:
    clock = StepClock()
    assert clock.stamp == (-1, 0, -1)
    assert clock.now() == (0, 0, 0)


def test_the_clock_imports_no_torch() -> None:
    code = (
        "import sys, importlib.util\n"
        "spec = importlib.util.spec_from_file_location('clock', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec); sys.modules['clock'] = module\n"
        "spec.loader.exec_module(module)\n"
        "assert 'torch' not in sys.modules, 'the clock imported torch'\n"
    )
    import ikkuna_core._exporter.clock as clock_module

    subprocess.run([sys.executable, "-c", code, clock_module.__file__], check=True)


def test_a_skipped_attempt_is_told_from_accumulation_only_when_watched() -> None:
    """``sees_skipped_steps``: a forward that would accumulate asks whether the gradients
    read in the open step were reset without an optimizer step; if so the attempt is handed
    over (SKIPPED) and the step restarts under the same number, capturing afresh."""
    reset, asked = [False], []

    def gradients_reset() -> bool:
        asked.append(1)
        return reset[0]

    clock = StepClock(lambda: True, gradients_reset)
    clock.watch_skips = True
    got = _run(clock, "F L a /a F L")  # step 0, then step 1's first attempt
    reset[0] = True  # the scaler found inf, skipped the optimizer, the loop zeroed the grads
    got += _run(clock, "F L")
    reset[0] = False
    got += _run(clock, "F L a /a")  # a micro-batch of the second attempt: accumulation
    expected = ("OPEN|CAPTURE CAPTURE OPTIMIZER_GRADS|READ_GRADS|SNAPSHOT UPDATES|END "
                "OPEN|CAPTURE CAPTURE SKIPPED|CAPTURE CAPTURE NO_CAPTURE NONE "
                "READ_GRADS|SNAPSHOT UPDATES|END")
    assert [a for _, a in got] == [_act(a) for a in expected.split()]
    assert clock.last_ended is not None
    assert (clock.last_ended.stamp, clock.last_ended.forwards) == ((1, 0, 1), 2)
    assert len(asked) == 2  # at the two forwards that would otherwise accumulate, only

    asked.clear()
    clock = StepClock(lambda: True, gradients_reset)  # no subscriber sees skipped steps
    reset[0] = True
    assert [a for _, a in _run(clock, "F L a /a F L F L")][-2:] == [Act.NO_CAPTURE, Act.NONE]
    assert asked == []
