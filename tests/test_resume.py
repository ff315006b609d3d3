"""Resume: a resumed run ends as the run never stopped, under real signals (SIGKILL, SIGTERM on 1 and 2 processes,
torchrun's restarts) and on another number of processes; a checkpoint that does not fit is refused in one line.
Every run here is a real process on real MNIST."""

from __future__ import annotations

import json
import os
import pty
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

import forking
from conftest import (
    ROOT,
    RUN_FILES,
    SHORT,
    SLICE_TEST_IMAGES,
    TRAIN,
    call,
    checkpoint_exists,
    kill_all,
    launch_ddp,
    numbers,
    one_line_error,
    rank_pids,
    read_metrics,
    same_weights,
    start,
    wait_for,
)

# On the MNIST slice (16,384 images): 64 steps per epoch at batch 256, two epochs in a few seconds
RECIPE = ["--epochs", "2", "--batch-size", "256", "--no-progress"]
EPOCH_END = 64
# The tests under real signals, launchers and restarts are slow and of the launcher tier; the everyday tier's
# resumes and refusals, at the end, read the shared short run.


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, sliced) -> Path:
    output = tmp_path_factory.mktemp("uninterrupted")
    result = call([*TRAIN, *RECIPE, "--output-dir", str(output)], env=sliced)
    assert result.returncode == 0, result.stderr
    return output


@pytest.mark.slow
@pytest.mark.launcher
def test_sigkill_at_any_instant_keeps_a_usable_checkpoint_and_resumes_identically(uninterrupted, tmp_path, sliced):
    """Killed twice in epoch 2, at random instants while it saves every 3 steps: the complete checkpoints
    survive, and the resumed run (re-creating epoch 2's shuffled order) ends exactly as the uninterrupted one."""
    rng = random.Random(0)
    command = [*TRAIN, *RECIPE, "--checkpoint-every", "3", "--keep-checkpoints", "3", "--output-dir", str(tmp_path)]
    checkpoints = tmp_path / "checkpoints"

    def newest() -> int:
        return max((int(p.name[5:]) for p in checkpoints.glob("step-*")), default=0)

    for attempt in range(2):
        target = max(newest(), EPOCH_END) + 6
        process = start(command + (["--resume"] if attempt else []), env=sliced)
        wait_for(lambda target=target: newest() >= target, 120, process)
        time.sleep(rng.uniform(0, 0.1))  # some kills land mid-save, all well inside epoch 2
        kill_all(process)
        complete = sorted(p for p in checkpoints.iterdir() if p.name.startswith("step-"))
        assert complete, "the previous complete checkpoint must survive"
        for checkpoint in complete:
            json.loads((checkpoint / "progress.json").read_text())
            assert load_file(str(checkpoint / "model.safetensors"))
    assert not (tmp_path / "metrics.json").exists()

    refused = call(command, timeout=120, env=sliced)
    assert refused.returncode == 2 and "--resume" in refused.stderr  # nothing is started over by mistake
    # --deterministic only constrains GPU kernels: on CPU it must not change a single number
    resumed = call(command + ["--resume", "--deterministic"], env=sliced)
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"resumed from .*step-\d{8}: epoch 2", resumed.stdout), resumed.stdout
    assert numbers(read_metrics(tmp_path)) == numbers(read_metrics(uninterrupted))
    assert same_weights(tmp_path, uninterrupted)  # no step trained twice or skipped
    assert not list(checkpoints.glob(".*.partial"))


@pytest.fixture(scope="module")
def sigtermed(tmp_path_factory, sliced) -> tuple[Path, subprocess.CompletedProcess]:
    """A 1-process run with no periodic checkpoints, sent SIGTERM in the middle of its second epoch."""
    output = tmp_path_factory.mktemp("sigtermed")
    process = start([*TRAIN, *RECIPE, "--output-dir", str(output)], env=sliced)
    wait_for(checkpoint_exists(output, EPOCH_END), 120, process)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    stdout, stderr = process.communicate(timeout=60)
    assert time.monotonic() - signalled < 30
    return output, subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.slow
@pytest.mark.launcher
def test_sigterm_saves_the_step_it_stopped_at_and_resumes_identically(sigtermed, uninterrupted, tmp_path, sliced):
    output, stopped = sigtermed
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    (line,) = stopped.stderr.strip().splitlines()
    step = int(re.search(r"stopped by SIGTERM after step (\d+); checkpoint saved: ", line)[1])
    assert EPOCH_END < step < 2 * EPOCH_END and f"step-{step:08d}" in line and "--resume" in line
    progress = json.loads((output / "checkpoints" / f"step-{step:08d}" / "progress.json").read_text())
    assert (progress["global_step"], progress["epoch"], progress["batches_done"]) == (step, 2, step - EPOCH_END)
    assert not (output / "metrics.json").exists()

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(output, resumed_dir)
    resumed = call([*TRAIN, *RECIPE, "--output-dir", str(resumed_dir), "--resume", "auto"], env=sliced)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {resumed_dir}/checkpoints/step-{step:08d}: epoch 2, step {step}" in resumed.stdout
    assert numbers(read_metrics(resumed_dir)) == numbers(read_metrics(uninterrupted))
    assert same_weights(resumed_dir, uninterrupted)
    # the training-loss series goes on where it stopped: no step twice, none left out, the same losses; the
    # stop's own point (step 83, say) splits the window that the uninterrupted run logged at step 90
    resumed_log, whole_log = read_metrics(resumed_dir)["train_log"], read_metrics(uninterrupted)["train_log"]
    resumed_steps = [entry["step"] for entry in resumed_log]
    assert resumed_steps == sorted({*(entry["step"] for entry in whole_log), step})
    whole = {entry["step"]: entry["loss"] for entry in whole_log}
    split = min(s for s in resumed_steps if s > step)
    assert all(entry["loss"] == whole[entry["step"]] for entry in resumed_log if entry["step"] not in (step, split))


@pytest.mark.slow
@pytest.mark.launcher
@pytest.mark.ddp
def test_a_one_process_checkpoint_resumes_on_two_processes(sigtermed, uninterrupted, tmp_path, sliced):
    output, _ = sigtermed
    shutil.copytree(output, tmp_path / "run")
    resumed = call(launch_ddp(*RECIPE, "--output-dir", str(tmp_path / "run"), "--resume"), env=sliced)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(saved by 1 processes)" in resumed.stdout
    metrics = read_metrics(tmp_path / "run")
    assert metrics["world_size"] == 2 and all(e["eval_samples"] == SLICE_TEST_IMAGES for e in metrics["evaluations"])
    single = read_metrics(uninterrupted)
    # epoch 2 is what the two processes computed after the resume (epoch 1's record came with the checkpoint)
    resumed, alone = metrics["epochs"][1], single["epochs"][1]
    assert resumed["epoch"] == alone["epoch"] == 2
    assert abs(resumed["train_loss"] - alone["train_loss"]) <= 1e-3
    assert abs(resumed["test_accuracy"] - alone["test_accuracy"]) <= 0.002


@pytest.mark.slow
@pytest.mark.launcher
@pytest.mark.ddp
def test_sigterm_to_the_ddp_launcher_stops_every_rank_at_one_step_then_resumes(uninterrupted, tmp_path, sliced):
    marker = f"sigterm-{os.getpid()}"
    launcher = start(launch_ddp(*RECIPE, "--output-dir", str(tmp_path), launcher="lenet-dist"),
                     env={"LENET_TEST_LAUNCH": marker, **sliced})
    try:
        wait_for(checkpoint_exists(tmp_path, EPOCH_END), 180, launcher)
        wait_for(lambda: len(rank_pids(marker)) == 2, 30, launcher)
        time.sleep(0.5)
        launcher.send_signal(signal.SIGTERM)  # as `scancel` or a spot instance's shutdown would
        signalled = time.monotonic()
        wait_for(lambda: launcher.poll() is not None and not rank_pids(marker), 60)
        assert time.monotonic() - signalled < 60
        _, stderr = launcher.communicate()
    finally:
        kill_all(launcher, marker)
    assert launcher.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr[-3000:]
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped by SIGTERM after step")]
    assert len(stopped) == 1, stderr[-3000:]  # rank 0 alone reports
    assert stderr.strip().splitlines()[-1].startswith("lenet-dist launch: SIGTERM: every rank on this node (2) "
                                                      "stopped after saving")
    step = int(re.search(r"after step (\d+)", stopped[0])[1])
    assert EPOCH_END < step < 2 * EPOCH_END
    checkpoint = tmp_path / "checkpoints" / f"step-{step:08d}"
    assert json.loads((checkpoint / "progress.json").read_text())["processes"] == 2

    # resumed by one process (by two: the two-node preemption test in test_cluster.py, and the elastic restart)
    on_one = call([*TRAIN, *RECIPE, "--output-dir", str(tmp_path), "--resume"], env=sliced)
    assert on_one.returncode == 0, on_one.stderr
    assert "(saved by 2 processes)" in on_one.stdout
    metrics = read_metrics(tmp_path)
    assert metrics["world_size"] == 1 and [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert abs(metrics["final_test_accuracy"] - read_metrics(uninterrupted)["final_test_accuracy"]) <= 0.002


@pytest.mark.slow
@pytest.mark.launcher
@pytest.mark.ddp
def test_torchrun_restarts_a_lost_rank_and_resume_auto_finishes_the_job(uninterrupted, tmp_path, sliced):
    marker = f"elastic-{os.getpid()}"
    command = launch_ddp(*RECIPE, "--checkpoint-every", "16", "--resume", "auto", "--output-dir", str(tmp_path),
                         extra=("--max_restarts", "1"))
    launcher = start(command, env={"LENET_TEST_LAUNCH": marker, **sliced})
    try:
        wait_for(checkpoint_exists(tmp_path, 80), 180, launcher)
        os.kill(rank_pids(marker)[1], signal.SIGKILL)
        stdout, stderr = launcher.communicate(timeout=300)
    finally:
        kill_all(launcher, marker)
    assert launcher.returncode == 0, stderr[-3000:]
    assert re.search(r"resumed from .*step-000000(80|96): epoch 2", stdout), stdout[-3000:]
    metrics = read_metrics(tmp_path)
    assert metrics["world_size"] == 2 and [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert abs(metrics["final_test_accuracy"] - read_metrics(uninterrupted)["final_test_accuracy"]) <= 0.002


@pytest.mark.slow
@pytest.mark.launcher
def test_second_signal_while_stopping_changes_nothing(tmp_path, sliced):
    process = start([*TRAIN, *RECIPE, "--output-dir", str(tmp_path)], env=sliced)
    wait_for(checkpoint_exists(tmp_path, EPOCH_END), 120, process)
    for _ in range(5):  # Ctrl-C pressed again and again while it saves
        process.send_signal(signal.SIGINT)
        time.sleep(0.01)
    _, stderr = process.communicate(timeout=60)
    # 130, or killed by a late Ctrl-C after Python's teardown has restored the default handler (the
    # shell shows 130 for both)
    assert process.returncode in (128 + signal.SIGINT, -signal.SIGINT), stderr
    step = int(re.search(r"stopped by SIGINT after step (\d+)", stderr)[1])
    assert json.loads((tmp_path / "checkpoints" / f"step-{step:08d}" / "progress.json").read_text())["global_step"] \
        == step
    assert not list((tmp_path / "checkpoints").glob(".*.partial"))


@pytest.mark.slow
@pytest.mark.launcher
@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_as_the_run_finishes_waits_for_its_outputs(number, tmp_path, mnist_sliver):
    """Signalled once the final checkpoint is there, while the weights and figures are written: they are
    finished, the line says so, and the run is complete (exit 0: nothing for a requeue to redo)."""
    process = start([*TRAIN, *SHORT, "--output-dir", str(tmp_path)], env={"LENET_DATA_DIR": str(mnist_sliver)})
    wait_for(checkpoint_exists(tmp_path, 16), 120, process)  # 4,096 images at batch 256: the last step
    process.send_signal(number)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr[-2000:]
    assert stderr.splitlines() == [f"{signal.Signals(number).name} came as the run finished: its outputs were "
                                   "written first; the run is complete, nothing is left to resume"]
    assert {path.name for path in tmp_path.iterdir()} == set(RUN_FILES)


@pytest.mark.slow
@pytest.mark.launcher
def test_resume_auto_from_the_final_checkpoint_writes_the_outputs(uninterrupted, tmp_path, sliced):
    """A run killed between its final checkpoint and its outputs: --resume auto says so, trains nothing and writes
    them, the same as the uninterrupted run's."""
    shutil.copytree(uninterrupted, tmp_path, dirs_exist_ok=True)
    for name in RUN_FILES:
        if name not in (".lenet-dist.lock", "checkpoints", "config.json"):
            (tmp_path / name).unlink()
    resumed = call([*TRAIN, *RECIPE, "--output-dir", str(tmp_path), "--resume", "auto"], env=sliced)
    assert resumed.returncode == 0, resumed.stderr
    final = f"step-{2 * EPOCH_END:08d}"
    assert (f"resumed from {tmp_path}/checkpoints/{final}: training had finished (step {2 * EPOCH_END}); writing the "
            "run's outputs") in resumed.stdout
    assert not re.search(r"epoch \d/2  step", resumed.stdout)  # nothing trained
    assert {path.name for path in tmp_path.iterdir()} == set(RUN_FILES)
    assert numbers(read_metrics(tmp_path)) == numbers(read_metrics(uninterrupted))
    assert same_weights(tmp_path, uninterrupted)


@pytest.mark.slow
@pytest.mark.launcher
def test_a_closed_terminal_stops_the_run_like_sigterm(tmp_path, sliced):
    """The run's terminal (a pty) closes and SIGHUP comes, as when an SSH session ends: writes to the terminal fail
    from then on (EIO), yet the run saves at a step, says so and exits 129."""
    terminal, run_side = pty.openpty()
    process = forking.ForkedProcess([*TRAIN, *RECIPE, "--output-dir", str(tmp_path)], {**os.environ, **sliced}, ROOT,
                                    stdout=Path(os.ttyname(run_side)))  # stderr stays a file, to read the line
    os.close(run_side)
    wait_for(checkpoint_exists(tmp_path, EPOCH_END), 120, process)
    assert b"epoch 1/2  train loss" in os.read(terminal, 65536)
    os.close(terminal)  # the hang-up
    process.send_signal(signal.SIGHUP)  # what the shell or the kernel sends the session's jobs
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGHUP, stderr[-2000:]
    (line,) = stderr.splitlines()
    step = int(re.search(r"^stopped by SIGHUP after step (\d+); checkpoint saved: ", line)[1])
    assert step > EPOCH_END and (tmp_path / "checkpoints" / f"step-{step:08d}" / "progress.json").is_file()


def test_resume_refuses_a_checkpoint_from_another_config(short_run, tmp_path, sliced):
    checkpoint = short_run / "checkpoints" / "step-00000032"
    result = call([*TRAIN, *SHORT, "--lr", "0.01", "--resume", str(checkpoint), "--output-dir", str(tmp_path)],
                 timeout=120, env=sliced)
    one_line_error(result, 2, str(checkpoint), "--lr 0.006 (this run: 0.01)", f"--init-from {checkpoint}")


def test_resume_refuses_a_corrupt_checkpoint(short_run, tmp_path, sliced):
    checkpoint = tmp_path / "step-00000032"
    shutil.copytree(short_run / "checkpoints" / "step-00000032", checkpoint)
    state = checkpoint / "training_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    result = call([*TRAIN, *SHORT, "--resume", str(checkpoint), "--output-dir", str(tmp_path / "out")], timeout=120,
                 env=sliced)
    one_line_error(result, 1, str(checkpoint), "corrupt")


def test_a_corrupt_newest_checkpoint_names_the_one_before_or_under_resume_auto_is_set_aside(short_run, tmp_path,
                                                                                            sliced):
    """--resume names the checkpoint before it; --resume auto (a requeued job, the same command every time) sets
    the corrupt one aside, says so in one line and resumes from the one before."""
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    for name in ("metrics.json", "model.safetensors"):  # killed before its outputs: unfinished
        (run / name).unlink()
    state = run / "checkpoints" / "step-00000064" / "training_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    command = [*TRAIN, *SHORT, "--output-dir", str(run)]
    result = call([*command, "--resume"], timeout=120, env=sliced)
    one_line_error(result, 1, "step-00000064: checkpoint is corrupt",
                   f"(the one before it: --resume {run / 'checkpoints' / 'step-00000048'})")

    result = call([*command, "--resume", "auto"], timeout=120, env=sliced)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"{run / 'checkpoints' / 'step-00000064'}: checkpoint is corrupt (RuntimeError); set aside as "
        f"corrupt-step-00000064/, resuming from {run / 'checkpoints' / 'step-00000048'}"]
    assert (run / "checkpoints" / "corrupt-step-00000064" / "training_state.pt").stat().st_size == 100  # kept
    assert read_metrics(run)["epochs"][0]["epoch"] == 1


def test_a_resumed_checkpoint_ends_on_the_same_weights_and_numbers(short_run, mnist_slice, tmp_path):
    """Weights, Adam's moments, the schedule and the data order all come back: any one of them lost changes the
    weights the resumed run ends on."""
    checkpoint = short_run / "checkpoints" / "step-00000032"
    assert json.loads((checkpoint / "progress.json").read_text())["global_step"] == 32
    resumed = call([*TRAIN, *SHORT, "--checkpoint-every", "16", "--keep-checkpoints", "10", "--resume",
                    str(checkpoint), "--output-dir", str(tmp_path)], env={"LENET_DATA_DIR": str(mnist_slice)})
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {checkpoint}: epoch 1, step 32" in resumed.stdout
    assert same_weights(tmp_path, short_run)
    assert numbers(read_metrics(tmp_path)) == numbers(read_metrics(short_run))


def test_a_resume_from_an_older_checkpoint_sets_the_later_ones_aside(short_run, mnist_slice, tmp_path):
    """The checkpoints after the resumed step belong to the continuation the resume leaves: kept, but out of the
    way of pruning (with --keep-checkpoints 1 the old step 64 would delete each new checkpoint at once) and of
    --resume auto, which goes by step number."""
    shutil.copytree(short_run / "checkpoints", tmp_path / "checkpoints")
    checkpoint = tmp_path / "checkpoints" / "step-00000032"
    resumed = call([*TRAIN, *SHORT, "--checkpoint-every", "8", "--keep-checkpoints", "2", "--resume",
                    str(checkpoint), "--output-dir", str(tmp_path)], env={"LENET_DATA_DIR": str(mnist_slice)})
    assert resumed.returncode == 0, resumed.stderr
    aside = tmp_path / "checkpoints" / "abandoned-after-step-00000032"
    assert f"checkpoints after step 32 (the continuation this resume leaves) moved to {aside}/" in resumed.stdout
    assert sorted(p.name for p in aside.iterdir()) == ["step-00000048", "step-00000064"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        aside.name, "step-00000056", "step-00000064"]  # the new continuation's newest two, none deleted unwritten


@pytest.mark.slow
def test_a_muon_run_resumed_from_its_checkpoint_ends_on_the_same_weights(mnist_slice, tmp_path):
    """--optimizer muon's momentum buffers and its Adam half's moments and step counts come back bit for bit; the
    checkpoint records the optimizer, so an Adam resume of it is refused."""
    muon = [*SHORT, "--optimizer", "muon", "--checkpoint-every", "32"]
    env = {"LENET_DATA_DIR": str(mnist_slice)}
    whole = call([*TRAIN, *muon, "--output-dir", str(tmp_path / "whole")], env=env)
    assert whole.returncode == 0, whole.stderr
    # each group's learning rate logged under its own flag's name: one schedule, two peaks (--lr, --muon-lr)
    log = read_metrics(tmp_path / "whole")["train_log"]
    assert all(entry["muon_lr"] == pytest.approx(entry["lr"] * 0.02 / 6e-3) for entry in log)
    assert max(entry["lr"] for entry in log) == pytest.approx(6e-3, rel=0.02)
    checkpoint = tmp_path / "whole" / "checkpoints" / "step-00000032"
    adam = call([*TRAIN, *SHORT, "--resume", str(checkpoint), "--output-dir", str(tmp_path / "adam")], env=env)
    assert adam.returncode == 2 and "--optimizer muon (this run: adam)" in adam.stderr, adam.stderr
    resumed = call([*TRAIN, *muon, "--resume", str(checkpoint), "--output-dir", str(tmp_path / "resumed")], env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert same_weights(tmp_path / "resumed", tmp_path / "whole")
    assert numbers(read_metrics(tmp_path / "resumed")) == numbers(read_metrics(tmp_path / "whole"))
