"""The training step as eager ops and as the static-buffer step a CUDA graph captures, checked on a CPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, TorchDynamoPlugin

from conftest import BATCH, batches, pieces
from lenet_dist.config import TrainConfig
from lenet_dist.errors import UsageError
from lenet_dist.steps import EagerStep, GraphedStep, compiles, wants_cuda_graph


@pytest.mark.parametrize("optimizer", ["adam", "muon"])
@pytest.mark.parametrize("steps_before", [0, 5], ids=["fresh", "resumed-optimizer"])
def test_the_graph_step_trains_exactly_as_the_eager_step(steps_before, optimizer):
    data = batches(12)
    eager_model, eager_optimizer, eager_scheduler = pieces(graph=False, optimizer=optimizer)
    eager = EagerStep(Accelerator(cpu=True), eager_model, eager_optimizer, eager_scheduler)
    graph_model, graph_optimizer, graph_scheduler = pieces(graph=True, optimizer=optimizer)
    warm = EagerStep(Accelerator(cpu=True), graph_model, graph_optimizer, graph_scheduler)
    for images, labels in data[:steps_before]:  # an optimizer with state, as after --resume
        eager(images, labels)
        warm(images, labels)
    # capture=False: the static buffers, the warm-up on zeros and the restore, without a GPU to capture on
    graphed = GraphedStep(graph_model, graph_optimizer, graph_scheduler, BATCH, torch.device("cpu"), capture=False)
    for images, labels in data[steps_before:]:
        (eager_loss, eager_right), (graph_loss, graph_right) = eager(images, labels), graphed(images, labels)
        assert torch.allclose(eager_loss, graph_loss, rtol=1e-5, atol=1e-6) and eager_right == graph_right
    # Muon's bfloat16 Newton–Schulz turns the two paths' float32 rounding differences into ~1e-4 of a weight
    atol = 1e-6 if optimizer == "adam" else 3e-4
    for a, b in zip(eager_model.parameters(), graph_model.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=atol)
    assert float(graph_scheduler.get_last_lr()[0]) == pytest.approx(eager_scheduler.get_last_lr()[0])
    bias = graph_model.conv1[0].bias  # Adam's, in either optimizer
    assert graph_optimizer.state[bias]["step"].item() == 12  # warm-up steps undone


def launched(device: str = "cuda", distributed: DistributedType = DistributedType.NO, precision: str = "no",
             dynamo: str | None = None):
    """What wants_cuda_graph reads of an accelerator; `dynamo` as accelerate's launcher sets it in the environment."""
    with pytest.MonkeyPatch.context() as environment:
        if dynamo:
            environment.setenv("ACCELERATE_DYNAMO_BACKEND", dynamo)
        plugin = TorchDynamoPlugin()  # reads ACCELERATE_DYNAMO_BACKEND, as Accelerator() does
    return SimpleNamespace(device=SimpleNamespace(type=device), mixed_precision=precision,
                           distributed_type=distributed, state=SimpleNamespace(dynamo_plugin=plugin))


def test_a_graph_is_captured_only_where_it_applies():
    assert wants_cuda_graph(TrainConfig(), launched())
    assert not wants_cuda_graph(TrainConfig(cuda_graph=False), launched())
    assert not wants_cuda_graph(TrainConfig(), launched("cpu"))
    assert not wants_cuda_graph(TrainConfig(data_pipeline="torchvision"), launched())
    assert not wants_cuda_graph(TrainConfig(), launched(distributed=DistributedType.MULTI_GPU))  # DDP, even of one
    with pytest.raises(UsageError, match="--cuda-graph: it needs a CUDA device"):
        wants_cuda_graph(TrainConfig(cuda_graph=True), launched("cpu"))
    with pytest.raises(UsageError, match="fp16"):
        wants_cuda_graph(TrainConfig(cuda_graph=True), launched(precision="fp16"))


def test_accelerates_own_dynamo_setting_counts_as_compiling():
    """`accelerate launch --dynamo_backend inductor` compiles the model in prepare: no graph may capture it, and
    the compile warm-up must run (its seconds counted apart), as with --compile."""
    assert not compiles(launched()) and compiles(launched(dynamo="inductor"))
    assert not wants_cuda_graph(TrainConfig(), launched(dynamo="inductor"))
    with pytest.raises(UsageError, match="dynamo_backend"):
        wants_cuda_graph(TrainConfig(cuda_graph=True), launched(dynamo="inductor"))


def test_a_resumed_learning_rate_becomes_the_tensor_the_graph_reads():
    model, optimizer, scheduler = pieces(graph=True)
    optimizer.param_groups[0]["lr"] = float(optimizer.param_groups[0]["lr"])  # as a checkpoint leaves it
    GraphedStep(model, optimizer, scheduler, BATCH, torch.device("cpu"), capture=False)
    lr = optimizer.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.device.type == "cpu"
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(float(scheduler.get_last_lr()[0]))
