"""The evaluation cadence: when a run looks at the test set, the same on every rank."""

from __future__ import annotations

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


def test_the_cadence_ignores_timings_so_every_rank_agrees():
    cadence = EvaluationCadence(TrainConfig(target_accuracy=0.98), STEPS, 10_000)
    history = ((234, 0.95), (351, 0.977))
    assert cadence.next_evaluation(state(351, *history, seconds=1)) == \
        cadence.next_evaluation(state(351, *history, seconds=7))
