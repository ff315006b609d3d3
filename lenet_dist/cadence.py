"""The loop's cadence: where a run stands (`RunState`) and what is due after a step (`Due`).

After every step the loop asks `Cadence` whether this is a log point (`is_log_point`), where the ranks
synchronise once; and there, what is due (`due`): evaluate, end the epoch, checkpoint, stop. The answers
depend on the progress counters, the config and the agreed stop signal, never on a clock, so every rank,
and a run resumed from a checkpoint, does the same things at the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lenet_dist.config import TrainConfig

# With --target-accuracy and no --eval-every, the test set is evaluated when the training batches' accuracy
# (each scored before the step that learns from it) over this many recent images reaches the target...
PROGRESSIVE_IMAGES = 2048
# ...and at least this many images were trained since the last evaluation.
EVALUATION_GAP_IMAGES = 2048


@dataclass
class RunState:
    """Where training stands: saved with every checkpoint (progress.json), restored on --resume."""

    epoch: int = 1  # the epoch in progress, 1-based
    batches_done: int = 0  # batches of that epoch already trained
    global_step: int = 0
    loss_sum: float = 0.0  # sum of that epoch's batch losses so far (the mean over ranks)
    train_seconds: float = 0.0  # time spent training (this epoch's share is epoch_train_seconds)
    eval_seconds: float = 0.0  # time spent evaluating
    epoch_train_seconds: float = 0.0
    compile_seconds: float = 0.0  # --compile: compiling the graphs before the first step
    epochs: list[dict[str, Any]] = field(default_factory=list)  # finished epochs' records
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # every test-set evaluation
    train_log: list[dict[str, Any]] = field(default_factory=list)  # the loss and lr at every logged step
    recent: list[tuple[int, int]] = field(default_factory=list)  # (images, right before learning) per stretch
    open_stretch: list[int] = field(default_factory=lambda: [0, 0])  # the stretch since the last one closed
    trajectory: dict[str, Any] = field(default_factory=dict)
    processes: int = 1  # how many processes saved it (for the resume message only)
    run_id: str = ""  # the run's, set when it starts afresh (new_run_id): --resume auto accepts only its own

    @property
    def elapsed_seconds(self) -> float:
        return self.train_seconds + self.eval_seconds

    def add_training_time(self, seconds: float) -> None:
        self.train_seconds += seconds
        self.epoch_train_seconds += seconds

    def step_done(self) -> None:
        self.batches_done += 1
        self.global_step += 1

    def start_next_epoch(self) -> None:
        self.epoch, self.batches_done, self.loss_sum, self.epoch_train_seconds = self.epoch + 1, 0, 0.0, 0.0

    def note_recent(self, images: int, right: float, closing: bool) -> None:
        """The batches' accuracy before learning, in stretches of --log-every steps, kept over just enough of them
        to cover PROGRESSIVE_IMAGES. Other log points add to the open stretch (`closing` False), so that a resumed
        run's stretches are the uninterrupted run's."""
        self.open_stretch = [self.open_stretch[0] + images, self.open_stretch[1] + round(right)]
        if not closing:
            return
        self.recent.append((self.open_stretch[0], self.open_stretch[1]))
        self.open_stretch = [0, 0]
        while len(self.recent) > 1 and sum(count for count, _ in self.recent[1:]) >= PROGRESSIVE_IMAGES:
            self.recent.pop(0)


@dataclass(frozen=True)
class Due:
    """What the loop does after a logged step, in this order."""

    evaluate: bool = False  # on the whole test set
    epoch_end: bool = False  # record the epoch, start the next
    checkpoint: bool = False  # saved after the evaluation, so that it holds it
    stop: int | None = None  # the signal to stop for, after saving

    def __bool__(self) -> bool:
        """Whether anything is due."""
        return self != Due()


class Cadence:
    """One run's answers. Evaluations come at each epoch's end, every --eval-every steps, and with
    --target-accuracy alone when the training batches say the target is in reach (`_in_reach`): in the first
    epoch those images are new to the model, a free if lagging estimate of the test accuracy."""

    def __init__(self, config: TrainConfig, steps_per_epoch: int, processes: int) -> None:
        self.config, self.steps_per_epoch, self.processes = config, steps_per_epoch, processes

    @property
    def reads_training_accuracy(self) -> bool:
        """Whether `_in_reach` is asked: only then must a step count its images right."""
        return self.config.target_accuracy is not None and not self.config.eval_every

    def is_log_point(self, progress: RunState, signal: int | None) -> bool:
        """`signal` is this process's own: one process stops at the step it was signalled at, several agree on
        it at their next log point."""
        step, config = progress.global_step, self.config
        return (step % config.log_every == 0 or self._epoch_ends(progress) or self._checkpoint_due(step)
                or self._scheduled_evaluation(step) or (self.processes == 1 and signal is not None))

    def due(self, progress: RunState, signal: int | None) -> Due:
        """What is due at this log point; `signal` is the one every rank agreed on (None: no stop asked)."""
        epoch_end = self._epoch_ends(progress)
        evaluate = epoch_end or self._scheduled_evaluation(progress.global_step) or self._in_reach(progress)
        return Due(evaluate=evaluate, epoch_end=epoch_end, stop=signal,
                   checkpoint=epoch_end or signal is not None or self._checkpoint_due(progress.global_step))

    def finished(self, progress: RunState) -> bool:
        """The last epoch has ended, or the last evaluation reached the target."""
        return progress.epoch > self.config.epochs or (
            bool(progress.evaluations) and self.meets_target(progress.evaluations[-1]))

    def meets_target(self, evaluation: dict[str, Any]) -> bool:
        return self.config.target_accuracy is not None and evaluation["test_accuracy"] >= self.config.target_accuracy

    def _epoch_ends(self, progress: RunState) -> bool:
        return progress.batches_done == self.steps_per_epoch

    def _checkpoint_due(self, step: int) -> bool:
        return bool(self.config.checkpoint_every) and step % self.config.checkpoint_every == 0

    def _scheduled_evaluation(self, step: int) -> bool:
        return bool(self.config.eval_every) and step % self.config.eval_every == 0

    def _in_reach(self, progress: RunState) -> bool:
        """The target, by the training batches' recent accuracy, at a stretch's close; after the first epoch the
        batches were seen before and run ahead of the test set, so each evaluation there that missed doubles the
        wait for the next."""
        config = self.config
        if not self.reads_training_accuracy or progress.open_stretch[0]:
            return False
        last = progress.evaluations[-1]["step"] if progress.evaluations else 0
        misses = sum(evaluation["epoch"] > 1 and not self.meets_target(evaluation)
                     for evaluation in progress.evaluations)
        if (progress.global_step - last) * config.batch_size < EVALUATION_GAP_IMAGES * 2**misses:
            return False
        images = sum(count for count, _ in progress.recent)
        right = sum(correct for _, correct in progress.recent)
        return images >= PROGRESSIVE_IMAGES and right >= config.target_accuracy * images
