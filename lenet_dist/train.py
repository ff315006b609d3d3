"""Train LeNet-5 on MNIST through accelerate, on one CPU process, several CPU processes or GPUs.

    python -m lenet_dist.train [flags]              # one process, no accelerate config needed
    accelerate launch -m lenet_dist.train [flags]   # processes, precision, dynamo: accelerate's config
    torchrun --nproc-per-node N -m lenet_dist.train [flags]
    python lenet_dist/train.py [flags]              # from a checkout, the same as the first

Only rank 0 prints and writes into the output directory. `train()` is the story, `fit` its loop: after each
step it does what the cadence (cadence.py) says is due. `evaluate` is the test pass.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, NoReturn

if __name__ == "__main__" and {"-h", "--help", "--version"} & set(sys.argv[1:]):  # answered before torch loads
    from lenet_dist.config import parse_train_config

    parse_train_config()

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed

from lenet_dist.cadence import Cadence, RunState
from lenet_dist.checkpoint import (
    RUN_CONFIG_FILE,
    Choice,
    CorruptCheckpoint,
    complete_checkpoints,
    initialize_from,
    newest_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from lenet_dist.config import TrainConfig, parse_train_config
from lenet_dist.console import ProgressBar, print_summary, printing_while_read
from lenet_dist.data import ShuffledBatches, ensure_dataset_everywhere
from lenet_dist.distributed.launch_records import launch_record, record_stop
from lenet_dist.distributed.lost_ranks import Ranks
from lenet_dist.distributed.processes import (
    announce,
    end_processes,
    make_accelerator,
    pin_cores,
    precision_label,
    start_processes,
)
from lenet_dist.distributed.signals import Stopped, StopRequest, signal_name, stop_on_signals
from lenet_dist.errors import (
    UsageError,
    UserError,
    exit_on_user_error,
    exit_quickly,
    launched_as_rank_zero,
    on_every_rank,
    status_of,
)
from lenet_dist.evaluation import evaluate, evaluate_and_record, warm_up_evaluation
from lenet_dist.files import write_json
from lenet_dist.model import unwrapped
from lenet_dist.output_dir import OutputDir, abandon_output_dir, claim_output_dir
from lenet_dist.outputs import run_metrics, write_run_outputs
from lenet_dist.profiling.capture import (
    no_trace_line,
    profiler_for,
    remove_traces,
    run_trace_dir,
    traced,
)
from lenet_dist.recipe.build import Trainer, build_trainer
from lenet_dist.resume import checkpoint_to_resume, new_run_id, set_aside_later_checkpoints
from lenet_dist.steps import Step, make_step, wants_cuda_graph
from lenet_dist.trackers import logging_dir, require_installed, start_trackers


def train(config: TrainConfig) -> dict[str, Any]:
    state = start_processes(config.collective_timeout)
    check_run(config, state.num_processes)
    set_seed(config.seed, deterministic=config.deterministic)
    if config.pin_cores:
        pin_cores(state)
    data_dir = config.resolved_data_dir()
    ensure_dataset_everywhere(state, data_dir, config.dataset)
    claimed = claim_output_dir(state, config.output_dir, resume=config.resume, overwrite=config.overwrite,
                               profile_dir=config.profile_dir)
    output_dir = claimed.path
    config = replace(config, data_dir=str(data_dir), output_dir=str(output_dir))
    accelerator = make_accelerator(config, output_dir, logging_dir(output_dir))
    ranks = Ranks(state, config.collective_timeout)
    try:
        trainer = build_trainer(config, accelerator, data_dir, output_dir,
                                capturable=wants_cuda_graph(config, accelerator))
        progress, resumed = start_or_resume(trainer, claimed)
    except (UserError, KeyboardInterrupt):  # refused or interrupted before training: no output dir left behind
        abandon_output_dir(state, claimed)
        raise
    announce(state, f"LeNet-5 on {trainer.train_images:,} {config.dataset} images, recipe {config.recipe}: "
                    f"{state.num_processes} process(es) on {accelerator.device.type}, global batch "
                    f"{config.batch_size}, precision {precision_label(accelerator)}")
    cadence = Cadence(config, len(trainer.batches), accelerator.num_processes)
    step, compiling_seconds = make_step(trainer, score=cadence.reads_training_accuracy)
    progress.compile_seconds += compiling_seconds

    profile_dir = run_trace_dir(config.profile_dir, output_dir)
    if config.profile and not resumed:  # a run started afresh: no traces of an earlier one mixed in
        remove_traces(profile_dir, f"rank{state.process_index}")
    # Caught to the end: a signal after the last step waits the second the outputs take, rather than leaving a
    # finished run without them.
    steps_before = progress.global_step
    with stop_on_signals() as stop:
        try:
            with profiler_for(config, profile_dir, f"rank{state.process_index}") as profiler:
                predictions = fit(trainer, cadence, step, progress, stop, profiler)
        except RuntimeError as error:  # a collective that failed because a rank is gone: name it
            lost = ranks.lost(error, newest_checkpoint(output_dir, ranks.rank, ranks.host(0)))
            if lost is None or state.num_processes == 1:
                raise
            raise lost from None
        recorded = config.profile and traced(profile_dir, f"rank{state.process_index}")
        if recorded:
            announce(state, f"profiler traces (one per rank): {profile_dir}/  inspect: lenet-dist inspect "
                            f"{output_dir}")
        elif config.profile:  # the run ended before the profiler's window: no trace to announce, nor to record
            announce(state, no_trace_line(progress.global_step - steps_before, config.profile_wait,
                                          config.profile_warmup, config.profile_active))

        metrics = run_metrics(trainer, cadence, progress, precision_label(accelerator), step.cuda_graph) | {
            "profile_dir": str(profile_dir.resolve()) if recorded else None}
        if accelerator.is_main_process:
            network = unwrapped(trainer.model)
            written = write_run_outputs(output_dir, metrics, network, predictions, trainer.test.images,
                                        trainer.test.info.classes)
            print_summary(metrics)
            announce(state, f"wrote {output_dir}/: " + ", ".join(path.name for path in written))
            if config.show:
                from lenet_dist.figures import show_png

                show_png(output_dir / "predictions.png")  # or one line saying why it cannot
        accelerator.end_training()
    if stop.signal is not None and accelerator.is_main_process:
        print(f"{signal_name(stop.signal)} came as the run finished: its outputs were written first; the run is "
              "complete, nothing is left to resume", file=sys.stderr, flush=True)
    return metrics


def check_run(config: TrainConfig, processes: int) -> None:
    """What can be refused before any work: flags that cannot work together or with this launch."""
    on_every_rank(lambda: require_installed(config.trackers()))  # each node's own packages
    if config.batch_size % processes:
        raise UsageError(f"--batch-size {config.batch_size} is the global batch and must divide evenly across "
                         f"{processes} processes")
    if config.resume in ("auto", "latest") and not config.output_dir:
        raise UsageError(f"--resume{' auto' if config.resume == 'auto' else ''} needs --output-dir: it resumes the "
                         "checkpoints found there")


def start_or_resume(trainer: Trainer, claimed: OutputDir) -> tuple[RunState, bool]:
    """Where the run starts: the checkpoint --resume names (its state loaded on every rank), or afresh (from
    --init-from's weights, if given); then the trackers and config.json. Whether it resumed."""
    config, accelerator = trainer.config, trainer.accelerator
    progress = RunState(trajectory=config.trajectory(), run_id=broadcast_object_list([new_run_id()])[0])
    checkpoint = checkpoint_to_resume(config.resume, claimed.path)
    while checkpoint is not None:
        try:
            progress = restore_checkpoint(trainer, checkpoint, config)
            break
        except CorruptCheckpoint as error:
            checkpoint = skip_corrupt(trainer, checkpoint, claimed.path, error)
    if checkpoint is None and config.init_from:
        on_every_rank(lambda: initialize_from(trainer, Path(config.init_from)))  # from each rank's own disk
    start_trackers(accelerator, config, claimed.path)
    if checkpoint is not None:
        saved_by = (f" (saved by {progress.processes} processes)" if progress.processes != accelerator.num_processes
                    else "")
        if Cadence(config, len(trainer.batches), accelerator.num_processes).finished(progress):
            # the run's final checkpoint: the process ended before the outputs were written (killed)
            announce(accelerator.state, f"resumed from {checkpoint.path}: training had finished (step "
                                        f"{progress.global_step}{saved_by}); writing the run's outputs")
        else:
            announce(accelerator.state, f"resumed from {checkpoint.path}: epoch {progress.epoch}, step "
                                        f"{progress.global_step}{saved_by}")

    def record_start() -> None:  # only now: a refused run leaves the folder's config.json as it was
        write_json(claimed.path / RUN_CONFIG_FILE, {"run_id": progress.run_id, **asdict(config)})
        if checkpoint is not None and (moved := set_aside_later_checkpoints(claimed.path, progress.global_step)):
            print(f"checkpoints after step {progress.global_step} (the continuation this resume leaves) moved to "
                  f"{moved}/", flush=True)

    on_every_rank(record_start if accelerator.is_main_process else lambda: None)
    return progress, checkpoint is not None


def skip_corrupt(trainer: Trainer, checkpoint: Choice, run_dir: Path, error: CorruptCheckpoint) -> Choice | None:
    """--resume auto: set the unreadable checkpoint aside (kept, never chosen again, so that a requeued job does not
    fail the same way each time) and choose again, saying so. Otherwise refuse, naming the checkpoint before it."""
    older = [path for path in complete_checkpoints(checkpoint.path.parent.parent) if path.name < checkpoint.path.name]
    if trainer.config.resume != "auto":
        raise CorruptCheckpoint(f"{error}" + (f" (the one before it: --resume {older[-1]})" if older else "")) from None
    aside = checkpoint.path.with_name(f"corrupt-{checkpoint.path.name}")

    def set_aside() -> None:
        try:
            checkpoint.path.rename(aside)
        except OSError as failure:
            raise CorruptCheckpoint(f"{error}; setting it aside failed ({failure.strerror})") from None

    on_every_rank(set_aside if trainer.accelerator.process_index == checkpoint.holder else lambda: None)
    chosen = checkpoint_to_resume("auto", run_dir)
    if trainer.accelerator.is_main_process:
        instead = f"resuming from {chosen.path}" if chosen else "no checkpoint before it: starting afresh"
        print(f"{str(error).split(';')[0].removeprefix('--resume ')}; set aside as {aside.name}/, {instead}",
              file=sys.stderr, flush=True)
    return chosen


def fit(trainer: Trainer, cadence: Cadence, step: Step, progress: RunState, stop: StopRequest,
        profiler: Any) -> dict[str, torch.Tensor]:
    """Train until the last epoch ends or an evaluation reaches the target; the last evaluation's predictions.

    After each step the cadence says whether this is a log point. There the ranks sum their losses and agree on
    any stop signal (two collectives), and the cadence says what is due, which is done right here, in order. A
    stop the ranks agreed on saves a checkpoint at that step and raises Stopped.
    """
    accelerator = trainer.accelerator
    warm_up_evaluation(trainer)
    if cadence.finished(progress):  # resumed from the final checkpoint: killed before the outputs were written
        return evaluate(accelerator, trainer.model, trainer.test_loader)
    sums = StepSums(accelerator.device)
    with progress_bar(trainer, progress) as bar:  # its clock is the run's training time
        trainer.model.train()
        for images, labels in profiler.batches(remaining_batches(trainer, progress)):
            loss, right = step(images, labels)
            profiler.step()
            sums.add(loss, right)
            progress.step_done()
            if not cadence.is_log_point(progress, stop.signal):
                bar.update(progress.batches_done)
                continue
            bar.update(progress.batches_done, log_training(trainer, progress, sums))
            due = cadence.due(progress, stop.agreed(accelerator.device))
            if not due:
                continue

            progress.add_training_time(bar.pause())
            if due.evaluate:
                predictions = evaluate_and_record(trainer, progress, due.epoch_end)
            if due.epoch_end:
                progress.start_next_epoch()
            finished = cadence.finished(progress)
            if due.checkpoint or finished:
                checkpoint = save_checkpoint(trainer, trainer.output_dir, progress, trainer.config.keep_checkpoints)
                if due.stop is not None and not finished:
                    raise Stopped(due.stop, progress.global_step, checkpoint)
            if finished:
                return predictions  # finishing takes an evaluation: an epoch's end, or one that met the target
            bar.resume(progress.epoch)
            trainer.model.train()
    raise AssertionError(f"the batches ran out at step {progress.global_step} before the cadence finished the run")


class StepSums:
    """Since the last log point, the steps' losses and images right before learning: device tensors (an .item()
    per step would stall a GPU), summed and reduced over the ranks once per log point."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.losses, self.rights = device, [], []

    @property
    def steps(self) -> int:
        return len(self.losses)

    def add(self, loss: torch.Tensor, right: torch.Tensor | None) -> None:
        self.losses.append(loss)
        if right is not None:
            self.rights.append(right)

    def reduce(self, accelerator: Accelerator) -> tuple[list[float], float]:
        """Each step's loss, the mean over every rank, and the images right; the window restarts. Per step, so that
        the epoch's sum is the same however a stop or a resume cut the windows."""
        right = torch.stack(self.rights).sum().float() if self.rights else torch.zeros((), device=self.device)
        totals = accelerator.reduce(torch.cat((torch.stack(self.losses), right[None])), reduction="sum").tolist()
        self.losses, self.rights = [], []
        return [loss / accelerator.num_processes for loss in totals[:-1]], totals[-1]


def progress_bar(trainer: Trainer, progress: RunState) -> ProgressBar:
    config = trainer.config
    return ProgressBar(enabled=trainer.accelerator.is_main_process, fancy=config.progress and sys.stdout.isatty(),
                       epoch=progress.epoch, epochs=config.epochs, steps=len(trainer.batches),
                       batch_size=config.batch_size, done=progress.batches_done)


def log_training(trainer: Trainer, progress: RunState, sums: StepSums) -> float:
    """At a log point: the mean training loss over every rank since the last one and the learning rate into the
    run's series and the trackers; the batches' right answers into `progress.recent`. The mean loss."""
    batch_size, steps = trainer.config.batch_size, sums.steps
    losses, right = sums.reduce(trainer.accelerator)
    for loss in losses:
        progress.loss_sum += loss
    mean_loss = sum(losses) / steps
    if not math.isfinite(mean_loss):
        raise UserError(f"training loss became {mean_loss} by step {progress.global_step} (epoch {progress.epoch}); "
                        f"the last good checkpoint is kept in {trainer.output_dir / 'checkpoints'}; lower --lr")
    progress.note_recent(steps * batch_size, right, closing=progress.global_step % trainer.config.log_every == 0)
    # the last group's is --lr's (Adam's); under --optimizer muon the first one's is --muon-lr's
    *muon, lr = (float(rate) for rate in trainer.lr_scheduler.get_last_lr())
    rates = {"lr": lr} | ({"muon_lr": muon[0]} if muon else {})
    progress.train_log.append({"step": progress.global_step, "epoch": progress.epoch,
                               "images": progress.global_step * batch_size, "loss": mean_loss, **rates})
    trainer.accelerator.log({"train/loss": mean_loss, **{f"train/{name}": rate for name, rate in rates.items()}},
                            step=progress.global_step)
    return mean_loss


def remaining_batches(trainer: Trainer, progress: RunState) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every batch still to train, epoch after epoch, from where `progress` stands (the loop moves it on)."""
    while progress.epoch <= trainer.config.epochs:
        yield from epoch_batches(trainer, progress)


def epoch_batches(trainer: Trainer, progress: RunState) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """This epoch's batches from where `progress` stands; the order is a function of (seed, epoch) alone."""
    batches = trainer.batches
    if isinstance(batches, ShuffledBatches):
        return batches.epoch(progress.epoch - 1, start=progress.batches_done)
    batches.set_epoch(progress.epoch - 1)
    if progress.batches_done:  # resuming mid-epoch: the same order, minus the batches already trained
        batches = trainer.accelerator.skip_first_batches(batches, progress.batches_done)
        batches.set_epoch(progress.epoch - 1)
    return batches


def train_command(config: TrainConfig) -> int:
    """`lenet-dist train`: train; a stop on a signal (its checkpoint saved) becomes one line and the exit status
    128 + N. A reader that closes stdout (`| head`) or a terminal that hangs up stops the printing, not the run."""
    with printing_while_read():
        try:
            train(config)
        except Stopped as stopped:
            record_stop(stopped.signal, stopped.step, stopped.checkpoint)
            if launched_as_rank_zero():
                print(stopped, file=sys.stderr, flush=True)
            return stopped.exit_status
        finally:
            end_processes()
    return 0


def main(argv: list[str] | None = None) -> NoReturn:
    def command() -> int:
        with exit_on_user_error(), launch_record():
            return train_command(parse_train_config(argv))

    exit_quickly(status_of(command))


if __name__ == "__main__":
    main()
