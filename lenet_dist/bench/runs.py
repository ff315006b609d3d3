"""The benchmark's timed training commands: real processes, started the way a user starts them.

Commands that are compared run alternately, `repeats` times each, and report medians: on a shared
machine a noisy minute then lands on both sides instead of deciding a ratio.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lenet_dist.errors import UserError
from lenet_dist.launching import config_path
from lenet_dist.recipe import FAST_TO_98

TRAIN = [sys.executable, "-m", "lenet_dist.train", "--no-progress"]
ORIGINAL = [sys.executable, "-m", "lenet_dist.bench.original"]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]


def device_env(device: str, threads: int | None = None, processes: int = 1) -> dict[str, str]:
    """The environment that puts training on `device` (cpu, or cuda:N and the GPUs after it, one per process)."""
    first = int(device.partition(":")[2] or 0)
    gpus = ",".join(str(first + index) for index in range(processes))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "" if device == "cpu" else gpus}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def timed(command: list[str], env: dict[str, str]) -> float:
    """Wall seconds from start to exit of a real process; its last error line if it fails."""
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["(no output)"]
        raise UserError(f"benchmark run `{' '.join(command[1:4])} …` failed: {lines[-1]}")
    return seconds


def train_run(device: str, flags: list[str], env: dict[str, str], processes: int = 1) -> tuple[float, dict[str, Any]]:
    """Wall seconds and metrics of a real training command: `python -m lenet_dist.train`, or for several
    processes `accelerate launch`."""
    return metrics_of([*(TRAIN if processes == 1 else accelerate_launch(device, processes)), *flags], env)


def metrics_of(command: list[str], env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    """Wall seconds and metrics.json of a training command, run into a temporary --output-dir."""
    with tempfile.TemporaryDirectory() as output_dir:
        wall = timed([*command, "--output-dir", output_dir], env)
        return wall, json.loads((Path(output_dir) / "metrics.json").read_text())


def accelerate_launch(device: str, processes: int) -> list[str]:
    """The training module under `accelerate launch` with the packaged config (cpu-ddp on CPU, multi-gpu on CUDA)."""
    return [*LAUNCH, "--config_file", str(config_path("cpu-ddp" if device == "cpu" else "multi-gpu")),
            "--num_processes", str(processes), "--main_process_port", str(free_port()), "-m", "lenet_dist.train",
            "--no-progress"]


def original_run(data_dir: Path, seed: int, env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    with tempfile.TemporaryDirectory() as folder:
        summary = Path(folder) / "summary.json"
        wall = timed([*ORIGINAL, "--data-dir", str(data_dir), "--seed", str(seed), "--summary", str(summary),
                      "--figure", str(Path(folder) / "predictions.png")], env)
        return wall, json.loads(summary.read_text())


def recipe_runs(data_dir: Path, device: str, processes: list[int], seeds: int, repeats: int) -> dict[str, Any]:
    """The recipe's results over seeds, on 1 and N processes, and the original script's beside them.

    For each process count and seed: the default 2-epoch run (whole-process seconds, accuracy, and the
    fixed overhead: start-up, imports, data loading, checkpoints, the figures and metrics at the end,
    that is, the wall time beyond training and evaluation) and the fast-to-98 % recipe (seconds of
    training and evaluation until the first evaluation at ≥ 98 %). The original script runs `repeats`
    times (seeds 0, 1, …); its time to 98 % comes from its per-epoch evaluations. All interleaved.
    """
    results: dict[str, Any] = {"original": {"runs": []}, **{f"{n}_process": {"default": {"runs": []},
                                                                             "fast_to_98": {"runs": []}}
                                                             for n in processes}}
    for seed in range(max(seeds, repeats)):
        if seed < repeats:
            wall, summary = original_run(data_dir, seed, device_env(device))
            reached = [e["elapsed_seconds"] for e in summary["epochs"] if e["test_accuracy"] >= 0.98]
            results["original"]["runs"].append({"seed": seed, "wall_seconds": wall,
                                                "time_to_98": reached[0] if reached else None,
                                                "final_test_accuracy": summary["epochs"][-1]["test_accuracy"]})
        for count in processes if seed < seeds else []:
            env = device_env(device, processes=count)
            wall, metrics = train_run(device, ["--seed", str(seed), "--data-dir", str(data_dir)], env, count)
            results[f"{count}_process"]["default"]["runs"].append({
                "seed": seed, "wall_seconds": wall, "train_seconds": metrics["train_seconds"],
                "eval_seconds": metrics["eval_seconds"],
                "overhead_seconds": wall - metrics["train_seconds"] - metrics["eval_seconds"],
                "final_test_accuracy": metrics["final_test_accuracy"]})
            _, metrics = train_run(device, [*FAST_TO_98, "--seed", str(seed), "--data-dir", str(data_dir)], env,
                                   count)
            target = metrics["reached_target"]
            results[f"{count}_process"]["fast_to_98"]["runs"].append({
                "seed": seed, "time_to_98": target and target["elapsed_seconds"], "images": target and target["images"],
                "first_epoch": bool(target and target["epoch"] == 1)})
    for group in [results["original"], *(results[f"{n}_process"][part] for n in processes
                                          for part in ("default", "fast_to_98"))]:
        group.update(_medians(group["runs"]))
    results["fast_to_98"] = " ".join(FAST_TO_98)
    return results


def compile_seconds(data_dir: Path, device: str) -> dict[str, Any]:
    """Seconds `--compile` spends compiling with inductor's on-disk cache empty (cold) and filled (warm),
    and the compiled run's steady training rate beside an eager run's."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**device_env(device), "TORCHINDUCTOR_CACHE_DIR": cache}
        flags = ["--epochs", "1", "--data-dir", str(data_dir)]
        runs = {}
        for name, extra in (("eager", []), ("cold", ["--compile"]), ("warm", ["--compile"])):
            wall, metrics = train_run(device, [*flags, *extra], env)
            runs[name] = {"wall_seconds": wall, "compile_seconds": metrics["compile_seconds"],
                          "train_images_per_second": metrics["epochs"][0]["train_images_per_second"]}
    return {"cold_seconds": runs["cold"]["compile_seconds"], "warm_seconds": runs["warm"]["compile_seconds"],
            "runs": runs}


def scaling(data_dir: Path, device: str, counts: list[int], threads: int | None) -> dict[str, Any]:
    """Training images/s of 1, 2, … processes launched through the packaged accelerate config.

    Strong scaling keeps the global batch (the default recipe's 128) and splits it; weak scaling keeps
    each process's batch (64). Efficiency is images/s over N × the 1-process images/s, each process
    having the same resources (`threads` cores on CPU, one GPU on CUDA) and the same eager step (no CUDA
    graph for the single GPU either, which several processes cannot have).
    """
    rows = []
    for mode, batch_of in (("strong", lambda n: 128), ("weak", lambda n: 64 * n)):
        for count in counts:
            flags = ["--no-cuda-graph", "--epochs", "1", "--batch-size", str(batch_of(count)), "--data-dir",
                     str(data_dir)]
            env = device_env(device, threads if device == "cpu" else None, count)
            # through accelerate for one process too: every count starts the same way
            _, metrics = metrics_of([*accelerate_launch(device, count), *flags], env)
            rate = metrics["epochs"][0]["train_images_per_second"]
            rows.append({"mode": mode, "processes": count, "global_batch": batch_of(count),
                         "train_images_per_second": rate, "step_ms": 1000 * batch_of(count) / rate})
    for row in rows:
        (single,) = [r for r in rows if r["mode"] == row["mode"] and r["processes"] == 1] or [None]
        row["efficiency"] = row["train_images_per_second"] / (row["processes"] * single["train_images_per_second"]) \
            if single else None
    return {"device": device, "threads_per_process": threads, "rows": rows}


def _medians(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    """The median of each measured number over the runs (None where no run has it: 98 % never reached)."""
    keys = [key for key in runs[0] if key not in ("seed", "first_epoch")]
    medians = {}
    for key in keys:
        values = [run[key] for run in runs if run[key] is not None]
        medians[key] = statistics.median(values) if values else None
    return medians


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
