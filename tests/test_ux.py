"""What users see: progress on a terminal or in a log, TensorBoard scalars, figures, predict, other data sets."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import BIN, FIGURES, ROOT, assert_png, read_metrics, run
from lenet_dist.data import load_split

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, data_dir) -> tuple[Path, subprocess.CompletedProcess]:
    output = tmp_path_factory.mktemp("logged")
    result = run([sys.executable, "lenet_dist/train.py", "--epochs", "2", "--log-with", "tensorboard",
                  "--output-dir", str(output)])
    assert result.returncode == 0, result.stderr
    return output, result


def test_plain_progress_lines_and_summary_when_not_a_terminal(logged_run):
    _, result = logged_run
    progress_lines = [line for line in result.stdout.splitlines() if line.startswith("epoch 1/2  step ")]
    assert 3 <= len(progress_lines) <= 5, result.stdout  # a line each quarter epoch, not one per step
    assert "images/s" in progress_lines[0] and "loss" in progress_lines[0]
    assert "\x1b[" not in result.stdout  # no terminal control codes in logs
    assert "train images/s" in result.stdout  # the summary table
    for figure in FIGURES:
        assert figure in result.stdout  # train lists where its figures went


def test_rich_progress_bar_on_a_terminal(tmp_path, data_dir):
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "lenet_dist/train.py", "--epochs", "1", "--output-dir", str(tmp_path)],
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
    assert "epoch 1/1  step " not in shown  # not the plain log lines


def test_tensorboard_scalars_read_back(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output, _ = logged_run
    events = EventAccumulator(str(output / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "test/accuracy", "train/images_per_second"} <= tags
    # every --log-every (10) steps, and at each epoch's last step (469 per epoch)
    assert [e.step for e in events.Scalars("train/loss")] == sorted(set(range(10, 939, 10)) | {469, 938})
    accuracy = [event.value for event in events.Scalars("test/accuracy")]
    assert accuracy == pytest.approx([e["test_accuracy"] for e in read_metrics(output)["epochs"]])
    for figure in FIGURES:
        assert_png(output / figure)


def test_predict_reads_users_images(logged_run, tmp_path, data_dir):
    output, _ = logged_run
    test = load_split(data_dir, "test")
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
    broken = tmp_path / "notes.png"
    broken.write_text("this is not an image")
    result = run([str(BIN / "lenet-dist"), "predict", "--model", str(output), "--json",
                  str(files[0]), str(broken), *map(str, files[1:])], timeout=300)
    assert result.returncode == 2  # one file failed
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and str(broken) in result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["file"] for a in answers] == list(map(str, files))  # the others were all classified
    correct = sum(a["prediction"] == t for a, t in zip(answers, truth))
    assert correct >= 95, correct
    assert all(len(a["top"]) == 3 and a["top"][0]["probability"] >= a["top"][1]["probability"] for a in answers)
    text = run([str(BIN / "lenet-dist"), "predict", "--model", str(output), str(files[0])], timeout=120)
    assert text.returncode == 0 and text.stdout.startswith(f"{files[0]}: {truth[0]}   top-3:")


def test_fashion_mnist_from_flat_gzipped_folder(tmp_path):
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"Fashion-MNIST is expected at {FASHION_DIR}: apt-get install dataset-fashion-mnist")
    result = run([sys.executable, "lenet_dist/train.py", "--dataset", "fashion-mnist", "--data-dir", str(FASHION_DIR),
                  "--output-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    metrics = read_metrics(tmp_path)
    assert metrics["final_test_accuracy"] > 0.85
    assert metrics["config"]["dataset"] == "fashion-mnist"
    assert_png(tmp_path / "confusion_matrix.png")
