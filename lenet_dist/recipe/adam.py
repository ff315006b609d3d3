"""torch.optim's fused Adam, without the import of torch's compiler that its methods make on their first call.

torch.optim.Optimizer's add_param_group, zero_grad, state_dict and load_state_dict, and Adam's step, are
wrapped to keep torch.compile out of them; the wrapper imports torch._dynamo (triton, sympy and the FSDP stack
with it) the first time it runs: 1.5-1.8 s of every run's start on a 2-core EPYC (py-spy, BENCHMARKS.md). The
optimizer is never compiled here (--compile compiles the model), so `WithoutDynamo` calls the methods the
wrappers hold; the update, the state and the state_dict are torch's, byte for byte. Where a torch release
stops wrapping a method, its own method is used.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer


def _unwrapped(method: Any) -> Any:
    return getattr(method, "__wrapped__", method)


class WithoutDynamo:
    """Put before torch.optim.Optimizer among a class's bases: its methods, not their dynamo-disabling wrappers."""

    add_param_group = _unwrapped(Optimizer.add_param_group)
    zero_grad = _unwrapped(Optimizer.zero_grad)
    state_dict = _unwrapped(Optimizer.state_dict)
    load_state_dict = _unwrapped(Optimizer.load_state_dict)


class Adam(WithoutDynamo, torch.optim.Adam):
    @torch.no_grad()  # what the step's wrapper does besides keeping dynamo out (differentiable is always False)
    def step(self, closure: None = None) -> Any:
        return _unwrapped(torch.optim.Adam.step)(self, closure)
