"""The recipes: named recipes and their overrides, the schedule, LeCun's initialisation, and when a run looks at
the test set (the same steps on every rank and after a resume)."""

from __future__ import annotations

import math

import pytest
import torch

from lenet_dist.checkpoint import RunState
from lenet_dist.config import RECIPES, TrainConfig
from lenet_dist.errors import UsageError
from lenet_dist.recipe import EVALUATION_GAP_IMAGES, EvaluationCadence, build_model, build_scheduler
from lenet_dist.train import note_recent

STEPS = 468


def test_a_recipe_fills_what_no_flag_set_and_a_flag_overrides_it():
    fast = TrainConfig(recipe="fast-to-98")
    assert {name: getattr(fast, name) for name in RECIPES["fast-to-98"]} == RECIPES["fast-to-98"]
    assert TrainConfig(recipe="fast-to-98", batch_size=64).batch_size == 64
    assert TrainConfig(recipe="fast-to-98", batch_size=64).init == "lecun"  # the rest stays the recipe's
    assert TrainConfig().epochs == 2 and TrainConfig().target_accuracy is None and TrainConfig().init == "pytorch"
    with pytest.raises(UsageError, match="--recipe: unknown fastest"):
        TrainConfig(recipe="fastest")


def test_the_schedule_is_one_cycle_over_the_run_and_holds_after_its_span():
    """Over the whole run it is OneCycleLR's, value for value; with --anneal-images it ends there and holds."""
    def rates(scheduler, optimizer, steps):
        seen = []
        for _ in range(steps):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return seen

    def optimizer():
        return torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=6e-3)

    config = TrainConfig()
    ours = optimizer()
    theirs = optimizer()
    reference = torch.optim.lr_scheduler.OneCycleLR(theirs, 6e-3, total_steps=2 * 50, pct_start=0.3,
                                                    cycle_momentum=False)
    assert rates(build_scheduler(config, ours, steps_per_epoch=50), ours, 100) == pytest.approx(
        rates(reference, theirs, 100), rel=1e-12)
    short = TrainConfig(anneal_images=20 * 128, final_lr_factor=1 / 50)  # 20 steps of 128 images, then 1/50 of 6e-3
    held = optimizer()
    seen = rates(build_scheduler(short, held, steps_per_epoch=50), held, 100)
    assert seen[19] == pytest.approx(6e-3 / 50) and set(seen[19:]) == {seen[19]} and max(seen) == 6e-3


def test_lecun_initialisation_has_the_spread_of_one_over_root_fan_in():
    torch.manual_seed(0)
    model = build_model(TrainConfig(init="lecun"), num_classes=10)
    weight = model.classifier[1].weight  # 400 → 120
    assert weight.std().item() == pytest.approx(400 ** -0.5, rel=0.05) and model.classifier[1].bias.abs().max() == 0
    default = build_model(TrainConfig(), num_classes=10).classifier[1].weight
    assert default.std().item() == pytest.approx(400 ** -0.5 / math.sqrt(3), rel=0.05)  # PyTorch's, √3 narrower


def test_without_a_target_only_epoch_ends_or_every_n_steps():
    assert EvaluationCadence(TrainConfig(), STEPS).next_evaluation(RunState()) == STEPS
    assert EvaluationCadence(TrainConfig(), STEPS).next_evaluation(RunState(global_step=STEPS)) == 2 * STEPS
    every = EvaluationCadence(TrainConfig(eval_every=100), STEPS)
    assert [every.next_evaluation(RunState(global_step=step)) for step in (0, 100, 450, 468)] == [100, 200, 468, 500]
    run = RunState(global_step=300, recent=[(2048, 2048)])  # perfect recent batches: still no target, no look
    assert not EvaluationCadence(TrainConfig(), STEPS).due(run)


def simulate(config: TrainConfig, accuracy_at, stop_at: int | None = None) -> list[int]:
    """The steps a run evaluates at, when its training batches are right `accuracy_at(step)` of the time and so is
    the test set, until the first evaluation at ≥ the target. It logs as the loop does: every --log-every steps,
    at each epoch's end and, with `stop_at`, at a stop (or a checkpoint) in between, as a resumed run's history
    has it."""
    cadence, run, evaluated, logged = EvaluationCadence(config, STEPS), RunState(), [], 0
    while not evaluated or accuracy_at(evaluated[-1]) < config.target_accuracy:
        run.global_step += 1
        step = run.global_step
        closing, epoch_end = step % config.log_every == 0, step % STEPS == 0
        if closing or epoch_end or step == stop_at:
            right = sum(round(config.batch_size * accuracy_at(s)) for s in range(logged + 1, step + 1))
            images, logged = (step - logged) * config.batch_size, step
            note_recent(run, images, right, closing)
            if cadence.due(run) or epoch_end:
                evaluated.append(step)
                run.evaluations.append({"step": step, "test_accuracy": accuracy_at(step)})
    return evaluated


def climbing(step: int) -> float:
    return 0.99 - 0.6 * math.exp(-step / 180)  # crosses 98 % at step 738


def test_with_a_target_it_evaluates_once_the_batches_say_the_target_is_in_reach():
    """Far from the target nothing but the epoch's end is evaluated; near it, a full evaluation comes soon after
    the batches cross the target, and not more often than every EVALUATION_GAP_IMAGES."""
    config = TrainConfig(target_accuracy=0.98)
    steps = simulate(config, climbing)
    crossing = next(step for step in range(1, 5000) if climbing(step) >= 0.98)
    assert steps[0] == STEPS  # the epoch's end; nothing before, far from 98 %
    assert crossing <= steps[-1] <= crossing + 2048 // config.batch_size + config.log_every  # found soon after
    assert len(steps) <= 4
    assert all(b - a >= EVALUATION_GAP_IMAGES // config.batch_size or b % STEPS == 0
               for a, b in zip(steps, steps[1:], strict=False))


def test_a_resumed_run_evaluates_at_the_same_steps():
    """A stop (or a checkpoint) between two log points closes no stretch: the evaluations do not move."""
    config = TrainConfig(target_accuracy=0.98)
    assert simulate(config, climbing, stop_at=700) == simulate(config, climbing) == \
        simulate(config, climbing, stop_at=735)
