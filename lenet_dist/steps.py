"""The training step: forward, loss, backward, the optimizer's step, the schedule's next learning rate.

`EagerStep` runs it op by op through accelerate, as on every device. On one CUDA GPU the same step is
captured once as a CUDA graph and replayed for every batch (`GraphedStep`): LeNet-5's kernels are so
small that launching them one by one from Python, not computing them, is what limits a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType, DynamoBackend
from torch.profiler import record_function

from lenet_dist.config import TrainConfig
from lenet_dist.distributed.processes import announce
from lenet_dist.errors import UsageError
from lenet_dist.recipe.build import Trainer

# where accelerate's backward is loss.backward() (DDP's gradient hooks live in the model, not in the wrapper)
PLAIN_BACKWARD = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


class Step(Protocol):
    """A batch's images and labels → its loss and how many of its images the model got right before learning (or
    None); `cuda_graph` says which kind of step it is, for metrics.json."""

    cuda_graph: ClassVar[bool]

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]: ...


def make_step(trainer: Trainer, score: bool) -> tuple[EagerStep | GraphedStep, float]:
    """The training step, made after the state is loaded (a graph captures it): compiled if asked, a CUDA
    graph where that applies; and the seconds compiling took."""
    config, accelerator = trainer.config, trainer.accelerator
    local_batch = config.batch_size // accelerator.num_processes
    seconds = 0.0
    if compiles(accelerator):
        seconds = compile_graphs(accelerator, trainer.model, local_batch,
                                 trainer.test_loader.total_batch_size // accelerator.num_processes)
        announce(accelerator.state, f"compiled the training and evaluation graphs in {seconds:.1f} s "
                                    f"(inductor's cache: {inductor_cache_dir()})")
    if wants_cuda_graph(config, accelerator):
        step = GraphedStep(trainer.model, trainer.optimizer, trainer.lr_scheduler, local_batch, accelerator.device)
    else:
        step = EagerStep(accelerator, trainer.model, trainer.optimizer, trainer.lr_scheduler, score, config.profile)
    return step, seconds


def wants_cuda_graph(config: TrainConfig, accelerator: Accelerator) -> bool:
    """Whether to capture the training step as a CUDA graph: by default on one CUDA GPU with the in-memory
    pipeline, where it applies; asked for elsewhere, refused in one line."""
    reasons = [reason for reason, applies in (
        ("it needs a CUDA device", accelerator.device.type != "cuda"),
        ("it captures a single process's step, not DDP's (see launch/README.md)",
         accelerator.distributed_type != DistributedType.NO),
        ("it needs the tensor pipeline's whole, same-shaped batches", config.data_pipeline != "tensor"),
        ("fp16 needs a gradient scaler outside the graph", accelerator.mixed_precision == "fp16"),
        ("--compile (or accelerate's --dynamo_backend) makes its own graphs", compiles(accelerator)),
    ) if applies]
    if config.cuda_graph and reasons:
        raise UsageError(f"--cuda-graph: {reasons[0]}; drop --cuda-graph")
    return config.cuda_graph is not False and not reasons


def compiles(accelerator: Accelerator) -> bool:
    """Whether accelerate compiles the model in `prepare`: --compile, or accelerate's own dynamo setting
    (`accelerate launch --dynamo_backend inductor`, a launch config's dynamo_config)."""
    return accelerator.state.dynamo_plugin.backend != DynamoBackend.NO


def compile_graphs(accelerator: Accelerator, model: torch.nn.Module, train_batch: int, eval_batch: int) -> float:
    """Compile now, on a training- and an evaluation-shaped batch of zeros, so it stays out of the first
    epoch's images/s. No optimizer step or all-reduce: weights and optimizer are untouched."""
    started = time.perf_counter()
    if accelerator.device.type == "cpu":
        # inductor imports cpp_extension, which warns as it loads where it finds nvcc but no GPU ("No CUDA runtime is
        # found"): a warning about building CUDA extensions, which a CPU compile never does
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    images = torch.zeros(train_batch, 1, 28, 28, device=accelerator.device)
    labels = torch.zeros(train_batch, dtype=torch.long, device=accelerator.device)
    model.train()
    with accelerator.no_sync(model):
        F.cross_entropy(model(images), labels).backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.inference_mode():  # as evaluate runs it: no_grad would be another graph
        model(torch.zeros(eval_batch, 1, 28, 28, device=accelerator.device))
    return time.perf_counter() - started


def inductor_cache_dir() -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


def correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many of the batch's images the logits classify right (no host sync: a tensor on the device)."""
    return (logits.detach().argmax(dim=1) == labels).sum()


class EagerStep:
    """`score`: count the images right (the cadence's trigger reads them); `profiled`: name the optimizer's step in
    the trace. Neither is paid for where it is not used."""

    cuda_graph = False

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 lr_scheduler: torch.optim.lr_scheduler.LRScheduler, score: bool = True,
                 profiled: bool = False) -> None:
        self.accelerator, self.model, self.score, self.profiled = accelerator, model, score, profiled
        # accelerate's wrappers cost a tensor op (loss / accumulation steps), a signature inspection and a package
        # probe every step; with no fp16 scaler and no accumulation they do nothing else, so torch's own are called
        self.plain = (accelerator.scaler is None and accelerator.gradient_accumulation_steps == 1
                      and accelerator.distributed_type in PLAIN_BACKWARD)
        self.optimizer = getattr(optimizer, "optimizer", optimizer) if self.plain else optimizer
        self.lr_scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler) if self.plain else lr_scheduler

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch's loss and how many of its images the model got right before learning from them."""
        logits = self.model(images)
        loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward() if self.plain else self.accelerator.backward(loss)
        with record_function("optimizer_step") if self.profiled else contextlib.nullcontext():
            self.optimizer.step()
        self.lr_scheduler.step()
        return loss.detach(), correct(logits, labels) if self.score else None


class GraphedStep:
    """The step as one CUDA graph over static buffers that every batch is copied into.

    A graph needs fixed shapes (whole batches), capturable Adam with its learning rate a GPU tensor the
    schedule updates in place, and gradients that stay allocated. The warm-up before capture runs on the
    run's state and then restores it, so the trajectory is exactly the eager one's. `capture=False` runs
    the same step eagerly, for tests on a CPU.
    """

    WARMUP_STEPS = 3
    cuda_graph = True

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 lr_scheduler: torch.optim.lr_scheduler.LRScheduler, batch: int, device: torch.device,
                 capture: bool = True) -> None:
        self.model, self.optimizer, self.lr_scheduler = model, optimizer, lr_scheduler
        for group in optimizer.param_groups:  # a checkpoint's lr comes back as a float or a tensor on the CPU
            if not (isinstance(group["lr"], torch.Tensor) and group["lr"].device == device):
                group["lr"] = torch.tensor(float(group["lr"]), device=device)
        self.images = torch.zeros(batch, 1, 28, 28, device=device)
        self.labels = torch.zeros(batch, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        stream = torch.cuda.Stream(device) if capture else None
        self.outputs = self._warm_up(stream)
        if capture:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=stream):
                self.outputs = self._step()

    def _step(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=False)
        logits = self.model(self.images)
        loss = F.cross_entropy(logits, self.labels)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), correct(logits, self.labels)

    def _warm_up(self, stream: torch.cuda.Stream | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run a few steps on zeros (on the side stream that captures next, as make_graphed_callables does),
        then restore every tensor."""
        saved = [tensor.clone() for tensor in self._state()]
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for _ in range(self.WARMUP_STEPS):
                outputs = self._step()
        if stream is not None:
            torch.cuda.current_stream().wait_stream(stream)
        state = self._state()
        with torch.no_grad():
            for tensor, before in zip(state, saved, strict=False):
                tensor.copy_(before)
            for tensor in state[len(saved):]:  # Adam's moments and step counts, made by the first warm-up step
                tensor.zero_()  # as a fresh Adam's are
            for parameter in self.model.parameters():
                parameter.grad.zero_()
        return outputs

    def _state(self) -> list[torch.Tensor]:
        """The weights and the optimizer's tensors, in a fixed order (new optimizer state comes last)."""
        tensors = [parameter.data for parameter in self.model.parameters()]
        for parameter in self.model.parameters():
            tensors += [value for value in self.optimizer.state.get(parameter, {}).values()
                        if isinstance(value, torch.Tensor)]
        return tensors

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.images.copy_(images, non_blocking=True)
        self.labels.copy_(labels, non_blocking=True)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.outputs = self._step()
        self.lr_scheduler.step()  # writes the next learning rate into the tensor the graph reads
        loss, right = self.outputs
        return loss.clone(), right.clone()

