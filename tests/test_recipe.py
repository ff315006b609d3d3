"""The recipes: named recipes and their overrides, the learning-rate schedule, LeCun's initialisation, Muon."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import types
import typing

import pytest
import torch

from lenet_dist.config import RECIPES, TrainConfig
from lenet_dist.errors import UsageError
from lenet_dist.flags import UNSET
from lenet_dist.recipe.adam import Adam
from lenet_dist.recipe.build import build_model, build_optimizer
from lenet_dist.recipe.lr_schedule import build_lr_scheduler
from lenet_dist.recipe.muon import MuonWithAdam, orthogonalised, owner_ranks


def test_a_recipe_fills_what_no_flag_set_and_a_flag_overrides_it():
    fast = TrainConfig(recipe="fast-to-98")
    assert {name: getattr(fast, name) for name in RECIPES["fast-to-98"]} == RECIPES["fast-to-98"]
    assert TrainConfig(recipe="fast-to-98", batch_size=128).batch_size == 128
    assert TrainConfig(recipe="fast-to-98", batch_size=128).init == "lecun"  # the rest stays the recipe's
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
    assert rates(build_lr_scheduler(config, ours, steps_per_epoch=50), ours, 100) == pytest.approx(
        rates(reference, theirs, 100), rel=1e-12)
    short = TrainConfig(anneal_images=20 * 128, final_lr_factor=1 / 50)  # 20 steps of 128 images, then 1/50 of 6e-3
    held = optimizer()
    seen = rates(build_lr_scheduler(short, held, steps_per_epoch=50), held, 100)
    assert seen[19] == pytest.approx(6e-3 / 50) and set(seen[19:]) == {seen[19]} and max(seen) == 6e-3


def test_lecun_initialisation_has_the_spread_of_one_over_root_fan_in():
    torch.manual_seed(0)
    model = build_model(TrainConfig(init="lecun"), num_classes=10)
    weight = model.classifier[1].weight  # 400 → 120
    assert weight.std().item() == pytest.approx(400 ** -0.5, rel=0.05) and model.classifier[1].bias.abs().max() == 0
    default = build_model(TrainConfig(), num_classes=10).classifier[1].weight
    assert default.std().item() == pytest.approx(400 ** -0.5 / math.sqrt(3), rel=0.05)  # PyTorch's, √3 narrower


def test_muon_steps_as_torchs_muon_on_a_matrix_and_as_adam_on_the_rest():
    """MuonWithAdam against torch.optim.Muon (2-D weights, the only ones it takes) and torch.optim.Adam, five steps
    of the same gradients; torch's Newton–Schulz runs in bfloat16, ours in float32 (within bfloat16's rounding)."""
    torch.manual_seed(0)
    weight, bias = torch.nn.Parameter(torch.randn(120, 400) * 0.05), torch.nn.Parameter(torch.randn(120) * 0.05)
    their_weight, their_bias = (torch.nn.Parameter(p.detach().clone()) for p in (weight, bias))
    ours = MuonWithAdam([weight], [bias], muon_lr=0.02, adam_lr=5e-3, betas=(0.9, 0.95))
    muon = torch.optim.Muon([their_weight], lr=0.02, weight_decay=0, momentum=0.95, nesterov=True)
    adam = torch.optim.Adam([their_bias], lr=5e-3, betas=(0.9, 0.95))
    for _ in range(5):
        gradients = torch.randn(120, 400), torch.randn(120)
        for parameters in ((weight, bias), (their_weight, their_bias)):
            for parameter, gradient in zip(parameters, gradients, strict=True):
                parameter.grad = gradient.clone()
        ours.step(), muon.step(), adam.step()
    assert torch.allclose(weight, their_weight, atol=3e-4) and torch.allclose(bias, their_bias, atol=1e-7)
    assert not torch.allclose(weight, their_weight + 2e-3, atol=3e-4)  # the comparison can fail


def test_muon_takes_the_four_weight_matrices_filters_flattened_and_adam_the_rest():
    model = build_model(TrainConfig(), num_classes=10)
    optimizer = build_optimizer(TrainConfig(optimizer="muon"), model)
    muon, adam = ([id(p) for p in group["params"]] for group in optimizer.param_groups)
    assert muon == [id(model.conv1[0].weight), id(model.conv2[0].weight), id(model.classifier[1].weight),
                    id(model.classifier[3].weight)]
    assert len(adam) == 6 and id(model.classifier[5].weight) in adam  # the biases and the output layer
    assert [group["lr"] for group in optimizer.param_groups] == [0.02, TrainConfig().lr]
    filters = torch.randn(16, 6, 5, 5) * torch.logspace(-2, 0, 16).view(16, 1, 1, 1)  # rows of very unequal norms
    before = torch.linalg.svdvals(filters.reshape(16, -1))
    assert before.max() > 20 * before.min()
    spread = torch.linalg.svdvals(orthogonalised(filters.reshape(16, -1)))
    assert spread.min() > 0.5 and spread.max() < 1.5  # ≈ orthogonal: Newton–Schulz leaves singular values in 0.5…1.5


def test_a_warm_up_of_one_step_starts_at_the_peak():
    config = TrainConfig(recipe="fast-to-98", batch_size=32, anneal_images=320)  # 10 steps, 10 % warming up: one
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = build_lr_scheduler(config, optimizer, steps_per_epoch=1875)
    rates = []
    for _ in range(12):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(config.lr) and rates == sorted(rates, reverse=True)
    assert rates[-1] == pytest.approx(config.lr * config.final_lr_factor)


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_made_config_holds_every_value_in_its_declared_type_whatever_the_recipe(recipe):
    """The flags a recipe sets default to UNSET on the command line; the config made from them holds the recipe's
    values, each of its field's type (int, not int | None, where None is no value the field takes)."""
    config = TrainConfig(recipe=recipe)
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        value, hint = getattr(config, field.name), hints[field.name]
        allowed = [typing.get_origin(kind) or kind for kind in
                   (typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,))]
        allowed += [int] if float in allowed else []  # a float field takes an int, as typing has it
        assert value is not UNSET and isinstance(value, tuple(allowed)), (field.name, value, hint)


def test_under_ddp_each_rank_orthogonalises_a_balanced_share_of_the_matrices():
    """LeNet's filters and weights (6×25, 16×150, 120×400, 84×120): fc1 costs most of the Newton–Schulz work, so on
    two ranks it is one rank's share and the three others the other's; one rank does them all."""
    shapes = [torch.Size(shape) for shape in ((6, 1, 5, 5), (16, 6, 5, 5), (120, 400), (84, 120))]
    assert owner_ranks(shapes, 2) == [1, 1, 0, 1]
    assert owner_ranks(shapes, 1) == [0, 0, 0, 0]
    assert sorted(set(owner_ranks(shapes, 4))) == [0, 1, 2, 3]


def test_the_adam_without_dynamo_steps_saves_and_loads_as_torchs_fused_adam():
    """recipe/adam.py calls the methods under torch.optim's dynamo wrappers: the same bytes, the same state."""
    weights = []
    for optimizer_class in (torch.optim.Adam, Adam):
        torch.manual_seed(0)
        model = build_model(TrainConfig(), num_classes=10)
        optimizer = optimizer_class(model.parameters(), lr=6e-3, betas=(0.9, 0.95), fused=True)
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(8, 1, 28, 28)).square().mean().backward()
            optimizer.step()
        restored = optimizer_class(model.parameters(), lr=6e-3, betas=(0.9, 0.95), fused=True)
        restored.load_state_dict(optimizer.state_dict())
        assert all(torch.equal(restored.state[p]["exp_avg_sq"], optimizer.state[p]["exp_avg_sq"])
                   for p in model.parameters())
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(ours, torchs) for ours, torchs in zip(weights[1], weights[0], strict=True))


def test_building_stepping_and_saving_either_optimizer_does_not_import_torchs_compiler():
    """A fresh interpreter (this one may have imported it already): importing torch._dynamo cost 1.5 s of every
    run's start (py-spy) when torch.optim's wrappers and accelerate's unwrap_model did it."""
    script = """
import sys, torch
from lenet_dist.config import TrainConfig
from lenet_dist.model import unwrapped
from lenet_dist.recipe.build import build_model, build_optimizer
for optimizer in ("adam", "muon"):
    config = TrainConfig(optimizer=optimizer)
    model = build_model(config, num_classes=10)
    step = build_optimizer(config, model)
    step.zero_grad()
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    step.step()
    step.load_state_dict(step.state_dict())
    unwrapped(model).state_dict()
assert "torch._dynamo" not in sys.modules, "torch._dynamo was imported"
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
