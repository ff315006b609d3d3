"""What rank 0 shows while training: a rich progress bar on a terminal, plain lines in logs, a summary table.

A run outlives its reader: when stdout's pipe closes (`| head -2`) or its terminal hangs up (a closed SSH
session), training goes on and writes its files, the console just stops printing. Every other command ends
quietly with 141 when its pipe closes (errors.status_of).
"""

from __future__ import annotations

import errno
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import rich.console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from lenet_dist.errors import to_devnull

# a write to a pipe whose reader has gone, or to a terminal that hung up
GONE = (errno.EPIPE, errno.EIO)


class Console(rich.console.Console):
    """rich's console, but a closed pipe is left to lenet-dist: rich's own answer is exit 1, whatever the command."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError


class _StreamWithoutReader:
    """A stream (stdout, stderr) until its reader has gone; from then on /dev/null, and the writer carries on."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as error:
            if error.errno not in GONE:
                raise
            to_devnull(self._stream)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as error:
            if error.errno not in GONE:
                raise
            to_devnull(self._stream)

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding: the stream's own
        return getattr(self._stream, name)


@contextmanager
def printing_while_read() -> Iterator[None]:
    """Inside the block, a closed stdout or stderr (a pipe, a hung-up terminal) stops the printing, not the work
    (training's: a reader that stopped reading is no reason to lose the run)."""
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (_StreamWithoutReader(stream) for stream in streams)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = streams


class ProgressBar:
    """An epoch's progress on the main process (silent on the others), paused while the loop evaluates or saves.

    On a terminal a rich bar with images/s, loss and ETA; in logs, pipes or with --no-progress, a plain line each
    quarter epoch.
    """

    PLAIN_LINES_PER_EPOCH = 4

    def __init__(self, *, enabled: bool, fancy: bool, epoch: int, epochs: int, steps: int, batch_size: int,
                 done: int = 0) -> None:
        self.enabled, self.fancy, self.epochs, self.steps, self.batch_size = enabled, fancy, epochs, steps, batch_size
        self.bar: Progress | None = None
        self._start(epoch, done)

    def _start(self, epoch: int, done: int) -> None:
        self.epoch, self.started, self.done_at_start = epoch, time.perf_counter(), done
        self.printed_quarter = done * self.PLAIN_LINES_PER_EPOCH // max(self.steps, 1)  # the last quarter passed
        if self.enabled and self.fancy:
            self.bar = Progress(
                TextColumn(f"epoch {epoch}/{self.epochs}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}  {task.fields[loss]}"), TimeRemainingColumn(),
                console=Console(file=sys.stdout), transient=True,
            )
            # blank until measured: a bar that starts or restarts has no rate or loss yet
            self.task = self.bar.add_task("train", total=self.steps, completed=done, rate="", loss="")
            self.bar.start()
        self.resumed_at = self.started

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *_) -> None:  # a failure (a NaN loss, a lost rank) leaves no live bar behind
        self.close()

    def images_per_second(self, done: int) -> float:
        return (done - self.done_at_start) * self.batch_size / max(time.perf_counter() - self.started, 1e-9)

    def update(self, done: int, loss: float | None = None) -> None:
        """`done` steps of this epoch finished; `loss` is given at each log interval."""
        if not self.enabled:
            return
        if self.bar is not None:
            fields = {"rate": f"{self.images_per_second(done):>8,.0f} img/s"} if done > self.done_at_start else {}
            fields |= {"loss": f"loss {loss:.4f}"} if loss is not None else {}
            self.bar.update(self.task, completed=done, **fields)
        elif loss is not None and done * self.PLAIN_LINES_PER_EPOCH // self.steps > self.printed_quarter:
            self.printed_quarter = done * self.PLAIN_LINES_PER_EPOCH // self.steps
            print(
                f"epoch {self.epoch}/{self.epochs}  step {done}/{self.steps}  loss {loss:.4f}  "
                f"{self.images_per_second(done):,.0f} images/s",
                flush=True,
            )

    def pause(self) -> float:
        """Off the screen while the loop evaluates or saves; `resume` puts it back with its count, rate and ETA.
        The seconds trained since the bar started or resumed: the run's training time leaves the rest out."""
        self.paused_at = time.perf_counter()
        if self.bar is not None:
            self.bar.stop()
        return self.paused_at - self.resumed_at

    def resume(self, epoch: int) -> None:
        """Back on the screen: the same bar, or a new one from the start of the next epoch."""
        if epoch != self.epoch:
            self.close()
            self._start(epoch, 0)
            return
        self.resumed_at = time.perf_counter()
        self.started += self.resumed_at - self.paused_at  # the rate is of training time only
        if self.bar is not None:
            self.bar.start()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def summary_table(metrics: dict[str, Any]) -> Table:
    table = Table(
        # the device's type, as the run's first line says it: rank 0's own (cuda:0) would misname the others'
        title=f"LeNet-5, recipe {metrics['config']['recipe']}: {metrics['world_size']} process(es) on "
        f"{metrics['device'].partition(':')[0]}, "
        f"precision {metrics['precision']}, global batch {metrics['config']['batch_size']}"
    )
    for column in ("epoch", "train loss", "test accuracy", "train seconds", "train images/s"):
        table.add_column(column, justify="right")
    for record in metrics["epochs"]:
        table.add_row(
            str(record["epoch"]), f"{record['train_loss']:.4f}", f"{record['test_accuracy']:.2%}",
            f"{record['train_seconds']:.1f}", f"{record['train_images_per_second']:,.0f}",
        )
    return table


def wide_console(width_when_piped: int) -> Console:
    """rich's console: as wide as the terminal, or in a log or a pipe wide enough never to cut a column."""
    terminal = Console(file=sys.stdout)
    return terminal if terminal.is_terminal else Console(file=sys.stdout, width=width_when_piped)


def print_summary(metrics: dict[str, Any]) -> None:
    """The epochs' table (when an epoch finished) and, for a run with a target, when it was reached."""
    console = wide_console(120)
    if metrics["epochs"]:
        console.print(summary_table(metrics))
    reached = metrics["reached_target"]
    if reached:
        console.print(f"reached {reached['test_accuracy']:.2%} at step {reached['step']:,} (epoch {reached['epoch']}, "
                      f"{reached['images']:,} images) after {reached['elapsed_seconds']:.1f} s of training and "
                      "evaluation", highlight=False)
    elif reached is False:
        best, target = metrics["best_evaluation"], metrics["config"]["target_accuracy"]
        console.print(f"target {target:.2%} not reached; best {best['test_accuracy']:.2%} at step {best['step']:,} "
                      f"(epoch {best['epoch']})", highlight=False)
