"""Throughput benchmark: every device × data pipeline × precision × compile × batch size, side by side.

    lenet-dist bench [--quick] [--json out.json] [--chart out.png]
    python -m lenet_dist.bench

Each row trains the real LeNet-5 on real MNIST batches from the real pipeline. Training and inference
images/s are the median of several timed windows after a warm-up (compilation happens in the warm-up).
The roofline % is achieved FLOP/s (FLOPs per image from torch.utils.flop_counter × images/s) over the
matmul FLOP/s this device measures in the same run, as nanoGPT reports MFU. `time_to_98` runs the real
training command with `--target-accuracy 0.98` and reads the wall seconds from its metrics.json.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lenet_dist.config import TrainConfig, flag, option, parse_config, require_at_least
from lenet_dist.data import InMemoryMNIST, ensure_dataset, load_split, make_loader, seed_style_dataset
from lenet_dist.errors import UserError, exit_on_user_error
from lenet_dist.model import LeNet5
from lenet_dist.profiling import profiler_for
from lenet_dist.train import build_model_and_optimizer

# The seed's loader (batch 64, no worker processes): the baseline every speed-up is measured against.
SEED_BATCH, SEED_WORKERS = 64, 0
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class BenchConfig:
    quick: bool = flag(False, "a small matrix (cpu, fp32, eager, batch 64 and 128) that runs in under a minute")
    devices: str | None = flag(None, "comma-separated devices (default: cpu and every cuda:N)")
    pipelines: str = flag("torchvision,tensor", "comma-separated data pipelines")
    precisions: str | None = flag(None, "comma-separated: no,bf16,fp16 (default: no,bf16; fp16 too on CUDA)")
    compile_modes: str = flag("eager,compile", "comma-separated: eager,compile")
    batch_sizes: str = flag("64,128,512", "comma-separated batch sizes")
    windows: int = flag(5, "timed windows per measurement (the median is reported)")
    rounds: int = flag(3, "passes over the whole matrix; each row reports the median of its passes")
    window_images: int = flag(8192, "images per timed window (at least 4 batches)")
    time_to_98: bool = flag(True, "also time the real training command to 98%% test accuracy")
    ddp_scaling: bool = flag(True, "also compare 1 CPU process × 2 threads with 2 processes × 1 thread")
    ddp_repeats: int = flag(3, "runs of each DDP scaling command, alternating (the median is reported)")
    data_dir: str | None = flag(None, "MNIST folder (default: $LENET_DATA_DIR, else ./data)")
    json: str | None = flag(None, "write every row and the machine description here")
    chart: str | None = flag(None, "write a PNG bar chart of training images/s here")
    profile: bool = flag(False, "profile the default recipe's row on each device into --profile-dir/bench-<time>/")
    profile_dir: str = flag("profiles", "where profiler traces go")

    def __post_init__(self) -> None:
        require_at_least(self, {"windows": 5, "rounds": 1, "ddp_repeats": 1})  # 5 windows: a meaningful median
        if self.quick:
            self.pipelines, self.precisions, self.compile_modes = "torchvision,tensor", "no", "eager"
            self.batch_sizes, self.window_images, self.ddp_scaling, self.rounds = "64,128", 2048, False, 1
        for name, allowed in (
            ("pipelines", {"torchvision", "tensor"}),
            ("compile_modes", {"eager", "compile"}),
            ("precisions", {"no", "bf16", "fp16"}),
        ):
            unknown = set(_split(getattr(self, name) or "")) - allowed
            if unknown:
                raise UserError(f"{option(name)}: unknown {sorted(unknown)}; choose from {sorted(allowed)}")

    def device_list(self) -> list[torch.device]:
        if self.devices:
            names = _split(self.devices)
        else:
            names = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        for name in names:
            if name.startswith("cuda") and not torch.cuda.is_available():
                raise UserError(f"--devices names {name} but this machine has no CUDA device")
        return [torch.device(name) for name in names]

    def precision_list(self, device: torch.device) -> list[str]:
        if self.precisions:
            return _split(self.precisions)
        return ["no", "bf16", "fp16"] if device.type == "cuda" else ["no", "bf16"]


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops_per_second(device: torch.device, precision: str) -> float:
    """The device's dense matmul rate in this precision: the ceiling the roofline % is measured against."""
    size = 4096 if device.type == "cuda" else 2048
    dtype = AUTOCAST_DTYPES.get(precision, torch.float32)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    rates = []
    for _ in range(7):
        synchronize(device)
        started = time.perf_counter()
        for _ in range(4):
            a @ b
        synchronize(device)
        rates.append(4 * 2 * size**3 / (time.perf_counter() - started))
    return max(rates)


def training_flops_per_image(batch_size: int = 64) -> float:
    """Forward + backward FLOPs of one training image, counted by torch's own flop counter."""
    model = LeNet5()
    images, labels = torch.randn(batch_size, 1, 28, 28), torch.randint(0, 10, (batch_size,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(images), labels).backward()
    return counter.get_total_flops() / batch_size


def inference_flops_per_image(batch_size: int = 64) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        LeNet5()(torch.randn(batch_size, 1, 28, 28))
    return counter.get_total_flops() / batch_size


def endless(loader) -> Iterator:
    while True:
        yield from loader


def build_loader(pipeline: str, device: torch.device, data_dir: Path, train: bool, batch_size: int):
    if pipeline == "tensor":
        split = load_split(data_dir, "train" if train else "test")
        return make_loader(InMemoryMNIST(split, device), batch_size, shuffle=train, workers=0)
    # exactly the seed's loader: a plain DataLoader, no worker processes
    return make_loader(
        seed_style_dataset(data_dir, train=train), batch_size, shuffle=train, workers=SEED_WORKERS,
        pin_memory=device.type == "cuda",
    )


def timed_windows(step, device: torch.device, steps_per_window: int, windows: int, batch_size: int) -> float:
    """Median images/s over `windows` windows; `step()` runs one batch."""
    rates = []
    for _ in range(windows):
        synchronize(device)
        started = time.perf_counter()
        for _ in range(steps_per_window):
            step()
        synchronize(device)
        rates.append(steps_per_window * batch_size / (time.perf_counter() - started))
    return statistics.median(rates)


def measure_row(
    bench: BenchConfig, device: torch.device, pipeline: str, precision: str, compiled: bool, batch_size: int,
    data_dir: Path, profiler: Any,
) -> dict[str, float]:
    torch.manual_seed(0)
    default = TrainConfig()
    if pipeline == "tensor":  # the tuned rows train as `lenet-dist train` does; torchvision rows as the seed did
        model, optimizer = build_model_and_optimizer(default)
    else:
        model = LeNet5()
        optimizer = torch.optim.Adam(model.parameters(), lr=default.lr)
    model.to(device)  # in place: the optimizer keeps the same parameters
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    if compiled:
        # every row compiles afresh: rows sharing one cache would exhaust dynamo's recompile limit (8 per
        # code object) and the later "compile" rows would silently run eager
        torch.compiler.reset()
    network = torch.compile(model) if compiled else model
    steps_per_window = max(4, bench.window_images // batch_size)

    batches = endless(build_loader(pipeline, device, data_dir, True, batch_size))

    def train_step() -> None:
        images, labels = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, precision):
            loss = F.cross_entropy(network(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        profiler.step()

    network.train()
    for _ in range(max(3, steps_per_window // 2)):  # warm-up: worker start, allocator, compilation
        train_step()
    train_rate = timed_windows(train_step, device, steps_per_window, bench.windows, batch_size)

    test_batches = endless(build_loader(pipeline, device, data_dir, False, batch_size))

    @torch.no_grad()
    def inference_step() -> None:
        images, _ = next(test_batches)
        with autocast(device, precision):
            network(images.to(device, non_blocking=True)).argmax(dim=1)

    network.eval()
    for _ in range(3):
        inference_step()
    inference_rate = timed_windows(inference_step, device, steps_per_window, bench.windows, batch_size)
    return {"train_images_per_second": train_rate, "inference_images_per_second": inference_rate}


def time_to_98(device: torch.device, pipeline: str, data_dir: Path) -> float | None:
    """Wall seconds of the real default recipe until test accuracy first reaches 98 % (None if never)."""
    with tempfile.TemporaryDirectory() as output_dir:
        command = [
            sys.executable, "-m", "lenet_dist.train", "--target-accuracy", "0.98", "--epochs", "2",
            "--data-pipeline", pipeline, "--data-dir", str(data_dir), "--output-dir", output_dir,
            *(["--workers", str(SEED_WORKERS)] if pipeline == "torchvision" else []),
        ]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "" if device.type == "cpu" else str(device.index or 0)}
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
        if result.returncode != 0:
            raise UserError(f"time_to_98 training run failed: {result.stderr.strip().splitlines()[-1]}")
        epochs = json.loads((Path(output_dir) / "metrics.json").read_text())["epochs"]
    reached = [e["elapsed_seconds"] for e in epochs if e["test_accuracy"] >= 0.98]
    return reached[0] if reached else None


def ddp_scaling(data_dir: Path, batch_sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    """Second-epoch training images/s of the real train command: 1 process × all threads vs 2 × 1 thread.

    The fixed cost of each step (a gloo all-reduce of 61,706 gradients, Python) is split over fewer
    images per process at small batches, so scaling is measured at more than one global batch. The two
    commands alternate `repeats` times and each reports its median, so a noisy minute on a shared
    machine does not land on one side only.
    """
    launchers = {
        "single_process": [sys.executable, "lenet_dist/train.py"],
        "two_processes": [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
                          "launch/cpu_ddp.yaml", "lenet_dist/train.py"],
    }
    results = []
    for batch_size in batch_sizes:
        runs: dict[str, list[float]] = {name: [] for name in launchers}
        for name, launcher in [*launchers.items()] * repeats:
            with tempfile.TemporaryDirectory() as output_dir:
                command = [*launcher, "--epochs", "2", "--batch-size", str(batch_size), "--data-dir", str(data_dir),
                           "--output-dir", output_dir]
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
                if name == "single_process":
                    env["OMP_NUM_THREADS"] = str(os.cpu_count())
                result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
                if result.returncode != 0:
                    raise UserError(f"DDP scaling run {name} failed: {result.stderr.strip().splitlines()[-1]}")
                epochs = json.loads((Path(output_dir) / "metrics.json").read_text())["epochs"]
                runs[name].append(epochs[-1]["train_images_per_second"])
        rates = {name: statistics.median(run_rates) for name, run_rates in runs.items()}
        results.append({
            "batch_size": batch_size,
            **{f"{name}_images_per_second": rate for name, rate in rates.items()},
            **{f"{name}_runs": runs[name] for name in runs},
            "scaling_efficiency": rates["two_processes"] / rates["single_process"],
        })
    return results


def machine() -> dict[str, Any]:
    description = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                description["cpu"] = line.split(":", 1)[1].strip()
                break
    return description


def run_bench(bench: BenchConfig) -> dict[str, Any]:
    data_dir = TrainConfig(data_dir=bench.data_dir).resolved_data_dir()
    ensure_dataset(data_dir)
    flops_train, flops_infer = training_flops_per_image(), inference_flops_per_image()
    rows: list[dict[str, Any]] = []
    peaks: dict[str, float] = {}
    default = TrainConfig()
    profile_dir = Path(bench.profile_dir) / f"bench-{datetime.now():%Y%m%d-%H%M%S}"
    cells = []
    for device in bench.device_list():
        for precision in bench.precision_list(device):
            peaks[f"{device}/{precision}"] = matmul_flops_per_second(device, precision)
        cells += [(device, *cell) for cell in itertools.product(
            _split(bench.pipelines), bench.precision_list(device), _split(bench.compile_modes),
            [int(b) for b in _split(bench.batch_sizes)],
        )]
    rounds: dict[tuple, list[dict[str, float]]] = {cell: [] for cell in cells}
    # Whole passes over the matrix, not repeats of one row: on a shared machine a noisy minute then
    # lands on every row once instead of deciding one row's number, and so one ratio.
    for round_index in range(bench.rounds):
        for cell in cells:
            device, pipeline, precision, compile_mode, batch_size = cell
            recipe = (pipeline, precision, compile_mode, batch_size) == ("tensor", "no", "eager", default.batch_size)
            profile = bench.profile and recipe and round_index == 0
            worker = f"{device}-{pipeline}-{precision}-{compile_mode}-b{batch_size}".replace(":", "")
            with profiler_for(replace(default, profile=profile), profile_dir, worker) as profiler:
                rounds[cell].append(measure_row(
                    bench, device, pipeline, precision, compile_mode == "compile", batch_size, data_dir, profiler
                ))
            row = _row(cell, rounds[cell][-1], peaks, flops_train, flops_infer)
            print(f"round {round_index + 1}/{bench.rounds} {_row_line(row)}", flush=True)
    for cell, measured in rounds.items():
        median = {name: statistics.median(m[name] for m in measured) for name in measured[0]}
        rows.append({
            **_row(cell, median, peaks, flops_train, flops_infer),
            **{f"{name}_rounds": [m[name] for m in measured] for name in measured[0]},
        })
    if bench.time_to_98:
        # the seed-style run adds ~15 s on a 2-core CPU: too long for --quick
        timed_pipelines = ["tensor"] if bench.quick else _split(bench.pipelines)
        for device in bench.device_list():
            for pipeline in timed_pipelines:
                seconds = time_to_98(device, pipeline, data_dir)
                for row in rows:
                    if (row["device"], row["pipeline"], row["precision"], row["compile"], row["batch_size"]) == (
                        str(device), pipeline, "no", "eager", default.batch_size
                    ):
                        row["time_to_98"] = seconds
                print(f"time_to_98 {device} {pipeline}: {seconds} s", flush=True)
    _add_speedups(rows)
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "bench_config": asdict(bench),
        "peak_matmul_flops_per_second": peaks,
        "rows": rows,
        "ddp_scaling": ddp_scaling(data_dir, [default.batch_size, 512], bench.ddp_repeats)
        if bench.ddp_scaling and "cpu" in map(str, bench.device_list()) else None,
    }


def _row(
    cell: tuple, measured: dict[str, float], peaks: dict[str, float], flops_train: float, flops_infer: float
) -> dict[str, Any]:
    device, pipeline, precision, compile_mode, batch_size = cell
    peak = peaks[f"{device}/{precision}"]
    return {
        "device": str(device), "pipeline": pipeline, "precision": precision, "compile": compile_mode,
        "batch_size": batch_size, **measured,
        "train_flops_per_image": flops_train,
        "roofline_percent": 100 * measured["train_images_per_second"] * flops_train / peak,
        "inference_roofline_percent": 100 * measured["inference_images_per_second"] * flops_infer / peak,
        "time_to_98": None,
    }


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    """Each row's training rate over the seed's (torchvision pipeline, batch 64, fp32, eager) on its device."""
    for row in rows:
        seed = [
            r for r in rows
            if (r["device"], r["pipeline"], r["precision"], r["compile"], r["batch_size"])
            == (row["device"], "torchvision", "no", "eager", SEED_BATCH)
        ]
        row["speedup_vs_seed"] = row["train_images_per_second"] / seed[0]["train_images_per_second"] if seed else None


def _row_line(row: dict[str, Any]) -> str:
    return (
        f"{row['device']:>7} {row['pipeline']:>11} {row['precision']:>4} {row['compile']:>7} b{row['batch_size']:<5}"
        f" train {row['train_images_per_second']:>12,.0f}/s  infer {row['inference_images_per_second']:>12,.0f}/s"
        f"  roofline {row['roofline_percent']:5.1f}%"
    )


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"lenet-dist bench — {result['machine']['cpu']} ({result['machine']['cpu_count']} cores)"
                  + (f", {', '.join(result['machine']['gpus'])}" if result["machine"]["gpus"] else ""))
    for column in ("device", "pipeline", "precision", "compile", "batch", "train img/s", "infer img/s",
                   "roofline %", "× seed", "time_to_98 s"):
        table.add_column(column, justify="right")
    for row in result["rows"]:
        table.add_row(
            row["device"], row["pipeline"], row["precision"], row["compile"], str(row["batch_size"]),
            f"{row['train_images_per_second']:,.0f}", f"{row['inference_images_per_second']:,.0f}",
            f"{row['roofline_percent']:.1f}",
            "" if row["speedup_vs_seed"] is None else f"{row['speedup_vs_seed']:.1f}",
            "" if row["time_to_98"] is None else f"{row['time_to_98']:.1f}",
        )
    console = Console()
    if not console.is_terminal:  # logs and files: never truncate a column to fit 80 characters
        console = Console(width=160)
    console.print(table)
    for scaling in result["ddp_scaling"] or []:
        console.print(
            f"CPU DDP scaling, global batch {scaling['batch_size']}: 1 process × {result['machine']['cpu_count']} "
            f"threads {scaling['single_process_images_per_second']:,.0f} img/s, 2 processes × 1 thread "
            f"{scaling['two_processes_images_per_second']:,.0f} img/s: efficiency {scaling['scaling_efficiency']:.0%}"
        )


def save_chart(result: dict[str, Any], path: Path) -> Path:
    from matplotlib.figure import Figure

    rows = result["rows"]
    labels = [f"{r['device']} {r['pipeline']} {r['precision']} {r['compile']} b{r['batch_size']}" for r in rows]
    figure = Figure(figsize=(9, 0.32 * len(rows) + 1.2), layout="constrained")
    axes = figure.subplots()
    colors = ["tab:gray" if r["pipeline"] == "torchvision" else "tab:blue" for r in rows]
    axes.barh(labels, [r["train_images_per_second"] for r in rows], color=colors)
    axes.set_xscale("log")
    axes.invert_yaxis()
    axes.set_xlabel("training images/s (median of timed windows; grey: seed-style pipeline)")
    axes.set_title(f"LeNet-5 training throughput, {result['date'][:10]}")
    figure.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> None:
    with exit_on_user_error():
        run(parse_config(BenchConfig, argv, prog="lenet-dist bench", description=__doc__.splitlines()[0]))


def run(bench: BenchConfig) -> dict[str, Any]:
    result = run_bench(bench)
    print_table(result)
    if bench.json:
        Path(bench.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {bench.json}")
    if bench.chart:
        print(f"wrote {save_chart(result, Path(bench.chart))}")
    return result


if __name__ == "__main__":
    main()
