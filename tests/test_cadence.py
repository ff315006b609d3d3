"""What the training loop does after each step (cadence.py), tested directly: which steps log, what is due at
each, and that every rank and a resumed run get the same answers; and, in a real run, that a stop agreed at the
last step finishes the run."""

from __future__ import annotations

import math
import sys

import pytest

from conftest import SHORT, call, read_metrics
from lenet_dist.cadence import EVALUATION_GAP_IMAGES, PROGRESSIVE_IMAGES, Cadence, Due, RunState
from lenet_dist.config import TrainConfig

STEPS = 468  # steps per epoch: MNIST at batch 128
SIGTERM = 15


def at(step: int, **fields) -> RunState:
    """A run's progress at global step `step` (its epoch and place in it following from the step)."""
    return RunState(global_step=step, epoch=(step - 1) // STEPS + 1, batches_done=(step - 1) % STEPS + 1, **fields)


EVERYTHING = TrainConfig(epochs=2, checkpoint_every=468, eval_every=234, log_every=10)


@pytest.mark.parametrize(("name", "config", "progress", "signal", "logs", "due"), [
    ("an ordinary step", TrainConfig(), at(7), None, False, None),
    ("a log point, nothing due", TrainConfig(), at(10), None, True, Due()),
    ("a step that is an epoch's end, an evaluation and a checkpoint, with a signal", EVERYTHING, at(468), SIGTERM,
     True, Due(evaluate=True, epoch_end=True, checkpoint=True, stop=SIGTERM)),
    ("the run's last step", TrainConfig(epochs=2), at(936), None, True,
     Due(evaluate=True, epoch_end=True, checkpoint=True)),
    ("a checkpoint between log points", TrainConfig(checkpoint_every=25), at(25), None, True, Due(checkpoint=True)),
    ("--eval-every", TrainConfig(eval_every=50), at(150), None, True, Due(evaluate=True)),
    ("a signal to several processes waits for the next log point", TrainConfig(), at(13), SIGTERM, False, None),
    ("a signal at a log point stops after saving", TrainConfig(), at(20), SIGTERM, True,
     Due(checkpoint=True, stop=SIGTERM)),
    ("the batches say the target is in reach", TrainConfig(target_accuracy=0.98), at(300, recent=[(4096, 4020)]),
     None, True, Due(evaluate=True)),
    ("in reach, but too soon after the last evaluation", TrainConfig(target_accuracy=0.98),
     at(300, recent=[(4096, 4020)], evaluations=[{"step": 290, "epoch": 1, "test_accuracy": 0.979}]), None, True,
     Due()),
    ("not yet in reach", TrainConfig(target_accuracy=0.98), at(300, recent=[(4096, 4000)]), None, True, Due()),
    ("in reach, but no target", TrainConfig(), at(300, recent=[(4096, 4096)]), None, True, Due()),
])
def test_what_is_due_after_a_step(name, config, progress, signal, logs, due):
    cadence = Cadence(config, STEPS, processes=2)
    assert cadence.is_log_point(progress, signal) is logs, name
    if logs:
        assert cadence.due(progress, signal) == due, name


def test_one_process_stops_at_the_very_step_it_was_signalled_at():
    assert Cadence(TrainConfig(), STEPS, processes=1).is_log_point(at(13), SIGTERM)
    assert Cadence(TrainConfig(), STEPS, processes=1).due(at(13), SIGTERM) == Due(checkpoint=True, stop=SIGTERM)


def test_a_run_is_finished_after_its_last_epoch_or_at_its_target():
    cadence = Cadence(TrainConfig(epochs=2, target_accuracy=0.98), STEPS, processes=1)
    assert not cadence.finished(RunState(epoch=2))
    assert cadence.finished(RunState(epoch=3))
    assert cadence.finished(RunState(epoch=1, evaluations=[{"step": 300, "epoch": 1, "test_accuracy": 0.9801}]))
    assert not cadence.finished(RunState(epoch=1, evaluations=[{"step": 300, "epoch": 1, "test_accuracy": 0.9799}]))


def simulate(config: TrainConfig, accuracy_at, stop_at: int | None = None, test_accuracy_at=None) -> list[int]:
    """The steps a run evaluates at when its training batches are right `accuracy_at(step)` of the time and so is
    the test set (or `test_accuracy_at(step)`), until the first evaluation at ≥ the target, logging as the loop
    does (with `stop_at`, also at a stop or a checkpoint in between, as a resumed run's history has it)."""
    test_accuracy_at = test_accuracy_at or accuracy_at
    cadence, progress, evaluated, logged = Cadence(config, STEPS, processes=1), RunState(), [], 0
    while not cadence.finished(progress):
        progress.global_step += 1
        progress.batches_done += 1
        step = progress.global_step
        if not (cadence.is_log_point(progress, None) or step == stop_at):
            continue
        right = sum(round(config.batch_size * accuracy_at(s)) for s in range(logged + 1, step + 1))
        progress.note_recent((step - logged) * config.batch_size, right, closing=step % config.log_every == 0)
        logged = step
        due = cadence.due(progress, None)
        if due.evaluate:
            evaluated.append(step)
            progress.evaluations.append({"step": step, "epoch": progress.epoch,
                                         "test_accuracy": test_accuracy_at(step)})
        if due.epoch_end:
            progress.start_next_epoch()
    return evaluated


def climbing(step: int) -> float:
    return 0.99 - 0.6 * math.exp(-step / 180)  # crosses 98 % at step 738, in epoch 2


def test_with_a_target_it_evaluates_once_the_batches_say_the_target_is_in_reach():
    """Far from the target nothing but the epoch's end is evaluated; near it, a full evaluation comes soon after
    the batches cross the target, and not more often than every EVALUATION_GAP_IMAGES."""
    config = TrainConfig(target_accuracy=0.98)
    steps = simulate(config, climbing)
    crossing = next(step for step in range(1, 5000) if climbing(step) >= 0.98)
    assert steps[0] == STEPS  # the epoch's end; nothing before, far from 98 %
    assert crossing <= steps[-1] <= crossing + PROGRESSIVE_IMAGES // config.batch_size + config.log_every
    assert len(steps) <= 3
    assert all(b - a >= EVALUATION_GAP_IMAGES // config.batch_size or b % STEPS == 0
               for a, b in zip(steps, steps[1:], strict=False))


def test_a_resumed_run_evaluates_at_the_same_steps():
    """A stop (or a checkpoint) between two log points closes no stretch of the batches' accuracy: the
    evaluations do not move."""
    config = TrainConfig(target_accuracy=0.98)
    uninterrupted = simulate(config, climbing)
    assert simulate(config, climbing, stop_at=735) == uninterrupted == simulate(config, climbing, stop_at=701)


def test_after_the_first_epoch_each_miss_doubles_the_wait_for_the_next_evaluation():
    """From epoch 2 the batches were seen before: they may be right 99.5 % of the time while the test set stays
    at 97.5 %. A full evaluation every EVALUATION_GAP_IMAGES would be ~14 an epoch (+80 % of the run's time);
    backing off after each miss, the whole test set is evaluated a handful of times in three epochs."""
    config = TrainConfig(epochs=4, target_accuracy=0.98)
    steps = simulate(config, lambda step: 0.975 if step <= STEPS else 0.995, test_accuracy_at=lambda step: 0.975)
    triggered_after_epoch_1 = [step for step in steps if step > STEPS and step % STEPS]
    assert steps[-1] == 4 * STEPS and 1 <= len(triggered_after_epoch_1) <= 5, steps


STOPPED_AT_THE_LAST_STEP = """
import dataclasses, signal, sys
from lenet_dist import cadence, train
original_due = cadence.Cadence.due
def stop_at_the_end(self, progress, agreed):  # as if SIGTERM came during the very last step
    due = original_due(self, progress, agreed)
    last = progress.global_step == self.steps_per_epoch * self.config.epochs
    return dataclasses.replace(due, stop=signal.SIGTERM, checkpoint=True) if last else due
cadence.Cadence.due = stop_at_the_end
train.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_stop_agreed_at_the_last_step_finishes_the_run(mnist_sliver, tmp_path):
    result = call([sys.executable, "-c", STOPPED_AT_THE_LAST_STEP, *SHORT, "--output-dir", str(tmp_path)],
                  env={"LENET_DATA_DIR": str(mnist_sliver)}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert read_metrics(tmp_path)["epochs"] and (tmp_path / "model.safetensors").is_file()
