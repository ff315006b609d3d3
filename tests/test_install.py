"""lenet-dist installed as a user installs it (not editable), used from an empty folder far from any checkout."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import call, copy_checkout, free_port, launch_table, read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.ddp]
SHORT = ["--target-accuracy", "0.95", "--no-progress"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding a wheel-style install of this working tree; its dependencies are this venv's,
    reached through a .pth file rather than installed again (the wheels are gigabytes)."""
    root = tmp_path_factory.mktemp("installed")
    source = copy_checkout(root / "source")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    result = call([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                  str(source)], timeout=300)
    assert result.returncode == 0, result.stderr
    return venv


def in_empty_folder(installed: Path, tmp_path: Path, *command: str, timeout: float = 600):
    folder = tmp_path / "empty"
    folder.mkdir(exist_ok=True)
    env = {"PATH": f"{installed / 'bin'}{os.pathsep}{os.environ['PATH']}", "HF_HOME": str(tmp_path / "hf")}
    return call(list(command), cwd=folder, env=env, timeout=timeout), folder


def test_the_installed_package_is_the_one_that_runs(installed, tmp_path):
    result, _ = in_empty_folder(installed, tmp_path, "python", "-c", "import lenet_dist; print(lenet_dist.__file__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(installed))
    config, _ = in_empty_folder(installed, tmp_path, "lenet-dist", "launch-config", "cpu-ddp")
    assert config.returncode == 0 and Path(config.stdout.strip()).is_file()
    assert config.stdout.strip().startswith(str(installed)) and "MULTI_GPU" in Path(config.stdout.strip()).read_text()
    batch, _ = in_empty_folder(installed, tmp_path, "lenet-dist", "launch-config", "slurm-multi-node")
    assert batch.returncode == 0 and "#SBATCH --requeue" in Path(batch.stdout.strip()).read_text()


def test_torchrun_runs_the_module_from_any_folder(installed, tmp_path, mnist_slice):
    """README's torchrun row as written, N as 2; `torchrun` is torch.distributed.run, run by the installed
    package's own python (this venv's torchrun script would import the checkout's lenet_dist)."""
    program, *flags = shlex.split(launch_table()["torchrun"].replace("--nproc-per-node N", "--nproc-per-node 2"))
    assert program == "torchrun"
    result, folder = in_empty_folder(installed, tmp_path, "python", "-m", "torch.distributed.run", "--master-port",
                                     str(free_port()), *flags, *SHORT, "--data-dir", str(mnist_slice),
                                     "--output-dir", "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_metrics(folder / "out")["world_size"] == 2


def test_the_whole_bench_runs_from_any_folder(installed, tmp_path, mnist_sliver):
    """Its training commands (python -m, accelerate launch with the packaged config, the bare loop, the original
    script) start from the package. On 4,096 MNIST images: this checks what runs and what is reported, not speed
    or accuracy (the recipes' accuracy is tested on MNIST itself)."""
    result, folder = in_empty_folder(installed, tmp_path, "lenet-dist", "bench", "--quick", "--pipelines", "tuned",
                                     "--runs", "--repeats", "1", "--seeds", "1", "--recipe-processes", "1",
                                     "--batch-sizes", "128", "--processes", "2", "--data-dir", str(mnist_sliver),
                                     "--json", "bench.json", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((folder / "bench.json").read_text())
    cpu = report["runs"]["cpu"]
    assert cpu["original"]["final_test_accuracy"] > 0.8
    default = cpu["1_process"]["default"]
    assert default["final_test_accuracy"] > 0.8 and 0 < default["overhead_seconds"] < default["wall_seconds"]
    assert default["train_seconds"] + default["eval_seconds"] + default["overhead_seconds"] == \
        pytest.approx(default["wall_seconds"])  # the median run's own parts
    fast = cpu["1_process"]["fast_to_98"]
    assert fast["misses"] + sum(run["time_to_98"] is not None for run in fast["runs"]) == 1
    (loop_row, *_) = report["loop"]["rows"]
    # --quick compares with the eager bare loop only: inductor's compile would be most of this test's time
    assert 0 < loop_row["ours_over_best_bare"] < 2 and "bare_compiled_images_per_second" not in loop_row
    assert loop_row["bare_images_per_second"] > 0 and "of it" in result.stdout and "missed" in result.stdout
    # the sweep's 2-process launches (its arithmetic against one process: tests/test_bench.py)
    rows = report["scaling"]["rows"]
    assert [(row["mode"], row["processes"]) for row in rows] == [("strong", 2), ("weak", 2)]
    assert all(row["train_images_per_second"] > 0 and row["efficiency"] is None for row in rows)
    assert sorted(path.name for path in folder.iterdir()) == ["bench.json"]  # nothing else left behind
