"""The train loop end to end in the everyday tier: one short real run on the MNIST slice (shared, a few seconds),
what it learns and records, and a resume from one of its checkpoints that ends on the very same weights."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import SHORT, SLICE_TEST_IMAGES, TRAIN, call, numbers, read_metrics, same_weights


def test_a_short_run_learns_and_records_every_evaluation_once(short_run):
    metrics = read_metrics(short_run)
    assert metrics["final_test_accuracy"] >= 0.9  # 64 steps of Adam on 16,384 digits
    (epoch,) = metrics["epochs"]
    assert epoch["eval_samples"] == SLICE_TEST_IMAGES and metrics["steps_per_epoch"] == 64
    losses = [entry["loss"] for entry in metrics["train_log"]]
    assert losses[-1] < 0.5 * losses[0]
    assert sorted(p.name for p in (short_run / "checkpoints").iterdir()) == [f"step-{s:08d}" for s in (16, 32, 48, 64)]


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
    checkpoint = tmp_path / "whole" / "checkpoints" / "step-00000032"
    adam = call([*TRAIN, *SHORT, "--resume", str(checkpoint), "--output-dir", str(tmp_path / "adam")], env=env)
    assert adam.returncode == 2 and "--optimizer muon (this run: adam)" in adam.stderr, adam.stderr
    resumed = call([*TRAIN, *muon, "--resume", str(checkpoint), "--output-dir", str(tmp_path / "resumed")], env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert same_weights(tmp_path / "resumed", tmp_path / "whole")
    assert numbers(read_metrics(tmp_path / "resumed")) == numbers(read_metrics(tmp_path / "whole"))
