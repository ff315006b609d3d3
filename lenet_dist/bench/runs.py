"""The benchmark's timed training commands: real processes, started the way a user starts them.

Commands that are compared run alternately, `repeats` times each, and report medians: on a shared
machine a noisy minute then lands on both sides instead of deciding a ratio.
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lenet_dist.distributed.configs import config_path
from lenet_dist.errors import UserError

TRAIN = [sys.executable, "-m", "lenet_dist.train", "--no-progress"]
ORIGINAL = [sys.executable, "-m", "lenet_dist.bench.original"]
BARE = [sys.executable, "-m", "lenet_dist.bench.bare"]
FAST_TO_98 = ["--recipe", "fast-to-98"]
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
    """The recipes' results over seeds, per process count, interleaved with `repeats` runs of the original script.

    Default run: whole-process seconds, accuracy, and overhead (wall time beyond training and evaluation).
    fast-to-98: training and evaluation seconds to the first evaluation ≥ 98 %.
    """
    results: dict[str, Any] = {"original": {"runs": []}, **{f"{n}_process": {"default": {"runs": []},
                                                                             "fast_to_98": {"runs": []}}
                                                             for n in processes}}
    for seed in range(max(seeds, repeats)):
        if seed < repeats:
            wall, summary = original_run(data_dir, seed, device_env(device))
            reached = [e for e in summary["epochs"] if e["test_accuracy"] >= 0.98]
            results["original"]["runs"].append({
                "seed": seed, "wall_seconds": wall, "time_to_98": reached[0]["elapsed_seconds"] if reached else None,
                "images": reached[0]["epoch"] * summary["train_images"] if reached else None,
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
            target = metrics["reached_target"]  # False where the run missed 98 %
            results[f"{count}_process"]["fast_to_98"]["runs"].append({
                "seed": seed, "time_to_98": target["elapsed_seconds"] if target else None,
                "images": target["images"] if target else None, "first_epoch": bool(target and target["epoch"] == 1),
                "eval_share": metrics["eval_seconds"] / (metrics["train_seconds"] + metrics["eval_seconds"])})
    for group in [results["original"], *(results[f"{n}_process"]["default"] for n in processes)]:
        group.update(median_run(group["runs"]))
    for group in [results["original"], *(results[f"{n}_process"]["fast_to_98"] for n in processes)]:
        group.update(median_to_98(group["runs"]))
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

    Strong scaling splits a global batch of 128, weak scaling gives each process 64. Efficiency is images/s
    over N × the 1-process rate, each process with the same resources (`threads` cores, or one GPU) and the
    same eager step (no CUDA graph).
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


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median whole-process seconds, with its own parts (so that whole = training + evaluation +
    overhead holds, as it would not for medians taken field by field), and the median final accuracy."""
    middle = sorted(runs, key=lambda run: run["wall_seconds"])[(len(runs) - 1) // 2]
    parts = {key: middle[key] for key in ("wall_seconds", "train_seconds", "eval_seconds", "overhead_seconds")
             if key in middle}
    return parts | {"median_seed": middle["seed"], "final_test_accuracy": statistics.median(
        run["final_test_accuracy"] for run in runs)}


def median_to_98(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median time (and images) to 98 % over seeds, a seed that never got there counted as a miss, slower
    than any that did (None when half or more missed), and how many missed."""
    def median(key: str) -> float | None:
        values = sorted(run[key] if run.get(key) is not None else math.inf for run in runs if key in run)
        value = statistics.median(values) if values else None
        return None if value is None or math.isinf(value) else value

    return {"time_to_98": median("time_to_98"), "images": median("images"),
            "misses": sum(run.get("time_to_98") is None for run in runs)}


def loop_against_bare(data_dir: Path, batches: list[int], rounds: int, compiled: bool) -> dict[str, Any]:
    """CPU training images/s of `lenet-dist train`'s first epoch against bench/bare.py's loop (eager, and
    compiled when `compiled`), alternating `rounds` times; medians and ours over the better bare loop."""
    rows = []
    env = device_env("cpu")
    bare_loops = [("bare", []), *([("bare_compiled", ["--compile"])] if compiled else [])]
    for batch in batches:
        rates: dict[str, list[float]] = {"ours": [], **{name: [] for name, _ in bare_loops}}
        for _ in range(rounds):
            _, metrics = train_run("cpu", ["--epochs", "1", "--batch-size", str(batch), "--data-dir", str(data_dir)],
                                   env)
            rates["ours"].append(metrics["epochs"][0]["train_images_per_second"])
            for name, extra in bare_loops:
                rates[name].append(bare_run(data_dir, batch, extra, env))
        medians = {name: statistics.median(values) for name, values in rates.items()}
        best_bare = max(medians[name] for name, _ in bare_loops)
        rows.append({"batch_size": batch, **{f"{name}_images_per_second": value for name, value in medians.items()},
                     "rounds": rates, "ours_over_best_bare": medians["ours"] / best_bare})
    return {"rows": rows}


def bare_run(data_dir: Path, batch: int, extra: list[str], env: dict[str, str]) -> float:
    with tempfile.TemporaryDirectory() as folder:
        summary = Path(folder) / "summary.json"
        timed([*BARE, "--data-dir", str(data_dir), "--batch-size", str(batch), "--summary", str(summary), *extra], env)
        return json.loads(summary.read_text())["train_images_per_second"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
