"""The whole benchmark, in order: the throughput matrix, the timed training commands, the scaling sweep."""

from __future__ import annotations

import itertools
import os
import statistics
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from lenet_dist.bench import measure, report, runs
from lenet_dist.bench.compare import SCHEMA
from lenet_dist.bench.machine import describe_machine
from lenet_dist.bench.measure import Cell
from lenet_dist.config import RECIPES, BenchConfig, TrainConfig, resolve_data_dir
from lenet_dist.data import ensure_dataset, load_split
from lenet_dist.errors import UsageError
from lenet_dist.files import require_writable
from lenet_dist.flags import split_list
from lenet_dist.profiling.capture import NoProfiler, profiler_for

DEFAULT_ROW = ("tuned", "no", "eager", TrainConfig().batch_size)  # what `lenet-dist train` runs by default


def run(bench: BenchConfig) -> dict[str, Any]:
    for path, flag in ((bench.json, "--json"), (bench.chart, "--chart")):  # not after minutes of measuring
        if path:
            require_writable(Path(path), flag)
    devices = device_list(bench)
    # the process-count sweep runs on the GPUs where there are any, else on the CPU's cores
    sweep_device = torch.device("cuda" if any(d.type == "cuda" for d in devices) else "cpu")
    counts = process_counts(bench, sweep_device)
    data_dir = resolve_data_dir(bench.data_dir)
    ensure_dataset(data_dir, "mnist")
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "bench_config": asdict(bench),
        **throughput_matrix(bench, devices, data_dir),
    }
    if bench.runs:
        result["runs"] = {str(device): runs.recipe_runs(data_dir, str(device), recipe_processes(bench, device),
                                                        bench.seeds, bench.repeats) for device in devices}
        if "compile" in split_list(bench.compile_modes):
            for device in devices:
                result["runs"][str(device)]["compile"] = runs.compile_seconds(data_dir, str(device))
        if any(device.type == "cpu" for device in devices):  # the loop's ceiling, at each recipe's batch
            result["loop"] = runs.loop_against_bare(data_dir, recipe_batch_sizes(), bench.repeats,
                                                    compiled="compile" in split_list(bench.compile_modes))
    if counts:
        threads = max(1, len(os.sched_getaffinity(0)) // max(counts)) if sweep_device.type == "cpu" else None
        result["scaling"] = runs.scaling(data_dir, sweep_device.type, counts, threads)
    report.show(result)
    report.save(result, bench.json, bench.chart)
    return result


def throughput_matrix(bench: BenchConfig, devices: list[torch.device], data_dir: Path) -> dict[str, Any]:
    """Every cell, measured in `bench.rounds` whole passes over the matrix; each row is the median of its passes."""
    train, test = load_split(data_dir, "train", "mnist"), load_split(data_dir, "test", "mnist")
    flops_train, flops_inference = measure.flops_per_image()
    peaks = {f"{device}/{precision}": {"flops_per_second": measure.matmul_flops_per_second(device, precision),
                                       "precision": measure.peak_precision(device, precision),
                                       "matmul": f"{measure.PEAK_SIZE[device.type]}²"}
             for device in devices for precision in precision_list(bench, device)}
    cells = [Cell(str(device), *axes) for device in devices for axes in itertools.product(
        split_list(bench.pipelines), precision_list(bench, device), split_list(bench.compile_modes),
        [int(b) for b in split_list(bench.batch_sizes)])]
    passes: dict[Cell, list[measure.Throughput]] = {cell: [] for cell in cells}
    for round_index in range(bench.rounds):
        for cell in cells:
            passes[cell].append(measure.measure(cell, train, test, data_dir, bench.window_images, bench.windows,
                                                NoProfiler()))
            print(f"round {round_index + 1}/{bench.rounds} {report.row_line(cell, passes[cell][-1])}", flush=True)
    profile_dir = Path(bench.profile_dir) / f"bench-{datetime.now():%Y%m%d-%H%M%S}"
    for cell in cells if bench.profile else []:  # a pass of its own: the profiler's cost stays out of the timings
        if (cell.pipeline, cell.precision, cell.compile, cell.batch_size) == DEFAULT_ROW:
            worker = cell.label().replace(" ", "-").replace(":", "")
            with profiler_for(replace(TrainConfig(), profile=True), profile_dir, worker) as profiler:
                measure.measure(cell, train, test, data_dir, bench.window_images, bench.windows, profiler)
    rows = []
    for cell, measured in passes.items():
        train_rates = [m.train_images_per_second for m in measured]
        inference_rates = [m.inference_images_per_second for m in measured]
        peak = peaks[f"{cell.device}/{cell.precision}"]["flops_per_second"]
        rows.append({
            **asdict(cell),
            "train_images_per_second": statistics.median(train_rates), "train_images_per_second_rounds": train_rates,
            # how far apart the timings it is the median of lie: its rounds, or with one round its windows
            "train_spread": spread(train_rates if len(train_rates) > 1 else list(measured[0].train_windows)),
            "inference_images_per_second": statistics.median(inference_rates),
            "inference_images_per_second_rounds": inference_rates,
            "train_flops_per_image": flops_train,
            "mfu_percent": 100 * statistics.median(train_rates) * flops_train / peak,
            "inference_mfu_percent": 100 * statistics.median(inference_rates) * flops_inference / peak,
        })
    add_speedups(rows)
    return {"peak_matmul": peaks, "rows": rows,
            "profile_dir": str(profile_dir) if bench.profile else None}


def spread(rates: list[float]) -> float | None:
    """(max − min) / median: 0.05 where the timings agree within 5 %; None for fewer than two."""
    return (max(rates) - min(rates)) / statistics.median(rates) if len(rates) > 1 else None


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Each row's training rate over the original script's (original pipeline, batch 64, fp32, eager) on its device."""
    for row in rows:
        baseline = [r for r in rows if r["device"] == row["device"] and (r["pipeline"], r["precision"], r["compile"],
                    r["batch_size"]) == ("original", "no", "eager", measure.ORIGINAL_BATCH)]
        row["speedup_vs_original"] = (row["train_images_per_second"] / baseline[0]["train_images_per_second"]
                                      if baseline else None)


def recipe_batch_sizes() -> list[int]:
    return sorted({recipe["batch_size"] for recipe in RECIPES.values()})


def device_list(bench: BenchConfig) -> list[torch.device]:
    names = split_list(bench.devices) or ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    for name in names:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--devices names {name} but this machine has no CUDA device")
        if name != "cpu" and not name.startswith("cuda"):
            raise UsageError(f"--devices: unknown device {name}; use cpu or cuda:N")
    return [torch.device(name) for name in names]


def precision_list(bench: BenchConfig, device: torch.device) -> list[str]:
    if bench.precisions:
        return split_list(bench.precisions)
    return ["no", "bf16", "fp16"] if device.type == "cuda" else ["no", "bf16"]


def available_processes(device: torch.device) -> int:
    """How many processes `device` has room for: its cores on CPU; on cuda:N the GPUs N, N+1, … it launches on."""
    if device.type == "cuda":
        return torch.cuda.device_count() - (device.index or 0)
    return len(os.sched_getaffinity(0))


def recipe_processes(bench: BenchConfig, device: torch.device) -> list[int]:
    """--recipe-processes, else one process and two where the machine has two cores (or GPUs)."""
    if bench.recipe_processes:
        return sorted({int(count) for count in split_list(bench.recipe_processes)})
    return [1, 2] if available_processes(device) >= 2 else [1]


def process_counts(bench: BenchConfig, device: torch.device) -> list[int]:
    """The sweep's process counts on `device`: --processes, else 1 and 2 where there are two cores (or GPUs)."""
    available = available_processes(device)
    if bench.processes is None:
        return [1, 2] if available >= 2 else []
    counts = sorted({int(count) for count in split_list(bench.processes)})
    too_many = [count for count in counts if count > available]
    if too_many and not bench.oversubscribe:
        what = "GPUs" if device.type == "cuda" else "cores"
        raise UsageError(f"--processes {max(too_many)} is more than this machine's {available} {what}; "
                         "pass --oversubscribe to run it anyway")
    return counts
