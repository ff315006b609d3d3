"""On a CUDA GPU: the training step captured as one CUDA graph, trained for real (`make gpu-check`)."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import BATCH, TRAIN, batches, call, pieces, read_metrics
from lenet_dist.config import TrainConfig
from lenet_dist.data import DATASETS, InMemoryDataset, ShuffledBatches, Split
from lenet_dist.recipe.build import build_model, build_optimizer
from lenet_dist.recipe.lr_schedule import build_lr_scheduler
from lenet_dist.steps import EagerStep, GraphedStep

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def test_the_captured_graph_trains_exactly_as_the_eager_step():
    from accelerate import Accelerator

    data = [(images.to(CUDA), labels.to(CUDA)) for images, labels in batches(12)]
    eager_model, eager_optimizer, eager_scheduler = pieces(graph=False)
    eager = EagerStep(Accelerator(), eager_model.to(CUDA), eager_optimizer, eager_scheduler)
    torch.manual_seed(0)
    graph_model = build_model(TrainConfig(), num_classes=10).to(CUDA)
    graph_optimizer = build_optimizer(TrainConfig(), graph_model, graph=True)  # GraphedStep puts its lr on the GPU
    graph_scheduler = build_lr_scheduler(TrainConfig(), graph_optimizer, steps_per_epoch=20)
    graphed = GraphedStep(graph_model, graph_optimizer, graph_scheduler, BATCH, CUDA)
    assert graphed.graph is not None
    for images, labels in data:
        (eager_loss, eager_right), (graph_loss, graph_right) = eager(images, labels), graphed(images, labels)
        assert torch.allclose(eager_loss, graph_loss, rtol=1e-4, atol=1e-5) and eager_right == graph_right
    for a, b in zip(eager_model.parameters(), graph_model.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_a_resumed_optimizer_follows_the_schedule_inside_the_graph():
    """A checkpoint's lr comes back as a float: the graph must still read the schedule's lr each step."""
    torch.manual_seed(0)
    model = build_model(TrainConfig(), num_classes=10).to(CUDA)
    optimizer = build_optimizer(TrainConfig(), model, graph=True)
    scheduler = build_lr_scheduler(TrainConfig(), optimizer, steps_per_epoch=20)
    optimizer.param_groups[0]["lr"] = float(optimizer.param_groups[0]["lr"])  # as load_state_dict leaves it
    graphed = GraphedStep(model, optimizer, scheduler, BATCH, CUDA)
    before = [p.detach().clone() for p in model.parameters()]
    (images, labels), *_ = batches(1)
    rates = []
    for _ in range(3):
        graphed(images.to(CUDA), labels.to(CUDA))
        rates.append(float(optimizer.param_groups[0]["lr"]))
    assert rates[0] != rates[1] != rates[2]  # the warm-up of one-cycle moves every step
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_training_on_one_gpu_captures_the_step(tmp_path, data_dir):
    result = call([*TRAIN, "--target-accuracy", "0.97", "--output-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    metrics = read_metrics(tmp_path)
    assert metrics["device"].startswith("cuda") and metrics["cuda_graph"] is True
    assert metrics["reached_target"]["test_accuracy"] >= 0.97


def test_capturing_the_step_warns_about_nothing():
    """No 'capturable=True can impair performance' or other warning from the warm-up and the capture."""
    torch.manual_seed(0)
    model = build_model(TrainConfig(), num_classes=10).to(CUDA)
    optimizer = build_optimizer(TrainConfig(), model, graph=True)
    scheduler = build_lr_scheduler(TrainConfig(), optimizer, steps_per_epoch=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graphed = GraphedStep(model, optimizer, scheduler, BATCH, CUDA)
        (images, labels), *_ = batches(1)
        graphed(images.to(CUDA), labels.to(CUDA))


def test_the_data_order_is_the_same_on_the_gpu_as_on_the_cpu():
    """A run resumed on another device continues with the batches the first device would have trained."""
    split = Split(torch.zeros(1000, 28, 28, dtype=torch.uint8), torch.arange(1000), DATASETS["mnist"])
    orders = [[labels.cpu() for _, labels in ShuffledBatches(InMemoryDataset(split, device), 64, 3, 0, 1).epoch(2)]
              for device in (torch.device("cpu"), CUDA)]
    assert all(torch.equal(a, b) for a, b in zip(*orders, strict=True))
