"""The progress a run shows: the live bar on a terminal, plain lines in a log, and the summary table after."""

from __future__ import annotations

import time

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
