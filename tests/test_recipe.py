"""The evaluation cadence: when a run looks at the test set, the same on every rank."""

from __future__ import annotations

import itertools
import math

from lenet_dist.checkpoint import RunState
from lenet_dist.config import TrainConfig
from lenet_dist.recipe import EvaluationCadence

STEPS = 468


def state(step: int, *accuracies: tuple[int, float], seconds: float = 1.0) -> RunState:
    evaluations = [{"step": at, "test_accuracy": accuracy} for at, accuracy in accuracies]
    return RunState(global_step=step, evaluations=evaluations, train_seconds=seconds, eval_seconds=seconds / 3)


def test_without_a_target_only_epoch_ends_or_every_n_steps():
    assert EvaluationCadence(TrainConfig(), STEPS, 10_000).next_evaluation(state(0)) == STEPS
    assert EvaluationCadence(TrainConfig(), STEPS, 10_000).next_evaluation(state(STEPS)) == 2 * STEPS
    every = EvaluationCadence(TrainConfig(eval_every=100), STEPS, 10_000)
    assert [every.next_evaluation(state(step)) for step in (0, 100, 450, 468)] == [100, 200, 468, 500]


def test_with_a_target_evaluations_come_closer_as_the_accuracy_nears_it():
    cadence = EvaluationCadence(TrainConfig(target_accuracy=0.98), STEPS, 10_000)
    assert cadence.next_evaluation(state(0)) == STEPS // 4  # the climb is not known yet
    far = cadence.next_evaluation(state(234, (117, 0.93), (234, 0.95))) - 234  # 175 steps left at this climb
    near = cadence.next_evaluation(state(351, (234, 0.95), (351, 0.977))) - 351  # 14 steps left
    assert far == round((2 * 175.5 * cadence.cost) ** 0.5) and near == round(cadence.cost / 2) and near < far
    at_the_top = cadence.next_evaluation(state(400, (300, 0.977), (400, 0.9795)))
    assert at_the_top - 400 >= round(cadence.cost / 2)  # never sooner than half an evaluation's cost
    assert cadence.next_evaluation(state(400, (300, 0.979), (400, 0.978))) - 400 == STEPS // 16  # a dip: soon


def simulate(cadence: EvaluationCadence, accuracy_at, target: float, resume_at: int | None = None) -> list[int]:
    """The steps a run evaluates at, with test accuracy `accuracy_at(step)`, up to the first at ≥ the target; with
    `resume_at`, the run is rebuilt from its evaluations at that step, as a resumed run is."""
    run = RunState()
    while not run.evaluations or run.evaluations[-1]["test_accuracy"] < target:
        if resume_at is not None and run.global_step >= resume_at:
            run = RunState(global_step=run.global_step, evaluations=list(run.evaluations))
            resume_at = None
        run.global_step = cadence.next_evaluation(run)
        run.evaluations.append({"step": run.global_step, "test_accuracy": accuracy_at(run.global_step)})
    return [e["step"] for e in run.evaluations]


def test_near_the_target_it_looks_often_enough_and_far_from_it_rarely():
    """On a climbing accuracy (98 % is crossed at step 738, in epoch 2), the run stops soon after the crossing,
    spends few evaluations on the way, and a resumed run evaluates at the very same steps."""
    def accuracy_at(step: int) -> float:
        return 0.99 - 0.6 * math.exp(-step / 180)

    crossing = next(step for step in range(1, 10_000) if accuracy_at(step) >= 0.98)
    cadence = EvaluationCadence(TrainConfig(target_accuracy=0.98), STEPS, 10_000)
    steps = simulate(cadence, accuracy_at, 0.98)
    assert steps[-1] - crossing <= max(cadence.cost, STEPS // 16)  # found soon after it happened
    assert len(steps) <= 10  # not every few steps while far away
    # never closer than half an evaluation's cost, but at an epoch's end, which always evaluates
    assert all(b - a >= round(cadence.cost / 2) or b % STEPS == 0 for a, b in itertools.pairwise(steps))
    assert simulate(cadence, accuracy_at, 0.98, resume_at=steps[2] + 1) == steps


def test_the_cadence_depends_on_the_evaluations_alone_so_every_rank_agrees():
    """Ranks see the same evaluations but not the same clocks: the next step is a function of steps and accuracies
    only (a RunState that differs in every other field gives the same answer)."""
    cadence = EvaluationCadence(TrainConfig(target_accuracy=0.98), STEPS, 10_000)
    history = ((234, 0.95), (351, 0.977))
    one = state(351, *history, seconds=1)
    other = RunState(global_step=351, evaluations=list(one.evaluations), train_seconds=97.0, eval_seconds=13.0,
                     loss_sum=5.0, epoch_train_seconds=3.0, compile_seconds=9.0, processes=4)
    assert cadence.next_evaluation(one) == cadence.next_evaluation(other)
