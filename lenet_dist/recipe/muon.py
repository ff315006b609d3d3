"""Muon on the weight matrices, convolution filters included, and Adam on the rest, as one optimizer.

Muon (Jordan et al., 2024) steps each weight matrix along its orthogonalised Nesterov momentum: five
Newton–Schulz iterations with torch.optim.Muon's coefficients, the step scaled by √max(1, rows/cols). A
convolution's filters are the matrix out × in·k·k. torch.optim.Muon is not used: it refuses tensors that are
not 2-D, and it reads its learning rate as a Python number, which a CUDA graph cannot replay. Every quantity
the Muon half reads is a tensor, so its step is capturable; the Adam half is torch's fused Adam (adam.py).

Under DDP each rank orthogonalises its share of the matrices (balanced by their cost) and sends the stepped
matrices to the others, as the reference Muon does: the work is divided, and every rank applies the same
bytes. Newton–Schulz's matrix products round differently with another number of BLAS threads or another CPU,
so ranks that each orthogonalised everything would see their weights drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from lenet_dist.recipe.adam import Adam, WithoutDynamo

NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's (Jordan's) quintic coefficients
NEWTON_SCHULZ_STEPS = 5
EPS = 1e-7
MOMENTUM = 0.95


def orthogonalised(matrix: torch.Tensor, steps: int = NEWTON_SCHULZ_STEPS) -> torch.Tensor:
    """≈ U Vᵀ of matrix = U S Vᵀ, in float32: in torch.optim.Muon's bfloat16 the rounding of two runs that differ
    in the last bit (graph and eager, one process and DDP) drifts apart by 1e-3 of a weight within a dozen steps."""
    a, b, c = NEWTON_SCHULZ
    x = matrix.float()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=EPS)
    if gram_pays(*x.shape, steps):
        # X ← (a I + b A + c A²) X keeps X = Q X₀ for a square Q: iterate on Q, with A = Q G Qᵀ, G = X₀ X₀ᵀ
        gram = x @ x.T
        q = torch.eye(x.size(0), dtype=x.dtype, device=x.device)
        for _ in range(steps):
            square = q @ gram @ q.T
            q = torch.addmm(q, torch.addmm(square, square, square, beta=b, alpha=c), q, beta=a)
        x = q @ x
    else:
        for _ in range(steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def gram_pays(rows: int, cols: int, steps: int) -> bool:
    """Whether iterating on the rows × rows Q is cheaper for a wide rows × cols matrix: 4 rows³ multiply-adds a
    step and 2 rows² cols twice, against (2 rows² cols + rows³) a step (fc1's 120 × 400: 30 % less, measured
    0.7× the time). Small matrices stay as they are: there the products' calls, not their arithmetic, take the
    time (conv1's 6 × 25 measured slower, conv2's 16 × 150 no faster)."""
    once, per_step = 4 * rows * rows * cols, 4 * rows**3
    return rows * rows * cols >= 2**20 and once + per_step * steps < (2 * rows * rows * cols + rows**3) * steps


class MuonWithAdam(WithoutDynamo, torch.optim.Optimizer):
    """Two parameter groups: the matrices (`muon` True) and the rest, which torch's fused Adam steps.

    The Adam shares this optimizer's state and its group, so that state_dict, load_state_dict and the
    learning-rate schedule see one optimizer.
    """

    def __init__(self, matrices: Iterable[torch.nn.Parameter], others: Iterable[torch.nn.Parameter], *,
                 muon_lr: float, adam_lr: float, betas: tuple[float, float], capturable: bool = False) -> None:
        self.adam = Adam(list(others), lr=adam_lr, betas=betas, fused=True, capturable=capturable)
        adam_group = {**self.adam.param_groups[0], "muon": False}
        super().__init__([{"params": list(matrices), "lr": muon_lr, "muon": True}, adam_group],
                         {"momentum": MOMENTUM})
        self._share_with_adam()

    def _share_with_adam(self) -> None:
        self.adam.param_groups, self.adam.state = [self.param_groups[1]], self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # makes new groups and a new state
        self._share_with_adam()

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        matrices = self.param_groups[0]
        momentum = matrices["momentum"]
        stepped = [parameter for parameter in matrices["params"] if parameter.grad is not None]
        world_size, rank = _world()
        owners = owner_ranks([parameter.shape for parameter in stepped], world_size)
        for parameter, owner in zip(stepped, owners, strict=True):
            state = self.state[parameter]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(parameter)
            buffer = state["momentum_buffer"]
            buffer.lerp_(parameter.grad, 1 - momentum)  # on every rank: elementwise, the same bytes everywhere
            if owner != rank:
                continue
            nesterov = parameter.grad.lerp(buffer, momentum)
            rows = parameter.size(0)
            update = orthogonalised(nesterov.reshape(rows, -1)).reshape(parameter.shape)
            scale = max(1.0, rows / (parameter.numel() // rows)) ** 0.5
            parameter.sub_(update * (matrices["lr"] * scale))
        pending = [dist.broadcast(parameter, src=owner, async_op=True)
                   for parameter, owner in zip(stepped, owners, strict=True)] if world_size > 1 else []
        for request in pending:
            request.wait()
        self.adam.step()


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def owner_ranks(shapes: list[torch.Size], world_size: int) -> list[int]:
    """For each matrix, the rank that orthogonalises it: the costliest first, each to the rank with the least work
    so far (Newton–Schulz costs about rows · cols · min(rows, cols))."""
    load = [0] * world_size
    owner = [0] * len(shapes)
    costs = [shape[0] * (shape.numel() // shape[0]) * min(shape[0], shape.numel() // shape[0]) for shape in shapes]
    for index in sorted(range(len(shapes)), key=lambda index: -costs[index]):
        owner[index] = min(range(world_size), key=load.__getitem__)
        load[owner[index]] += costs[index]
    return owner
