"""Inputs and moments that once ended in a hang, a traceback or a wrong result, each now one line (or the right
result): a batch larger than the data, a one-step warm-up, a corrupt download, another data set's files, a seed
numpy refuses, Ctrl-C during start-up, a stop on the last step, a launch config that is not there."""

from __future__ import annotations

import gzip
import sys
import time

import pytest
import torch

from conftest import BIN, SHORT, TRAIN, call, one_line_error, read_metrics, write_split
from lenet_dist import cli
from lenet_dist.config import TrainConfig
from lenet_dist.console import ProgressBar
from lenet_dist.data import load_split
from lenet_dist.errors import status_of
from lenet_dist.recipe.build import build_test_loader
from lenet_dist.recipe.lr_schedule import build_lr_scheduler


def test_a_batch_larger_than_the_training_set_is_refused_and_leaves_nothing(mnist_sliver, tmp_path):
    result = call([*TRAIN, "--batch-size", "70000", "--output-dir", str(tmp_path / "out")],
                  env={"LENET_DATA_DIR": str(mnist_sliver)}, timeout=60)
    one_line_error(result, 2, "--batch-size 70000", "4,096 training images")
    assert not (tmp_path / "out").exists()


def test_a_warm_up_of_one_step_starts_at_the_peak():
    config = TrainConfig(recipe="fast-to-98", anneal_images=320)  # 10 steps, 10 % of them warming up: one
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = build_lr_scheduler(config, optimizer, steps_per_epoch=1875)
    rates = []
    for _ in range(12):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(config.lr) and rates == sorted(rates, reverse=True)
    assert rates[-1] == pytest.approx(config.lr * config.final_lr_factor)


def test_the_in_memory_test_set_is_read_without_worker_processes(mnist_sliver):
    test = load_split(mnist_sliver, "test", "mnist")
    loader = build_test_loader(TrainConfig(workers=2), test, mnist_sliver, torch.device("cpu"), 1)
    assert loader.num_workers == 0


def test_a_truncated_gzip_file_is_named_in_one_line(mnist_sliver, tmp_path):
    flat = tmp_path / "flat"
    for path in (mnist_sliver / "MNIST" / "raw").iterdir():
        (flat / f"{path.name}.gz").parent.mkdir(exist_ok=True)
        (flat / f"{path.name}.gz").write_bytes(gzip.compress(path.read_bytes()))
    broken = flat / "train-images-idx3-ubyte.gz"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    result = call([*TRAIN, "--data-dir", str(flat), "--output-dir", str(tmp_path / "out")], timeout=60)
    one_line_error(result, 1, str(broken), "not a whole gzip file", "lenet-dist download")
    assert not (tmp_path / "out").exists()


def test_download_fetches_again_what_a_cut_download_left(mnist_sliver, tmp_path):
    """A file of torchvision's download folder that is not whole is removed so that it is fetched again (here
    offline, the fetch fails in its one line); the whole files stay."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for path in (mnist_sliver / "MNIST" / "raw").iterdir():
        (raw / f"{path.name}.gz").write_bytes(gzip.compress(path.read_bytes()))
    broken = raw / "train-images-idx3-ubyte.gz"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    result = call([str(BIN / "lenet-dist"), "download", "--data-dir", str(tmp_path)], timeout=120)
    assert result.stdout.startswith(f"removed {broken} to fetch it again: is not a whole gzip file"), result.stdout
    one_line_error(result, 1, "downloading it failed")  # offline here; online, the file is fetched again
    assert sorted(path.name for path in raw.iterdir()) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
                                                           "train-labels-idx1-ubyte.gz"]


def test_another_data_sets_files_are_refused_under_this_ones_name(fashion_dir, tmp_path):
    result = call([*TRAIN, "--data-dir", str(fashion_dir / "FashionMNIST"), "--output-dir", str(tmp_path / "out")],
                  timeout=60)
    one_line_error(result, 2, "fashion-mnist's test labels, not mnist's", "--dataset fashion-mnist")
    assert not (tmp_path / "out").exists()


def test_a_slice_of_a_data_set_is_not_taken_for_another(tmp_path, mnist_sliver):
    split = load_split(mnist_sliver, "test", "mnist")  # the md5 is of the whole published file only
    write_split(tmp_path / "MNIST" / "raw", "test", split.images[:10], split.labels[:10])
    assert len(load_split(tmp_path, "test", "mnist").labels) == 10


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_a_seed_numpy_cannot_take_is_a_usage_error(seed, capsys, tmp_path):
    status = cli.command_status(["train", "--seed", seed, "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "--seed must be in 0" in err, err


def test_an_unexpected_exception_gets_its_traceback_and_a_status(capsys):
    def broken() -> int:
        raise RuntimeError("a bug")

    assert status_of(broken) == 1 and "RuntimeError: a bug" in capsys.readouterr().err


INTERRUPTED_IN_START_UP = """
import sys
from lenet_dist import train
from lenet_dist.recipe import build as recipe
def interrupted(*args, **kwargs):
    raise KeyboardInterrupt
recipe.build_optimizer = interrupted
train.main(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.launcher
def test_ctrl_c_during_start_up_is_one_line_exit_130_and_leaves_no_output_dir(mnist_sliver, tmp_path):
    result = call([sys.executable, "-c", INTERRUPTED_IN_START_UP, "--output-dir", str(tmp_path / "out")],
                  env={"LENET_DATA_DIR": str(mnist_sliver)}, timeout=60)
    one_line_error(result, 130, "interrupted before training started")
    assert not (tmp_path / "out").exists()


STOPPED_AT_THE_LAST_STEP = """
import dataclasses, signal, sys
from lenet_dist import cadence, train
original_due = cadence.Cadence.due
def stop_at_the_end(self, progress, agreed):  # as if SIGTERM came during the very last step
    due = original_due(self, progress, agreed)
    last = progress.global_step == self.steps_per_epoch * self.config.epochs
    return dataclasses.replace(due, stop=signal.SIGTERM, checkpoint=True) if last else due
cadence.Cadence.due = stop_at_the_end
train.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_stop_agreed_at_the_last_step_finishes_the_run(mnist_sliver, tmp_path):
    result = call([sys.executable, "-c", STOPPED_AT_THE_LAST_STEP, *SHORT, "--output-dir", str(tmp_path)],
                  env={"LENET_DATA_DIR": str(mnist_sliver)}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert read_metrics(tmp_path)["epochs"] and (tmp_path / "model.safetensors").is_file()


def test_the_bar_keeps_its_rate_and_eta_over_a_checkpoints_pause(capsys):
    """The loop pauses the bar to evaluate or save, then resumes the same bar: its steps, its images/s and the
    speed rich's ETA is computed from carry on (a new bar showed no rate and '-:--:--' after every checkpoint)."""
    shown = ProgressBar(enabled=True, fancy=True, epoch=1, epochs=1, steps=100, batch_size=8)
    started = shown.started
    for done in range(1, 21):
        shown.update(done, loss=1.0 if done % 10 == 0 else None)
    shown.pause()
    time.sleep(0.05)  # the time the checkpoint took
    shown.resume()
    (task,) = shown.bar.tasks
    assert task.completed == 20 and task.speed and "img/s" in task.fields["rate"]
    assert shown.started >= started + 0.05  # images/s counts training time, not the pause
    shown.close()


def test_plain_progress_lines_fall_on_each_quarter_even_after_a_pause(capsys):
    shown = ProgressBar(enabled=True, fancy=False, epoch=1, epochs=1, steps=100, batch_size=8)
    for done in range(10, 41, 10):
        shown.update(done, loss=1.0)
    shown = ProgressBar(enabled=True, fancy=False, epoch=1, epochs=1, steps=100, batch_size=8, done=40)  # resumed
    for done in range(50, 101, 10):
        shown.update(done, loss=1.0)
    steps = [int(line.split()[3].split("/")[0]) for line in capsys.readouterr().out.splitlines()]
    assert steps == [30, 50, 80, 100]  # the first log point in each quarter (25, 50, 75, 100)


@pytest.mark.launcher
def test_a_launch_config_that_is_not_there_is_one_line_naming_the_packaged_one(capsys):
    status = cli.command_status(["launch", "--config_file", "launch/cpu-ddp.yaml", "-m", "lenet_dist.train"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert "--config_file launch/cpu-ddp.yaml: no such file" in err and "cpu_ddp.yaml" in err


def test_benchmarks_compare_command_runs(tmp_path, capsys):
    """BENCHMARKS.md's `bench compare` of its two saved results (an older schema with the same rows)."""
    status = cli.command_status(["bench", "compare", "docs/bench-cpu.json", "docs/bench-cpu-1core.json", "--chart",
                                 str(tmp_path / "compare.png")])
    assert status == 0, capsys.readouterr().err
    assert "[2] docs/bench-cpu-1core.json" in capsys.readouterr().out


def test_a_lost_rank_is_named_only_when_a_rank_is_missing(monkeypatch):
    from lenet_dist.distributed.lost_ranks import Ranks

    ranks = Ranks.__new__(Ranks)
    ranks.rank, ranks.members = 0, [(0, "here", 1), (1, "here", 1)]  # pid 1 is alive: nobody died here
    monkeypatch.setattr(Ranks, "_unanswered", lambda self: [])
    assert ranks.lost(RuntimeError("gloo: Timed out waiting"), "checkpoints: none") is None
    monkeypatch.setattr(Ranks, "_unanswered", lambda self: [1])
    lost = ranks.lost(RuntimeError("gloo: Timed out waiting"), "checkpoints: none")
    assert lost is not None and "lost contact with rank 1 (node here)" in str(lost)


def test_an_output_dir_that_is_a_file_is_named_as_such(tmp_path, mnist_sliver):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = call([*TRAIN, "--output-dir", str(blocker)], env={"LENET_DATA_DIR": str(mnist_sliver)}, timeout=60)
    one_line_error(result, 2, f"--output-dir {blocker} is a file, not a folder")
    assert blocker.read_text() == "not a folder"


def test_launch_config_help_shows_no_empty_default(capsys):
    assert cli.command_status(["launch-config", "--help"]) == 0
    assert "(default: )" not in capsys.readouterr().out


@pytest.mark.launcher
def test_launch_help_lists_the_flags_readme_uses(capsys):
    from lenet_dist.distributed.launcher import main

    with pytest.raises(SystemExit) as exiting:
        main(["--help"])
    assert exiting.value.code == 0
    shown = capsys.readouterr().out
    assert shown.startswith("usage: lenet-dist launch")
    for flag in ("--config_file", "--num_processes", "--max_restarts", "--machine_rank", "--main_process_ip",
                 "--main_process_port", "--num_machines"):
        assert f"  {flag}" in shown, flag
