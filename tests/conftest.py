"""Shared helpers: real data, real processes, the checks every test file makes the same way.

Tiers (pytest markers): unmarked tests run in-process or start one short process (`make check`);
`slow` ones train for real, `ddp` ones start several processes, `gpu` ones need CUDA (`make gpu-check`).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import forking
from lenet_dist import cli
from lenet_dist.bench.compare import label
from lenet_dist.bench.machine import describe_machine
from lenet_dist.bench.runs import free_port
from lenet_dist.config import TrainConfig
from lenet_dist.data import SPLIT_FILES
from lenet_dist.profiling.capture import run_trace_dir
from lenet_dist.recipe.build import build_model, build_optimizer
from lenet_dist.recipe.lr_schedule import build_lr_scheduler

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TRAIN = [sys.executable, "-m", "lenet_dist.train"]
# The folders `make data` fills (./data unless the variables say otherwise), made absolute: the tests start
# processes from other folders too, which read LENET_DATA_DIR the way a user's runs do.
os.environ["LENET_DATA_DIR"] = str((ROOT / os.environ.get("LENET_DATA_DIR", "data")).resolve())
FASHION_DIR = (ROOT / (os.environ.get("LENET_FASHION_DIR") or os.environ["LENET_DATA_DIR"])).resolve()
# The processes the tests start keep their temporary files (torchrun's log folders among them) in a folder of
# this session's, removed at its end; this process and pytest's own tmp_path go on using the system's.
SESSION_TMP = Path(tempfile.mkdtemp(prefix="lenet-dist-tests-"))
os.environ["TMPDIR"] = str(SESSION_TMP)
FIGURES = ("predictions.png", "training_curves.png", "confusion_matrix.png", "confident_mistakes.png")
RUN_FILES = (".lenet-dist.lock", "checkpoints", "config.json", "metrics.json", "model.safetensors", *FIGURES)


def pytest_configure(config) -> None:
    """SIGTERM stops the suite as Ctrl-C does, its fixtures' finalizers run (the SLURM daemons and network
    namespaces removed, not left running). A process forked from this one keeps the default."""
    suite = os.getpid()

    def interrupt(signum, frame) -> None:
        if os.getpid() != suite:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def pytest_sessionfinish(session, exitstatus) -> None:
    shutil.rmtree(SESSION_TMP, ignore_errors=True)


def pytest_terminal_summary(terminalreporter) -> None:
    """Name the machine under the summary: a suite's time means little without the CPU it ran on."""
    machine = describe_machine()
    terminalreporter.write_line(f"ran on {label(machine)}")


def pytest_collection_modifyitems(config, items) -> None:
    """Modules in the order `make test`'s two workers (pytest-xdist, a whole module each) take them: the SLURM and
    cluster tiers first (they mostly wait), then modules with slow tests, so that no long module starts last.
    Tests marked gpu are reported as skipped, with the reason, where there is no CUDA device."""
    def weight(item) -> int:
        return 0 if item.get_closest_marker("slurm") or item.get_closest_marker("cluster") else \
            1 if item.get_closest_marker("slow") else 2

    module_weight: dict = {}
    for item in items:
        module_weight[item.module] = min(module_weight.get(item.module, 2), weight(item))
    items.sort(key=lambda item: module_weight[item.module])  # stable: each module's own order kept
    if torch.cuda.is_available():
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device: run `make gpu-check` on one"))


def require_dataset(folder: Path, torchvision_class: str, name: str) -> Path:
    """The data set's folder; otherwise a one-line skip (a failure under CI=true, where data must be there)."""
    folder = folder.resolve()
    raw = folder / torchvision_class / "raw"
    if not any((raw / f"t10k-images-idx3-ubyte{suffix}").is_file() for suffix in ("", ".gz")):
        message = f"{name} not found in {raw}: run `make data` (downloads it when online)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return folder


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return require_dataset(Path(os.environ["LENET_DATA_DIR"]), "MNIST", "MNIST")


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    return require_dataset(FASHION_DIR, "FashionMNIST", "Fashion-MNIST")


SLICE_TRAIN_IMAGES, SLICE_TEST_IMAGES = 16_384, 2_000


def first_images(data_dir: Path, folder: Path, train: int, test: int) -> Path:
    """The first `train` training and `test` test images of MNIST, in torchvision's layout (so that the original
    script reads them too)."""
    from lenet_dist.data import load_split

    for split, count in (("train", train), ("test", test)):
        data = load_split(data_dir, split, "mnist")
        write_split(folder / "MNIST" / "raw", split, data.images[:count], data.labels[:count])
    return folder


@pytest.fixture(scope="session")
def mnist_slice(tmp_path_factory, data_dir) -> Path:
    """16,384 training and 2,000 test images: for tests of how runs start, stop and end, where a whole epoch would
    only cost time."""
    return first_images(data_dir, tmp_path_factory.mktemp("mnist-slice"), SLICE_TRAIN_IMAGES, SLICE_TEST_IMAGES)


@pytest.fixture(scope="session")
def mnist_sliver(tmp_path_factory, data_dir) -> Path:
    """4,096 training and 1,000 test images: for tests of what a command runs and reports, not what it learns."""
    return first_images(data_dir, tmp_path_factory.mktemp("mnist-sliver"), 4_096, 1_000)


@pytest.fixture(scope="session")
def sliced(mnist_slice) -> dict[str, str]:
    """The environment of runs on the MNIST slice: it as their data."""
    return {"LENET_DATA_DIR": str(mnist_slice)}


SHORT = ["--epochs", "1", "--batch-size", "256", "--no-progress"]  # 64 steps on the MNIST slice


@pytest.fixture(scope="session")
def short_run(tmp_path_factory, mnist_slice) -> Path:
    """One epoch of the MNIST slice, a checkpoint every 16 steps (all kept), finished: the run that tests of
    what a run leaves behind share. They read it; none writes into it."""
    output = tmp_path_factory.mktemp("short")
    result = call([*TRAIN, *SHORT, "--checkpoint-every", "16", "--keep-checkpoints", "10", "--output-dir", str(output)],
                  env={"LENET_DATA_DIR": str(mnist_slice)})
    assert result.returncode == 0, result.stderr
    return output


@pytest.fixture(scope="session")
def logged_run(tmp_path_factory, mnist_slice) -> tuple[Path, subprocess.CompletedProcess]:
    """Two epochs of the MNIST slice (64 steps each at batch 256), logged to TensorBoard and wandb: its output dir
    and stdout, which the console, tracker and predict tests read."""
    output = tmp_path_factory.mktemp("logged")
    result = call([*TRAIN, "--epochs", "2", "--batch-size", "256", "--log-with", "tensorboard,wandb",
                  "--output-dir", str(output)], env={"WANDB_MODE": "offline", "LENET_DATA_DIR": str(mnist_slice)})
    assert result.returncode == 0, result.stderr
    return output, result


@pytest.fixture(scope="session")
def single_process_profile(tmp_path_factory, mnist_slice) -> tuple[Path, subprocess.CompletedProcess]:
    """A short real run with --profile (the default recipe, one epoch of the MNIST slice): its trace folder and
    the run's output."""
    root = tmp_path_factory.mktemp("profile")
    result = call([*TRAIN, "--epochs", "1", "--profile", "--profile-dir", str(root / "profiles"),
                  "--output-dir", str(root / "run")], env={"LENET_DATA_DIR": str(mnist_slice)})
    assert result.returncode == 0, result.stderr
    return run_trace_dir(str(root / "profiles"), root / "run"), result


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """The `lenet-dist` command in-process: its exit status, stdout and stderr."""
    status = cli.command_status(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def call(
    command: list[str], *, timeout: float = 600, env: dict[str, str] | None = None, cwd: Path = ROOT,
    fresh: bool = False,
) -> subprocess.CompletedProcess:
    """Run a real process from the repository root (or a copy of it), as a user would. lenet-dist's own commands
    are forked from a process that has imported torch already (forking.py), unless `fresh` asks for a new
    interpreter (where the interpreter's start is what is tested)."""
    environment = {**os.environ, **(env or {})}
    if fresh or not forking.forkable(command, environment, BIN / "lenet-dist"):
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=environment)
    process = forking.ForkedProcess(command, environment, cwd)
    stdout, stderr = process.communicate(timeout)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def start(command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen | forking.ForkedProcess:
    """A real process in a session of its own, so that a test can signal it (and what it started); forked like
    `call`'s."""
    environment = {**os.environ, **(env or {})}
    if forking.forkable(command, environment, BIN / "lenet-dist"):
        return forking.ForkedProcess(command, environment, ROOT)
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=environment)


def call_with_stdout_closed(command: list[str], fifo: Path, *, lines: int = 0, env: dict[str, str] | None = None,
                            timeout: float = 300) -> tuple[list[str], subprocess.CompletedProcess]:
    """A forked command whose stdout is a pipe (`fifo`, a named one) that its reader closes after `lines` lines, as
    `| head -N` does: the lines read, and the command's status and stderr."""
    os.mkfifo(fifo)
    process = forking.ForkedProcess(command, {**os.environ, **(env or {})}, ROOT, stdout=fifo)
    with open(fifo) as reader:  # opening waits for the command to open its end
        read = [reader.readline() for _ in range(lines)]
    _, stderr = process.communicate(timeout)
    return read, subprocess.CompletedProcess(command, process.returncode, "", stderr)


def wait_for(predicate, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process is not None and process.poll() is not None:
            pytest.fail(f"process ended early ({process.returncode}): {process.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting")
        time.sleep(0.02)


def checkpoint_exists(output_dir: Path, step: int):
    return lambda: (output_dir / "checkpoints" / f"step-{step:08d}" / "progress.json").exists()


def launch_ddp(*flags: str, processes: int = 2, extra: tuple[str, ...] = (), launcher: str = "accelerate") -> list[str]:
    """`accelerate launch` (or `lenet-dist launch`) with the packaged 2-process CPU config (gloo), on a port of
    its own."""
    return [str(BIN / launcher), "launch", "--config_file", str(ROOT / "launch" / "cpu_ddp.yaml"),
            "--num_processes", str(processes), "--main_process_port", str(free_port()), *extra,
            "-m", "lenet_dist.train", *flags]


def launch_table() -> dict[str, str]:
    """README's table of ways to launch: where → command."""
    rows = re.findall(r"^\| ([^|]+) \| `([^`]+)`", (ROOT / "README.md").read_text(), flags=re.M)
    return {where.strip(): command for where, command in rows}


def rank_pids(marker: str) -> dict[int, int]:
    """Global rank → pid of the torchrun workers started with LENET_TEST_LAUNCH=marker."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item)
            state = (proc / "stat").read_text().rsplit(") ", 1)[1][:1]
        except (OSError, IndexError):
            continue
        if environ.get("TORCHELASTIC_RUN_ID") and environ.get("LENET_TEST_LAUNCH") == marker and state != "Z":
            found[int(environ["RANK"])] = int(proc.name)
    return found


def kill_all(process: subprocess.Popen, marker: str | None = None) -> None:
    """SIGKILL a process's session and, for a launcher, every rank it started (each in a session of its own)."""
    for pid in rank_pids(marker).values() if marker else []:
        os.kill(pid, signal.SIGKILL)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def read_metrics(output_dir: Path) -> dict:
    return json.loads((output_dir / "metrics.json").read_text())


def numbers(metrics: dict) -> list[tuple]:
    """What must not change when a run is interrupted and resumed: every epoch's loss and accuracy."""
    return [(e["epoch"], e["train_loss"], e["test_accuracy"], e["eval_samples"]) for e in metrics["epochs"]]


def same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    left, right = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def one_line_error(result: subprocess.CompletedProcess, status: int, *needles: str) -> str:
    """The failure is one line on stderr, no traceback, with the exit status and the words asked for."""
    assert result.returncode == status, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def assert_png(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    with Image.open(path) as image:
        image.verify()


def idx_bytes(array: torch.Tensor) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", n) for n in array.shape)
    return header + array.to(torch.uint8).numpy().tobytes()


def write_split(folder: Path, split: str, images: torch.Tensor, labels: torch.Tensor, compress: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in zip(SPLIT_FILES[split], (images, labels), strict=True):
        payload = idx_bytes(array)
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            (folder / name).write_bytes(payload)


BATCH = 16  # the training steps' tests: small batches of random images


def pieces(graph: bool, optimizer: str = "adam"):
    """The recipe's model, optimizer and schedule, seeded: for comparing two ways of stepping them."""
    torch.manual_seed(0)
    config = TrainConfig(optimizer=optimizer)
    model = build_model(config, num_classes=10)
    optimizer = build_optimizer(config, model, graph=graph)
    return model, optimizer, build_lr_scheduler(config, optimizer, steps_per_epoch=20)


def batches(count: int):
    """`count` batches of BATCH random images and labels, the same every call."""
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 1, 28, 28, generator=generator), torch.randint(0, 10, (BATCH,), generator=generator))
            for _ in range(count)]


def copy_checkout(destination: Path) -> Path:
    """The files a fresh clone of this working tree would hold (tracked and new, not ignored), copied."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source, target = ROOT / name, destination / name
        if not source.exists() and not source.is_symlink():  # deleted in the working tree
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)
    return destination


# the two-node tests' run (test_cluster, test_slurm): 32 steps per epoch of MNIST_SLICE's 16,384 images
TWO_NODE_RECIPE = ["--epochs", "2", "--batch-size", "512", "--no-progress"]


@pytest.fixture(scope="session")
def one_process_run(tmp_path_factory, mnist_slice) -> Path:
    """TWO_NODE_RECIPE on one process: what the two-node jobs must match."""
    output = tmp_path_factory.mktemp("one-process")
    result = call([*TRAIN, *TWO_NODE_RECIPE, "--output-dir", str(output)], env={"LENET_DATA_DIR": str(mnist_slice)})
    assert result.returncode == 0, result.stderr
    return output


@pytest.fixture(scope="session")
def one_process(one_process_run) -> dict:
    return read_metrics(one_process_run)
