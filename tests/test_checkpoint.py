"""What a checkpoint holds, in-process: portable states, the optimizer settings a resumed run keeps, exactness."""

from __future__ import annotations

import io
from types import SimpleNamespace

import torch
from accelerate import Accelerator

from conftest import BATCH, batches, pieces
from lenet_dist.checkpoint import _training_state, load_optimizer_state
from lenet_dist.steps import EagerStep, GraphedStep


def trained(model, optimizer, scheduler) -> SimpleNamespace:
    return SimpleNamespace(accelerator=Accelerator(cpu=True), model=model, optimizer=optimizer, lr_scheduler=scheduler)


def round_trip(state: dict) -> dict:
    """Through the file and back, as a resume on another machine reads it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return torch.load(io.BytesIO(buffer.getvalue()), map_location="cpu", weights_only=True)


def tensors_in(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in tensors_in(item)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors_in(item)]
    return []


def test_a_graphed_runs_learning_rates_are_saved_as_numbers_not_device_tensors():
    """The graph keeps the lr as a tensor on the GPU, and the schedule's _last_lr follows it: saved as such, a
    checkpoint would not load on a machine without that GPU."""
    model, optimizer, scheduler = pieces(graph=True)
    step = GraphedStep(model, optimizer, scheduler, BATCH, torch.device("cpu"), capture=False)
    for images, labels in batches(3):
        step(images, labels)
    assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)
    assert any(isinstance(lr, torch.Tensor) for lr in scheduler.state_dict()["_last_lr"])  # what used to be saved
    state = _training_state(trained(model, optimizer, scheduler))
    assert tensors_in(state["scheduler"]) == []
    assert all(tensors_in({k: v for k, v in group.items() if k != "params"}) == []
               for group in state["optimizer"]["param_groups"])
    assert all(t.device.type == "cpu" for t in tensors_in(state["optimizer"]["state"]))


def test_an_eager_checkpoint_resumes_into_the_graph_step_with_capturable_adam():
    """An eager run's optimizer state (capturable=False) loaded into the graph's Adam keeps capturable=True, and
    training goes on as the uninterrupted eager run (capturable Adam does the same arithmetic in another order)."""
    data = batches(10)
    model, optimizer, scheduler = pieces(graph=False)
    eager = EagerStep(Accelerator(cpu=True), model, optimizer, scheduler)
    for images, labels in data[:4]:
        eager(images, labels)
    saved = round_trip(_training_state(trained(model, optimizer, scheduler)))
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert saved["optimizer"]["param_groups"][0]["capturable"] is False

    resumed_model, resumed_optimizer, resumed_scheduler = pieces(graph=True)
    resumed_model.load_state_dict(weights)
    load_optimizer_state(resumed_optimizer, saved["optimizer"])
    resumed_scheduler.load_state_dict(saved["scheduler"])
    assert all(group["capturable"] for group in resumed_optimizer.param_groups)
    graphed = GraphedStep(resumed_model, resumed_optimizer, resumed_scheduler, BATCH, torch.device("cpu"),
                          capture=False)
    for images, labels in data[4:]:
        (eager_loss, eager_right), (graph_loss, graph_right) = eager(images, labels), graphed(images, labels)
        assert torch.allclose(eager_loss, graph_loss, rtol=1e-5, atol=1e-6) and eager_right == graph_right
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_moments_keep_the_channels_last_layout_of_their_weights():
    """Fused Adam walks a weight and its moments in memory order: moments saved contiguous and loaded beside a
    channels-last weight would pair the wrong elements, a silent change of the trajectory."""
    model, optimizer, scheduler = pieces(graph=False)
    EagerStep(Accelerator(cpu=True), model, optimizer, scheduler)(*batches(1)[0])
    saved = round_trip(_training_state(trained(model, optimizer, scheduler)))
    fresh_model, fresh_optimizer, _ = pieces(graph=False)
    load_optimizer_state(fresh_optimizer, saved["optimizer"])
    weight = fresh_model.conv2[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert fresh_optimizer.state[weight]["exp_avg"].stride() == weight.stride()


def test_moments_saved_in_one_layout_step_right_in_the_other():
    """A checkpoint of a --channels-last run resumed with --no-channels-last (and back): each moment is copied
    into its weight's layout, so the next fused step is the one an unbroken run in that layout takes."""
    for saving, loading in ((torch.channels_last, torch.contiguous_format),
                            (torch.contiguous_format, torch.channels_last)):
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(6, 4, 5, 5).to(memory_format=saving))
        optimizer = torch.optim.Adam([weight], lr=0.1, fused=True)
        weight.grad = torch.randn(6, 4, 5, 5).to(memory_format=saving)
        optimizer.step()
        saved = round_trip(optimizer.state_dict())
        resumed = torch.nn.Parameter(weight.detach().clone().to(memory_format=loading))
        resumed_optimizer = torch.optim.Adam([resumed], lr=0.1, fused=True)
        load_optimizer_state(resumed_optimizer, round_trip(saved))
        moments = {name: resumed_optimizer.state[resumed][name] for name in ("exp_avg", "exp_avg_sq")}
        assert all(moment.stride() == resumed.stride() for moment in moments.values())
        assert all(torch.equal(moments[name], saved["state"][0][name]) for name in moments)  # same values
        reference = torch.nn.Parameter(resumed.detach().clone())  # the same state built in this layout
        reference_optimizer = torch.optim.Adam([reference], lr=0.1, fused=True)
        reference_optimizer.load_state_dict(round_trip(saved))  # tensors of its own: a step updates them in place
        for name in moments:
            reference_optimizer.state[reference][name] = torch.empty_like(reference).copy_(saved["state"][0][name])
        gradient = torch.randn(6, 4, 5, 5)
        resumed.grad, reference.grad = gradient.to(memory_format=loading), gradient.to(memory_format=loading)
        resumed_optimizer.step()
        reference_optimizer.step()
        assert torch.equal(resumed, reference)
