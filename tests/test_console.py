"""The progress a run shows: the live bar on a terminal, plain lines in a log, and the summary table after."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import time

import pytest

from conftest import FIGURES, ROOT, TRAIN
from lenet_dist.console import ProgressBar


def test_the_bar_keeps_its_rate_and_eta_over_a_checkpoints_pause(capsys):
    """The loop pauses the bar to evaluate or save, then resumes the same bar: its steps, its images/s and the
    speed rich's ETA is computed from carry on (a new bar showed no rate and '-:--:--' after every checkpoint)."""
    shown = ProgressBar(enabled=True, fancy=True, epoch=1, epochs=1, steps=100, batch_size=8)
    started = shown.started
    for done in range(1, 21):
        shown.update(done, loss=1.0 if done % 10 == 0 else None)
    shown.pause()
    time.sleep(0.05)  # the time the checkpoint took
    shown.resume(epoch=1)
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
