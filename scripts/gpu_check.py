"""`make gpu-check`: what one CUDA GPU must show, as a verdict, in one call of under 8 minutes.

Each stage runs in a process of its own under its own time limit and asserts what it must show; the
check goes on after a stage fails or hangs. It ends in one table (verdict.txt), one JSON file
(verdict.json) and one log (gpu-check.log) in --out ($OUT when set, else gpu-check/), and exits 1 if
any stage failed, timed out or was left out for lack of time.

It runs with the machine's own python3 (torch ≥ 2.11, accelerate, rich, matplotlib, safetensors,
pytest): no venv, no install, no network. MNIST travels with the checkout as gzipped IDX files:

    make gpu-data                              # here: gpu-data/MNIST/raw/*.gz (~11 MB, git-ignored)
    scripts/gpu-check --data-dir gpu-data      # there, with gpu-data carried along with the checkout

--rehearse runs every stage's CPU analogue on a small slice of MNIST, so that the verdict machinery
(limits, failures, the JSON, the exit status) is tested by the suite before a GPU is at hand;
--inject STAGE=fail|hang makes a stage fail or hang, to show the others go on.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import runpy
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TRAIN = [PYTHON, "-m", "lenet_dist.train", "--no-progress"]
LAUNCH = [PYTHON, "-m", "accelerate.commands.launch"]
BUDGET_SECONDS = 480  # the whole check; a stage gets at most what is left


@dataclass(frozen=True)
class Sizes:
    """What a stage trains on a GPU, and on the CPU when rehearsing."""

    batch: int  # the training runs' global batch
    steps: int  # graph-against-eager steps
    throughput_batches: tuple[int, ...]
    window_images: int  # images per timed throughput window (at least 20 steps)
    precisions: tuple[str, ...]
    checkpoint_every: int
    resume_at: int  # the eager checkpoint the graphed run resumes from
    cpu_resume_at: int  # the graphed checkpoint the CPU resumes from


GPU = Sizes(batch=512, steps=60, throughput_batches=(64, 128, 512, 4096, 16384), window_images=65536,
            precisions=("no", "bf16"), checkpoint_every=40, resume_at=80, cpu_resume_at=200)
REHEARSAL = Sizes(batch=256, steps=12, throughput_batches=(32, 128), window_images=512, precisions=("no",),
                  checkpoint_every=4, resume_at=8, cpu_resume_at=24)
TRAIN_IMAGES_REHEARSED, TEST_IMAGES_REHEARSED = 4096, 1000


class Context:
    """What every stage gets: where it works, the data, the sizes, and a way to run real commands."""

    def __init__(self, work: Path, data_dir: Path, rehearse: bool, log: Path) -> None:
        self.work, self.data_dir, self.rehearse, self.log = work, data_dir, rehearse, log
        self.sizes = REHEARSAL if rehearse else GPU
        self.device = "cpu" if rehearse else "cuda"

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, **extra}  # main() set the data, HF_HOME and the backend before importing torch

    def command(self, command: list[str], env: dict[str, str] | None = None,
                expect: int = 0) -> subprocess.CompletedProcess:
        """Run a real command from the checkout, its output appended to the log; fail on another exit status.
        `python -m <module>` in this stage's environment is forked from this process, which has torch imported."""
        env = env or self.env()
        if command[:2] == [PYTHON, "-m"] and env == dict(os.environ) and not cuda_initialized():
            result = forked(command, env)
        else:
            result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
        with self.log.open("a") as log:
            log.write(f"$ {' '.join(command)}\n{result.stdout}{result.stderr}(exit {result.returncode})\n")
        if result.returncode != expect:
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-3:])
            raise AssertionError(f"`{' '.join(command[2:6])} …` exited {result.returncode}: {tail}")
        return result

    def train(self, output: str, *flags: str, launcher: list[str] | None = None,
              env: dict[str, str] | None = None) -> dict[str, Any]:
        """A real training run into work/<output>; its metrics.json."""
        folder = self.work / output
        self.command([*(launcher or TRAIN), *flags, "--output-dir", str(folder)], env=env)
        return json.loads((folder / "metrics.json").read_text())


def cuda_initialized() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_initialized()  # a forked child could not use CUDA then


def forked(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python -m <module> …` as a process forked from this one: its own output and exit status, without
    importing torch again (2-5 s a command)."""
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.chdir(ROOT)
                os.dup2(stdout.fileno(), 1)
                os.dup2(stderr.fileno(), 2)
                sys.argv = [command[2], *command[3:]]
                runpy.run_module(command[2], run_name="__main__", alter_sys=True)
                status = 0
            except SystemExit as exiting:
                status = exiting.code if isinstance(exiting.code, int) else int(exiting.code is not None)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        _, wait_status = os.waitpid(pid, 0)
        outputs = []
        for file in (stdout, stderr):
            file.seek(0)
            outputs.append(file.read().decode(errors="replace"))
    return subprocess.CompletedProcess(command, os.waitstatus_to_exitcode(wait_status), *outputs)


# ---------------------------------------------------------------- stages: each returns facts or raises


def environment(ctx: Context) -> dict[str, Any]:
    import accelerate
    import torch

    facts: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                             "accelerate": accelerate.__version__, "cuda_available": torch.cuda.is_available()}
    if ctx.rehearse:
        return facts
    assert torch.cuda.is_available(), "torch sees no CUDA device"
    properties = torch.cuda.get_device_properties(0)
    facts |= {
        "gpu": properties.name, "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "memory_gib": round(properties.total_memory / 2**30, 1), "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "nccl": str(torch.cuda.nccl.version()),
        # what "precision no" means here: TF32 convolutions by default, IEEE matmuls
        "tf32_convolutions": torch.backends.cudnn.conv.fp32_precision,
        "tf32_matmul": torch.backends.cuda.matmul.fp32_precision,
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        facts["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=20).stdout.strip()
    return facts


def unit_tests(ctx: Context) -> dict[str, Any]:
    selection = ["tests/test_steps.py"] if ctx.rehearse else ["-m", "gpu", "tests/test_gpu.py"]
    result = ctx.command([PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection])
    summary = result.stdout.strip().splitlines()[-1]
    assert "skipped" not in summary and "passed" in summary, summary
    return {"pytest": summary}


def graph_equals_eager(ctx: Context) -> dict[str, Any]:
    """The captured step against the eager one, from the same weights on the same real batches, for Adam and for
    Muon: the losses must be the same, step after step."""
    import torch
    from accelerate import Accelerator

    from lenet_dist.bench.measure import AUTOCAST_DTYPES
    from lenet_dist.config import TrainConfig
    from lenet_dist.data import InMemoryDataset, ShuffledBatches, load_split
    from lenet_dist.recipe.build import build_model, build_optimizer
    from lenet_dist.recipe.lr_schedule import build_lr_scheduler
    from lenet_dist.steps import EagerStep, GraphedStep

    device = torch.device(ctx.device)
    batch = 128 if not ctx.rehearse else 32
    data = ShuffledBatches(InMemoryDataset(load_split(ctx.data_dir, "train", "mnist"), device), batch, 0, 0, 1)
    batches = list(itertools.islice(data.epoch(0), ctx.sizes.steps))
    accelerator = Accelerator(cpu=ctx.rehearse)
    facts = {}
    tolerance = {"no": 1e-3, "bf16": 2e-2}
    for optimizer_name, precision in itertools.product(("adam", "muon"), ctx.sizes.precisions):
        losses = []
        for graphed in (False, True):
            torch.manual_seed(0)
            config = TrainConfig(optimizer=optimizer_name)
            model = build_model(config, num_classes=10).to(device)
            network = Autocast(model, AUTOCAST_DTYPES.get(precision))
            optimizer = build_optimizer(config, model, graph=graphed)
            scheduler = build_lr_scheduler(config, optimizer, steps_per_epoch=len(batches))
            step = (GraphedStep(network, optimizer, scheduler, batch, device, capture=not ctx.rehearse) if graphed
                    else EagerStep(accelerator, network, optimizer, scheduler))
            assert not graphed or ctx.rehearse or step.graph is not None
            losses.append(torch.stack([step(images, labels)[0] for images, labels in batches]).float().cpu())
        eager, graph = losses
        relative = ((graph - eager).abs() / eager.abs()).max().item()
        case = f"{optimizer_name} {precision}"
        facts[case] = {"steps": len(batches), "max_relative_loss_difference": relative,
                       "first_loss": eager[0].item(), "last_loss": eager[-1].item()}
        assert relative <= tolerance[precision], f"{case}: graphed and eager losses differ by {relative:.2e}"
        assert eager[-1] < eager[0], f"{case}: the loss did not fall"
    return facts


class Autocast:
    """A model under autocast, as accelerate's prepare wraps it for mixed precision."""

    def __init__(self, model: Any, dtype: Any) -> None:
        self.model, self.dtype = model, dtype

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, images: Any) -> Any:
        import torch

        if self.dtype is None:
            return self.model(images)
        with torch.autocast(images.device.type, dtype=self.dtype, cache_enabled=False):  # as training's
            return self.model(images).float()


def throughput(ctx: Context) -> dict[str, Any]:
    """Training images/s of the eager step and of the graph at the same batch, on real batches in memory."""
    import torch
    from accelerate import Accelerator

    from lenet_dist.config import TrainConfig
    from lenet_dist.data import InMemoryDataset, ShuffledBatches, load_split
    from lenet_dist.recipe.build import build_model, build_optimizer
    from lenet_dist.recipe.lr_schedule import build_lr_scheduler
    from lenet_dist.steps import EagerStep, GraphedStep

    device = torch.device(ctx.device)
    dataset = InMemoryDataset(load_split(ctx.data_dir, "train", "mnist"), device)
    accelerator = Accelerator(cpu=ctx.rehearse)
    rows = {}
    for batch in ctx.sizes.throughput_batches:
        data = ShuffledBatches(dataset, batch, 0, 0, 1)
        rates = {}
        for graphed in (False, True):
            torch.manual_seed(0)
            config = TrainConfig(batch_size=batch)
            model = build_model(config, num_classes=10).to(device)
            optimizer = build_optimizer(config, model, graph=graphed)
            scheduler = build_lr_scheduler(config, optimizer, steps_per_epoch=10**6)
            step = (GraphedStep(model, optimizer, scheduler, batch, device, capture=not ctx.rehearse) if graphed
                    else EagerStep(accelerator, model, optimizer, scheduler))
            rates["graph" if graphed else "eager"] = images_per_second(step, data, batch, device,
                                                                       ctx.sizes.window_images)
        rows[batch] = {**rates, "graph_over_eager": rates["graph"] / rates["eager"]}
    smallest = rows[min(rows)]
    assert all(rate > 0 for row in rows.values() for rate in (row["eager"], row["graph"]))
    if not ctx.rehearse:  # launching LeNet's ~40 small kernels one by one is what a graph saves
        assert smallest["graph_over_eager"] > 1, f"the graph is not faster at batch {min(rows)}: {smallest}"
    return {"train_images_per_second": rows, "ceiling_images_per_second": max(max(r["eager"], r["graph"])
                                                                               for r in rows.values())}


def images_per_second(step: Callable, data: Any, batch: int, device: Any, window_images: int) -> float:
    """The median of three timed windows of `window_images` images (at least 20 steps), after a warm-up."""
    import torch

    def batches():
        epoch = 0
        while True:
            yield from data.epoch(epoch)
            epoch += 1

    stream = batches()
    steps = max(20, window_images // batch)
    for _ in range(5):
        step(*next(stream))
    rates = []
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            step(*next(stream))
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(steps * batch / (time.perf_counter() - started))
    return statistics.median(rates)


def recipe(ctx: Context) -> dict[str, Any]:
    """The default 2-epoch run and the fast-to-98 % run, as a user starts them."""
    if ctx.rehearse:
        metrics = ctx.train("recipe-default", "--epochs", "1", "--batch-size", str(ctx.sizes.batch))
        return {"final_test_accuracy": metrics["final_test_accuracy"]}
    default = ctx.train("recipe-default")
    fast = ctx.train("recipe-fast-to-98", "--recipe", "fast-to-98")
    assert default["cuda_graph"] and fast["cuda_graph"], "the default run on one GPU must capture its step"
    assert default["final_test_accuracy"] >= 0.98, f"default run ended at {default['final_test_accuracy']:.2%}"
    assert fast["reached_target"], "the fast-to-98 run did not reach 98 %"
    return {
        "default": {key: default[key] for key in ("final_test_accuracy", "train_seconds", "eval_seconds")}
        | {"train_images_per_second": [e["train_images_per_second"] for e in default["epochs"]]},
        "fast_to_98": {"time_to_98": fast["reached_target"]["elapsed_seconds"],
                       "images": fast["reached_target"]["images"], "step": fast["reached_target"]["step"]},
    }


def resume(ctx: Context) -> dict[str, Any]:
    """An eager run's checkpoint resumed into the CUDA graph; the graphed run's checkpoint resumed on the CPU."""
    sizes = ctx.sizes
    common = ["--epochs", "2", "--batch-size", str(sizes.batch), "--checkpoint-every", str(sizes.checkpoint_every),
              "--keep-checkpoints", "100"]
    eager = ctx.train("resume-eager", *common, "--no-cuda-graph")
    graphed = ctx.train("resume-graphed", *common, "--resume", checkpoint(ctx, "resume-eager", sizes.resume_at))
    cpu = ctx.train("resume-cpu", *common, "--resume", checkpoint(ctx, "resume-graphed", sizes.cpu_resume_at),
                    env=None if ctx.rehearse else ctx.env(CUDA_VISIBLE_DEVICES=""))  # on the CPU already
    assert cpu["device"] == "cpu", cpu["device"]
    if not ctx.rehearse:
        assert graphed["cuda_graph"] and not eager["cuda_graph"]
    accuracies = {"eager": eager["final_test_accuracy"], "eager_then_graphed": graphed["final_test_accuracy"],
                  "graphed_then_cpu": cpu["final_test_accuracy"]}
    spread = max(accuracies.values()) - min(accuracies.values())
    assert spread <= 0.005, f"resumed runs end apart: {accuracies}"
    return accuracies


def checkpoint(ctx: Context, run: str, step: int) -> str:
    path = ctx.work / run / "checkpoints" / f"step-{step:08d}"
    assert (path / "progress.json").is_file(), f"no checkpoint {path}"
    return str(path)


def ddp(ctx: Context) -> dict[str, Any]:
    """DDP through accelerate's launcher: one process on the GPU over NCCL (two CPU processes over gloo when
    rehearsing), eager, every test image counted once; then a SIGTERM under `lenet-dist launch`: exit 143,
    one line, no NCCL warning about a process group left behind. The CPU config, on a machine with a GPU,
    must keep to the CPUs."""
    config, processes = ("cpu_ddp.yaml", 2) if ctx.rehearse else ("multi_gpu.yaml", 1)
    flags = ["--config_file", str(ROOT / "lenet_dist" / "launch_configs" / config), "--num_processes",
             str(processes), "-m", "lenet_dist.train", "--no-progress", "--batch-size", str(ctx.sizes.batch)]
    metrics = ctx.train("ddp", "--epochs", "1", launcher=[*LAUNCH, "--main_process_port", str(free_port()), *flags])
    assert metrics["world_size"] == processes and metrics["distributed_type"] != "NO", metrics["distributed_type"]
    assert not metrics["cuda_graph"], "a DDP step must not be captured"
    assert all(e["eval_samples"] == test_images(ctx) for e in metrics["evaluations"])
    facts = {key: metrics[key] for key in ("distributed_type", "world_size", "device", "final_test_accuracy")}

    folder, every = ctx.work / "ddp-stopped", ctx.sizes.checkpoint_every
    command = [PYTHON, "-m", "lenet_dist", "launch", "--main_process_port", str(free_port()), *flags, "--epochs",
               "100", "--checkpoint-every", str(every), "--output-dir", str(folder)]
    process = subprocess.Popen(command, cwd=ROOT, env=ctx.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    first = folder / "checkpoints" / f"step-{every:08d}" / "progress.json"
    while not first.exists() and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=90)
    with ctx.log.open("a") as log:
        log.write(f"$ {' '.join(command)}  (SIGTERM after {first.parent.name})\n{stdout}{stderr}\n")
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert process.returncode == 128 + signal.SIGTERM, f"exit {process.returncode}: {lines[-3:]}"
    assert "Traceback" not in stderr and "destroy_process_group" not in stderr, lines[-5:]
    assert lines[-1].startswith("lenet-dist launch: SIGTERM: every rank"), lines[-3:]
    facts["sigterm"] = {"exit": process.returncode, "stderr_lines": len(lines)}

    if not ctx.rehearse:
        cpu_config = ["--config_file", str(ROOT / "lenet_dist" / "launch_configs" / "cpu_ddp.yaml")]
        metrics = ctx.train("cpu-ddp", "--target-accuracy", "0.9", "--batch-size", str(ctx.sizes.batch),
                            launcher=[*LAUNCH, *cpu_config, "--main_process_port", str(free_port()), "-m",
                                      "lenet_dist.train", "--no-progress"])
        assert metrics["device"].startswith("cpu") and metrics["world_size"] == 2, metrics["device"]
        facts["cpu_ddp_config_on_a_gpu_machine"] = metrics["device"]
    return facts


def compile_stage(ctx: Context) -> dict[str, Any]:
    """--compile on the device (inductor, no recompilation after the two graphs), and accelerate's own
    --dynamo_backend, which must count as compiling too (no graph capture of a compiled model)."""
    flags = ["--epochs", "1", "--batch-size", str(ctx.sizes.batch)]
    facts = {}
    if not ctx.rehearse:  # inductor's first compile takes a minute on the CPU: rehearsed by the suite elsewhere
        result_dir = ctx.work / "compiled"
        run = ctx.command([*TRAIN, *flags, "--compile", "--output-dir", str(result_dir)],
                          env=ctx.env(TORCH_LOGS="recompiles"))
        metrics = json.loads((result_dir / "metrics.json").read_text())
        recompiles = (run.stdout + run.stderr).count("Recompiling function")
        assert metrics["compile_seconds"] > 0 and not metrics["cuda_graph"]
        assert recompiles <= 1, f"{recompiles} recompilations (the evaluation graph is the one allowed)"
        facts["compile"] = {"compile_seconds": metrics["compile_seconds"], "recompilations": recompiles,
                            "train_images_per_second": metrics["epochs"][0]["train_images_per_second"]}
    backend = "eager" if ctx.rehearse else "inductor"
    launcher = [*LAUNCH, "--num_processes", "1", "--dynamo_backend", backend, "-m", "lenet_dist.train",
                "--no-progress"]
    metrics = ctx.train("dynamo-backend", *flags, launcher=launcher)
    assert metrics["compile_seconds"] > 0 and not metrics["cuda_graph"], "accelerate's dynamo setting went unseen"
    facts["accelerate_dynamo_backend"] = {"backend": backend, "compile_seconds": metrics["compile_seconds"]}
    return facts


def profile(ctx: Context) -> dict[str, Any]:
    """A profiled run of the eager and of the graphed step, read back by `lenet-dist inspect`."""
    facts = {}
    for name, extra in (("eager", ["--no-cuda-graph"]), ("graphed", [])):
        if ctx.rehearse and name == "graphed":
            continue
        profiles = ctx.work / "profiles"
        ctx.train(f"profiled-{name}", "--epochs", "1", "--batch-size", str(ctx.sizes.batch), "--profile",
                  "--profile-wait", "2", "--profile-dir", str(profiles), *extra)
        traces = next(profiles.glob(f"profiled-{name}*"))
        report = json.loads(ctx.command([PYTHON, "-m", "lenet_dist", "inspect", str(traces), "--json", "-"]).stdout)
        worker = report["workers"]["rank0"]
        assert worker["steps"] == 5, worker["steps"]
        facts[name] = {"step_ms": worker["step_ms"]["median"], "conv_share": worker["conv_share"]}
        if ctx.rehearse:
            continue
        gpu = worker.get("gpu")
        assert gpu, "the trace holds no GPU kernels"
        by_operator = gpu["kernel_ms_per_step_by_operator"]
        facts[name] |= {"gpu_busy_share": gpu["busy_share"], "kernel_ms_per_step": gpu["kernel_ms_per_step"],
                        "top_operators": dict(list(by_operator.items())[:6])}
        if name == "eager":
            assert any("conv" in operator for operator in by_operator), by_operator
        keep = sorted(traces.glob("rank0.*"))[-1]
        shutil.copy(keep, ctx.log.parent / f"trace-{name}{''.join(keep.suffixes[-3:])}")
    return facts


def deterministic(ctx: Context) -> dict[str, Any]:
    """--deterministic on the device: the same run twice gives the same weights, bit for bit."""
    from safetensors.torch import load_file

    flags = ["--epochs", "1", "--batch-size", str(ctx.sizes.batch), "--deterministic"]
    runs = [ctx.train(f"deterministic-{index}", *flags) for index in (1, 2)]
    weights = [load_file(str(ctx.work / f"deterministic-{index}" / "model.safetensors")) for index in (1, 2)]
    same = all((weights[0][name] == weights[1][name]).all().item() for name in weights[0])
    assert same and runs[0]["final_test_accuracy"] == runs[1]["final_test_accuracy"], "two runs differ"
    return {"final_test_accuracy": runs[0]["final_test_accuracy"], "identical": same}


STAGES: dict[str, tuple[Callable[[Context], dict[str, Any]], int]] = {  # in the order they run, with their limits
    "environment": (environment, 60),
    "unit_tests": (unit_tests, 150),
    "graph_equals_eager": (graph_equals_eager, 120),
    "throughput": (throughput, 150),
    "recipe": (recipe, 120),
    "resume": (resume, 150),
    "ddp": (ddp, 120),
    "profile": (profile, 120),
    "deterministic": (deterministic, 90),
    "compile": (compile_stage, 240),
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_images(ctx: Context) -> int:
    return TEST_IMAGES_REHEARSED if ctx.rehearse else 10_000


# ---------------------------------------------------------------- the runner


def rehearsal_data(source: Path, folder: Path) -> Path:
    """A slice of MNIST (the first 4,096 training and 1,000 test images) as flat gzipped IDX files."""
    import gzip

    from lenet_dist.data import SPLIT_FILES, load_split

    for split, count in (("train", TRAIN_IMAGES_REHEARSED), ("test", TEST_IMAGES_REHEARSED)):
        data = load_split(source, split, "mnist")
        for name, array in zip(SPLIT_FILES[split], (data.images[:count], data.labels[:count]), strict=True):
            header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.gz").write_bytes(gzip.compress(header + array.byte().numpy().tobytes(), 1))
    return folder


def in_a_fork(work: Callable[[], Any]) -> None:
    """Run `work` in a forked process: torch computing here would start thread pools that the forked stages
    inherit broken (their first parallel op would hang)."""
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            work()
            status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    if status:
        raise SystemExit(f"gpu-check: preparing the rehearsal's data failed (wait status {status})")


def preload() -> None:
    """What the stages use, imported once here (2-5 s), before they are forked; no CUDA call, so forking is safe."""
    import accelerate  # noqa: F401
    import torch._dynamo  # noqa: F401  (fused Adam imports it)

    import lenet_dist.train  # noqa: F401


def run_stage(name: str, work: Path, data_dir: Path, rehearse: bool, log: Path, injected: str | None) -> None:
    """In the stage's own process: run it and write work/<name>.json (its facts, or the error)."""
    outcome: dict[str, Any] = {}
    try:
        if injected == "hang":
            time.sleep(10**6)
        if injected == "fail":
            raise AssertionError("injected failure (--inject)")
        outcome["facts"] = STAGES[name][0](Context(work, data_dir, rehearse, log))
    except Exception as error:  # any failure is this stage's verdict, with its reason
        with log.open("a") as handle:
            handle.write(traceback.format_exc())
        outcome["error"] = f"{type(error).__name__}: {error}".strip()[:500]
    (work / f"{name}.json").write_text(json.dumps(outcome, indent=2, default=str))
    sys.exit(1 if "error" in outcome else 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-check")
    parser.add_argument("--data-dir", default=os.environ.get("LENET_DATA_DIR") or "data")
    parser.add_argument("--rehearse", action="store_true", help="the CPU analogue of every stage, small and fast")
    parser.add_argument("--only", help="comma-separated stages to run (default: all)")
    parser.add_argument("--inject", action="append", default=[], metavar="STAGE=fail|hang")
    parser.add_argument("--stage-limit", type=float, help="cap every stage's time limit (seconds)")
    parser.add_argument("--budget", type=float, default=BUDGET_SECONDS, help="seconds for the whole check")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    out = Path(args.out).resolve()
    injected = dict(item.split("=", 1) for item in args.inject)
    names = args.only.split(",") if args.only else list(STAGES)
    unknown = [name for name in [*names, *injected] if name not in STAGES]
    if unknown:
        parser.error(f"unknown stage {unknown[0]}; stages: {', '.join(STAGES)}")
    out.mkdir(parents=True, exist_ok=True)
    log = out / "gpu-check.log"
    log.write_text("")
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    data_dir = work / "data" if args.rehearse else Path(args.data_dir).resolve()
    # the stages' environment, set before the imports that read it (accelerate's HF_HOME, matplotlib's backend)
    os.environ.update(LENET_DATA_DIR=str(data_dir), PYTHONPATH=str(ROOT), HF_HOME=str(work / "hf"), MPLBACKEND="Agg")
    preload()
    if args.rehearse:
        in_a_fork(lambda: rehearsal_data(Path(args.data_dir).resolve(), data_dir))
    deadline = time.monotonic() + args.budget
    verdict = []
    for index, name in enumerate(names, 1):
        limit = min(STAGES[name][1], args.stage_limit or float("inf"), deadline - time.monotonic())
        verdict.append(supervise(name, limit, args, out, work, data_dir, log))
        print(f"[{index:2d}/{len(names)}] {verdict[-1]['stage']:<20} {verdict[-1]['status']:<9} "
              f"{verdict[-1]['seconds']:6.1f} s  {verdict[-1].get('error', '')}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return report(verdict, out, args.rehearse)


def supervise(name: str, limit: float, args: argparse.Namespace, out: Path, work: Path, data_dir: Path,
              log: Path) -> dict[str, Any]:
    """One stage in a process (and session) of its own, forked from this one so that it finds torch imported
    already: its outcome, or a timeout when it outlives `limit`."""
    if limit < 5:
        return {"stage": name, "status": "not run", "seconds": 0.0, "error": "no time left in the budget"}
    with log.open("a") as handle:
        handle.write(f"\n===== {name} (limit {limit:.0f} s)\n")
    injected = dict(item.split("=", 1) for item in args.inject).get(name)
    sys.stdout.flush()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.setsid()
            with log.open("a") as handle:
                for fd in (1, 2):
                    os.dup2(handle.fileno(), fd)
            run_stage(name, work, data_dir, args.rehearse, log, injected)
        except SystemExit as exiting:
            status = exiting.code
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    exited = None
    while exited is None and time.monotonic() - started < limit:
        time.sleep(0.05)
        if os.waitpid(pid, os.WNOHANG)[0]:
            exited = True
    if exited is None:
        os.killpg(pid, signal.SIGKILL)  # the stage and every process it started
        os.waitpid(pid, 0)
        return {"stage": name, "status": "timeout", "seconds": time.monotonic() - started,
                "error": f"still running after its limit of {limit:.0f} s"}
    seconds = time.monotonic() - started
    result_file = work / f"{name}.json"
    outcome = json.loads(result_file.read_text()) if result_file.is_file() else {
        "error": "the stage's process died without a verdict"}
    return {"stage": name, "status": "failed" if "error" in outcome else "passed", "seconds": seconds, **outcome}


def report(verdict: list[dict[str, Any]], out: Path, rehearse: bool) -> int:
    passed = all(stage["status"] == "passed" for stage in verdict)
    summary = {"passed": passed, "rehearsal": rehearse, "stages": verdict,
               "seconds": sum(stage["seconds"] for stage in verdict)}
    (out / "verdict.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    lines = [f"{'stage':<20} {'status':<9} {'seconds':>8}  facts or error"]
    for stage in verdict:
        detail = stage.get("error") or json.dumps(stage.get("facts", {}), default=str)
        lines.append(f"{stage['stage']:<20} {stage['status']:<9} {stage['seconds']:8.1f}  {detail}")
    lines.append(f"verdict: {'PASSED' if passed else 'FAILED'} ({summary['seconds']:.0f} s)")
    (out / "verdict.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
