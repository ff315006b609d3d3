"""What makes two benchmark results comparable: the CPU and its instruction set, cores, GPUs, versions, commit."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

import lenet_dist
from lenet_dist.outputs import versions

# The instruction-set extensions that change LeNet-5's speed on a CPU (bf16 needs avx512_bf16 or AMX).
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_tile")


def describe_machine() -> dict[str, Any]:
    cpu, flags = _cpuinfo()
    return {
        "cpu": cpu,
        "isa": isa_level(flags),
        "isa_flags": [flag for flag in ISA_FLAGS if flag in flags],
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())],
        "gpu_driver": _gpu_driver(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "versions": versions(),
        "commit": _commit(),
    }


def isa_level(flags: set[str]) -> str:
    for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 (bf16)"), ("avx512f", "AVX-512"),
                       ("avx2", "AVX2")):
        if flag in flags:
            return name
    return "unknown"


def _cpuinfo() -> tuple[str, set[str]]:
    cpu, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu in ("", platform.processor() or platform.machine()):
                cpu = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    return cpu, flags


def _gpu_driver() -> str | None:
    if not torch.cuda.is_available():
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10)
        return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else None
    return None


def _commit() -> str | None:
    """The git commit of a checkout the package runs from (None when installed from a wheel)."""
    checkout = Path(lenet_dist.__file__).resolve().parents[1]
    if not (checkout / ".git").exists():
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        result = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        if result.returncode == 0:
            return result.stdout.strip()
    return None
