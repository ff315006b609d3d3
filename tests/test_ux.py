"""What users see: progress on a terminal or in a log, TensorBoard scalars, figures, predict, other data sets."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from conftest import BIN, FIGURES, ROOT, TRAIN, assert_png, call, read_metrics
from lenet_dist.data import load_split

LOGGED_STEPS = sorted(set(range(10, 129, 10)) | {64, 128})  # every --log-every steps and each epoch's end


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, mnist_slice) -> tuple[Path, subprocess.CompletedProcess]:
    """Two epochs of the MNIST slice (64 steps each at batch 256), logged to TensorBoard and wandb."""
    output = tmp_path_factory.mktemp("logged")
    result = call([*TRAIN, "--epochs", "2", "--batch-size", "256", "--log-with", "tensorboard,wandb",
                  "--output-dir", str(output)], env={"WANDB_MODE": "offline", "LENET_DATA_DIR": str(mnist_slice)})
    assert result.returncode == 0, result.stderr
    return output, result


@pytest.mark.slow
def test_plain_progress_lines_and_summary_when_not_a_terminal(logged_run):
    _, result = logged_run
    progress_lines = [line for line in result.stdout.splitlines() if line.startswith("epoch 1/2  step ")]
    assert 3 <= len(progress_lines) <= 5, result.stdout  # a line each quarter epoch, not one per step
    assert "images/s" in progress_lines[0] and "loss" in progress_lines[0]
    assert "\x1b[" not in result.stdout  # no terminal control codes in logs
    assert "train images/s" in result.stdout  # the summary table
    for figure in FIGURES:
        assert figure in result.stdout  # train lists where its figures went


def test_the_summary_names_the_device_as_the_first_line_does():
    """`2 process(es) on cuda`, as the run's first line says, not rank 0's own `cuda:0`."""
    from lenet_dist.console import summary_table

    metrics = {"config": {"recipe": "default", "batch_size": 128}, "world_size": 2, "device": "cuda:0",
               "precision": "no", "epochs": []}
    assert "2 process(es) on cuda, precision no" in summary_table(metrics).title


@pytest.mark.slow
def test_rich_progress_bar_on_a_terminal(tmp_path, data_dir):
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [*TRAIN, "--target-accuracy", "0.95", "--output-dir", str(tmp_path)],
        cwd=ROOT, stdout=terminal, stderr=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "120"},
    )
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the child closed its side
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(timeout=300)
    shown = b"".join(chunks).decode(errors="replace")
    assert process.returncode == 0
    assert "img/s" in shown and "━" in shown and "\x1b[" in shown  # a live rich bar
    assert " 0 img/s" not in shown and "nan" not in shown  # blank until measured, at the start and after evaluations
    assert not re.search(r"epoch 1/2  step \d+/468", shown)  # not the plain log lines


@pytest.mark.slow
def test_tensorboard_scalars_read_back(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output, _ = logged_run
    events = EventAccumulator(str(output / "trackers" / "lenet-dist"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "test/accuracy", "train/images_per_second"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == LOGGED_STEPS
    accuracy = [event.value for event in events.Scalars("test/accuracy")]
    assert accuracy == pytest.approx([e["test_accuracy"] for e in read_metrics(output)["evaluations"]])
    for figure in FIGURES:
        assert_png(output / figure)


def wandb_records(path: Path):
    """The records of an offline wandb run file: LevelDB's log format (32 KiB blocks of checksum, length,
    kind, payload) after a 7-byte W&B header, each record a protobuf wandb writes."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pieces = 7, 32768, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        pieces += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


@pytest.mark.slow
def test_wandb_offline_run_reads_back(logged_run):
    output, _ = logged_run
    (run_file,) = (output / "trackers" / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = [], {}
    def name(item) -> str:  # "train/loss" is stored as the nested key ["train", "loss"]
        return item.key or "/".join(item.nested_key)

    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({name(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "config":
            config.update({name(item): json.loads(item.value_json) for item in record.config.update})
    assert [row["_step"] for row in history if "train/loss" in row] == LOGGED_STEPS
    accuracy = [row["test/accuracy"] for row in history if "test/accuracy" in row]
    assert accuracy == pytest.approx([e["test_accuracy"] for e in read_metrics(output)["evaluations"]])
    assert config["lr"] == 0.006 and config["batch_size"] == 256  # what the run was given


def test_a_tracker_that_is_not_installed_names_its_package(monkeypatch):
    from lenet_dist.errors import UserError
    from lenet_dist.trackers import require_installed

    monkeypatch.setenv("WANDB_MODE", "offline")  # installed, and able to log (offline)
    require_installed(["tensorboard", "wandb", "all"])
    with pytest.raises(UserError, match="--log-with comet_ml: the tracker is not installed; pip install comet-ml"):
        require_installed(["tensorboard", "comet_ml"])


@pytest.mark.slow
def test_predict_reads_users_images(logged_run, tmp_path, data_dir):
    output, _ = logged_run
    test = load_split(data_dir, "test", "mnist")
    files, truth = [], []
    for i in range(100):
        digit = test.images[i].numpy()
        if i % 4 == 1:  # dark ink on white paper
            image = Image.fromarray(255 - digit)
        elif i % 4 == 2:  # RGB and larger than 28×28
            image = Image.fromarray(digit).convert("RGB").resize((112, 112), Image.Resampling.BILINEAR)
        elif i % 4 == 3:  # off-centre on a big dark canvas
            image = Image.new("L", (90, 60))
            image.paste(Image.fromarray(digit), (50, 5))
        else:
            image = Image.fromarray(digit)
        path = tmp_path / f"digit{i:03d}.{'jpg' if i % 8 == 6 else 'png'}"
        image.save(path)
        files.append(path)
        truth.append(str(int(test.labels[i])))
    # a trained run classifies photo-like copies of test digits as it classifies the digits themselves
    # (what each odd or hostile file gets is tests/test_predict.py's, in-process)
    result = call([str(BIN / "lenet-dist"), "predict", "--model", str(output), "--json", *map(str, files)], timeout=300)
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["file"] for a in answers] == list(map(str, files))
    correct = sum(a["prediction"] == t for a, t in zip(answers, truth, strict=True))
    clean_files = []
    for i in range(100):
        clean_files.append(tmp_path / f"clean{i:03d}.png")
        Image.fromarray(test.images[i].numpy()).save(clean_files[-1])
    clean = call([str(BIN / "lenet-dist"), "predict", "--model", str(output), "--json", *map(str, clean_files)],
                timeout=300)
    clean_correct = sum(json.loads(line)["prediction"] == t for line, t in zip(clean.stdout.splitlines(), truth,
                                                                               strict=True))
    assert correct >= clean_correct - 2, (correct, clean_correct)
    assert all(len(a["top"]) == 3 and a["top"][0]["probability"] >= a["top"][1]["probability"] for a in answers)
    text = call([str(BIN / "lenet-dist"), "predict", "--model", str(output), str(files[0])], timeout=120)
    assert text.returncode == 0 and text.stdout.startswith(f"{files[0]}: {truth[0]}   top-3:")


@pytest.mark.slow
def test_fashion_mnist(tmp_path, fashion_dir):
    result = call([*TRAIN, "--dataset", "fashion-mnist", "--data-dir", str(fashion_dir),
                  "--output-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    metrics = read_metrics(tmp_path)
    assert metrics["final_test_accuracy"] > 0.85
    assert metrics["config"]["dataset"] == "fashion-mnist"
    assert_png(tmp_path / "confusion_matrix.png")
