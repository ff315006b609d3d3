"""On a CUDA GPU: the training step captured as one CUDA graph, trained for real (`make gpu-check`)."""

from __future__ import annotations

import pytest
import torch

from conftest import TRAIN, read_metrics, run
from lenet_dist.steps import GraphedStep
from test_steps import BATCH, EagerStep, batches, pieces

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def test_the_captured_graph_trains_exactly_as_the_eager_step():
    from accelerate import Accelerator

    data = [(images.to(CUDA), labels.to(CUDA)) for images, labels in batches(12)]
    eager_model, eager_optimizer, eager_scheduler = pieces(graph=False)
    eager_model.to(CUDA)
    eager = EagerStep(Accelerator(), eager_model, eager_optimizer, eager_scheduler)
    graph_model, _, _ = pieces(graph=True)
    graph_model.to(CUDA)
    from lenet_dist.config import TrainConfig
    from lenet_dist.recipe import build_optimizer, build_scheduler

    graph_optimizer = build_optimizer(TrainConfig(), graph_model, graph=True)
    graph_scheduler = build_scheduler(TrainConfig(), graph_optimizer, steps_per_epoch=20)
    graphed = GraphedStep(graph_model, graph_optimizer, graph_scheduler, BATCH, CUDA)
    assert graphed.graph is not None
    for images, labels in data:
        assert torch.allclose(eager(images, labels), graphed(images, labels), rtol=1e-4, atol=1e-5)
    for a, b in zip(eager_model.parameters(), graph_model.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_training_on_one_gpu_captures_the_step(tmp_path, data_dir):
    result = run([*TRAIN, "--target-accuracy", "0.97", "--output-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    metrics = read_metrics(tmp_path)
    assert metrics["device"].startswith("cuda") and metrics["cuda_graph"] is True
    assert metrics["reached_target"]["test_accuracy"] >= 0.97
