"""Train LeNet-5 on MNIST through accelerate, on one CPU process, several CPU processes or GPUs.

    python -m lenet_dist.train [flags]              # one process, no accelerate config needed
    accelerate launch -m lenet_dist.train [flags]   # processes, precision, dynamo: accelerate's config
    torchrun --nproc-per-node N -m lenet_dist.train [flags]
    python lenet_dist/train.py [flags]              # from a checkout, the same as the first

Only the main process (rank 0) prints and writes into the output directory. `train()` is the story;
`train_one_epoch` and `evaluate` are its two loops.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed

from lenet_dist.checkpoint import (
    RunState,
    checkpoint_to_resume,
    complete_checkpoints,
    initialize_from,
    restore_checkpoint,
    save_checkpoint,
    trajectory_of,
)
from lenet_dist.config import TrainConfig, parse_train_config
from lenet_dist.data import ShuffledBatches, ensure_dataset
from lenet_dist.errors import UsageError, UserError, exit_on_user_error, exit_quickly, launched_as_rank_zero
from lenet_dist.files import write_json
from lenet_dist.launching import launch_record, record_stop
from lenet_dist.outputs import abandon_output_dir, claim_output_dir, versions, write_run_outputs
from lenet_dist.preemption import Stopped, StopRequest, stop_on_signals
from lenet_dist.processes import (
    Ranks,
    agree_on_any,
    announce,
    end_processes,
    make_accelerator,
    pin_cores,
    start_processes,
)
from lenet_dist.profiling import labelled, profiler_for, run_trace_dir
from lenet_dist.recipe import PROGRESSIVE_IMAGES, EvaluationCadence, Trainer, build_trainer, precision_label
from lenet_dist.reporting import EpochReporter, print_summary
from lenet_dist.steps import GraphedStep, make_step
from lenet_dist.trackers import logging_dir, require_installed, start_trackers


def train(config: TrainConfig) -> dict[str, Any]:
    state = start_processes(config.collective_timeout)
    check_run(config, state.num_processes)
    set_seed(config.seed, deterministic=config.deterministic)
    if config.pin_cores:
        pin_cores(state)
    data_dir = config.resolved_data_dir()
    ensure_dataset_everywhere(state, data_dir, config.dataset)
    claimed = claim_output_dir(state, config)
    output_dir = claimed.path
    config = replace(config, data_dir=str(data_dir), output_dir=str(output_dir))
    accelerator = make_accelerator(config, output_dir, logging_dir(output_dir))
    ranks = Ranks(state)
    trainer = build_trainer(config, accelerator, data_dir, output_dir)

    run = RunState(trajectory=trajectory_of(config))
    try:
        checkpoint = checkpoint_to_resume(config.resume, output_dir)
        if checkpoint is not None:
            run = restore_checkpoint(trainer, checkpoint, config)
        elif config.init_from:
            initialize_from(trainer, Path(config.init_from))
        start_trackers(accelerator, config, output_dir)
    except UserError:
        abandon_output_dir(state, claimed)  # a refused run leaves nothing behind
        raise
    if checkpoint is not None:
        announce(state, f"resumed from {checkpoint.path}: epoch {run.epoch}, step {run.global_step}"
                        + (f" (saved by {run.processes} processes)" if run.processes != state.num_processes else ""))
    if accelerator.is_main_process:  # only now: a refused run leaves the folder's config.json as it was
        write_json(output_dir / "config.json", asdict(config))
    announce(state, f"LeNet-5 on {trainer.train_images:,} {config.dataset} images, recipe {config.recipe}: "
                    f"{state.num_processes} process(es) on {accelerator.device.type}, global batch "
                    f"{config.batch_size}, precision {precision_label(accelerator)}")
    trainer.step = make_step(trainer, run)

    profile_dir = run_trace_dir(config.profile_dir, output_dir)
    if config.profile and checkpoint is None:  # a run started afresh: no traces of an earlier one mixed in
        for stale in profile_dir.glob(f"rank{state.process_index}.*"):
            stale.unlink()
    try:
        with stop_on_signals() as stop, profiler_for(config, profile_dir, f"rank{state.process_index}") as profiler:
            predictions = fit(trainer, run, stop, profiler)
    except RuntimeError as error:  # a collective that failed because a rank is gone: name it
        lost = ranks.lost(error, newest_checkpoint(output_dir, ranks)) if state.num_processes > 1 else None
        if lost is None:
            raise
        raise lost from None
    if config.profile:
        announce(state, f"profiler traces (one per rank): {profile_dir}/  inspect: lenet-dist inspect {profile_dir}")

    metrics = run_metrics(trainer, run) | {"profile_dir": str(profile_dir.resolve()) if config.profile else None}
    if accelerator.is_main_process:
        network = accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
        written = write_run_outputs(output_dir, metrics, network, predictions, trainer.test.images,
                                    trainer.test.info.classes)
        print_summary(metrics)
        announce(state, f"wrote {output_dir}/: " + ", ".join(path.name for path in written))
        if config.show:
            from lenet_dist.figures import show_png

            show_png(output_dir / "predictions.png")  # or one line saying why it cannot
    accelerator.end_training()
    return metrics


def ensure_dataset_everywhere(state: PartialState, data_dir: Path, dataset: str) -> None:
    """Rank 0 first (one download per shared disk), then the others, each on its own node's disk; a rank that
    cannot have the data stops every rank, with its one line."""
    for turn in (state.is_main_process, not state.is_main_process):
        problem = None
        if turn:
            try:
                ensure_dataset(data_dir, dataset)
            except UserError as error:
                problem = error
        agree_on_any(problem)


def newest_checkpoint(output_dir: Path, ranks: Ranks) -> str:
    """Where the job can resume from, as this rank can tell (rank 0 alone writes checkpoints, on its disk)."""
    found = complete_checkpoints(output_dir)
    if found:
        return f"the newest checkpoint is {found[-1]}"
    if ranks.rank:
        return f"checkpoints are on {ranks.host(0)}, rank 0's node"
    return "no checkpoint was saved yet"


def check_run(config: TrainConfig, processes: int) -> None:
    """What can be refused before any work: flags that cannot work together or with this launch."""
    require_installed(config.trackers())
    if config.batch_size % processes:
        raise UsageError(f"--batch-size {config.batch_size} is the global batch and must divide evenly across "
                         f"{processes} processes")
    if config.resume in ("auto", "latest") and not config.output_dir:
        raise UsageError(f"--resume{' auto' if config.resume == 'auto' else ''} needs --output-dir: it resumes the "
                         "checkpoints found there")


def fit(trainer: Trainer, run: RunState, stop: StopRequest, profiler: Any) -> dict[str, torch.Tensor]:
    """Train until the last epoch ends or the target accuracy is reached; the last evaluation's predictions."""
    config, accelerator = trainer.config, trainer.accelerator
    cadence = EvaluationCadence(config, len(trainer.batches))
    warm_up_evaluation(trainer)
    predictions = None
    while run.epoch <= config.epochs and not reached_target(config, run):
        until = cadence.next_evaluation(run)
        train_one_epoch(trainer, run, profiler, stop, until_step=until, cadence=cadence)
        epoch_ended = run.batches_done == len(trainer.batches)
        until = run.global_step if run.evaluation_due else until
        run.evaluation_due = False
        stop_signal = stop.agreed(accelerator.device)
        # a stop that lands on an evaluation's step evaluates first: a resumed run never looks back
        if stop_signal and not (epoch_ended or run.global_step == until):
            raise Stopped(stop_signal, run.global_step, save_checkpoint(trainer, trainer.output_dir, run,
                                                                        config.keep_checkpoints))
        started = time.perf_counter()
        predictions = evaluate(accelerator, trainer.model, trainer.test_loader)
        run.eval_seconds += time.perf_counter() - started
        record_evaluation(accelerator, config, run, predictions, epoch_ended)
        if epoch_ended:
            run.epoch, run.batches_done, run.loss_sum, run.epoch_train_seconds = run.epoch + 1, 0, 0.0, 0.0
        # saved after the evaluation, so that the checkpoint holds it
        if epoch_ended or reached_target(config, run) or checkpoint_due(config, run.global_step) or stop_signal:
            checkpoint = save_checkpoint(trainer, trainer.output_dir, run, config.keep_checkpoints)
            if stop_signal:
                raise Stopped(stop_signal, run.global_step, checkpoint)
    if predictions is None:  # resumed from the final checkpoint of a run that stopped before writing
        predictions = evaluate(accelerator, trainer.model, trainer.test_loader)
    return predictions


def warm_up_evaluation(trainer: Trainer) -> None:
    """One evaluation batch through the model before the clock starts: the first evaluation would otherwise
    pay, inside the time to the target, for loading its kernels (on CUDA also cuDNN's choice of algorithms)."""
    batch = trainer.test_loader.total_batch_size // trainer.accelerator.num_processes
    trainer.model.eval()
    with torch.no_grad():
        trainer.model(torch.zeros(batch, 1, 28, 28, device=trainer.accelerator.device))


def reached_target(config: TrainConfig, run: RunState) -> bool:
    return bool(run.evaluations) and meets_target(config, run.evaluations[-1])


def meets_target(config: TrainConfig, evaluation: dict[str, Any]) -> bool:
    return config.target_accuracy is not None and evaluation["test_accuracy"] >= config.target_accuracy


def checkpoint_due(config: TrainConfig, step: int) -> bool:
    return bool(config.checkpoint_every) and step % config.checkpoint_every == 0


def train_one_epoch(trainer: Trainer, run: RunState, profiler: Any, stop: StopRequest, until_step: int,
                    cadence: EvaluationCadence) -> None:
    """Train the rest of `run.epoch`, or up to global step `until_step`, or until the cadence calls for an
    evaluation (run.evaluation_due), or until a rank is asked to stop."""
    config, accelerator = trainer.config, trainer.accelerator
    trainer.model.train()
    steps = len(trainer.batches)
    bar = EpochReporter(
        enabled=accelerator.is_main_process, fancy=config.progress and sys.stdout.isatty(),
        epoch=run.epoch, epochs=config.epochs, steps=steps, batch_size=config.batch_size, done=run.batches_done,
    )
    epoch_loss = torch.tensor(run.loss_sum, device=accelerator.device)
    # the loss summed since the last log point, and how many images the model got right before learning them
    window = torch.zeros(2, device=accelerator.device)
    window_steps = 0
    clock = [time.perf_counter()]

    def account() -> None:
        """Add the training time since the last call to `run`, as a checkpoint must hold it."""
        now = time.perf_counter()
        run.train_seconds += now - clock[0]
        run.epoch_train_seconds += now - clock[0]
        clock[0] = now

    for images, labels in labelled(epoch_batches(trainer, run), "data_loading"):
        loss, right = trainer.step(images, labels)
        profiler.step()
        epoch_loss += loss  # no .item() per step: it would stall a GPU
        window[0] += loss
        window[1] += right
        window_steps += 1
        run.batches_done += 1
        run.global_step += 1

        due_checkpoint = checkpoint_due(config, run.global_step)
        pausing = run.batches_done == steps or run.global_step == until_step
        stopping_alone = accelerator.num_processes == 1 and stop.signal is not None  # at this very step
        if run.global_step % config.log_every == 0 or due_checkpoint or pausing or stopping_alone:
            loss_sum, right_sum = accelerator.reduce(window, reduction="sum").tolist()  # every rank's, one sync
            mean_loss = loss_sum / accelerator.num_processes / window_steps
            closing = run.global_step % config.log_every == 0
            note_recent(run, window_steps * config.batch_size, right_sum, closing)
            run.evaluation_due = cadence.due(run)
            if not math.isfinite(mean_loss):
                bar.close()
                raise UserError(
                    f"training loss became {mean_loss} by step {run.global_step} (epoch {run.epoch}); "
                    f"the last good checkpoint is kept in {trainer.output_dir / 'checkpoints'}; lower --lr"
                )
            log_training(trainer, run, mean_loss)
            bar.update(run.batches_done, mean_loss)
            window.zero_()
            window_steps = 0
            if pausing or run.evaluation_due or stopping_alone or stop.agreed(accelerator.device):
                break
        else:
            bar.update(run.batches_done)
        if due_checkpoint:  # not when pausing to evaluate: fit saves after the evaluation
            run.loss_sum = accelerator.reduce(epoch_loss, reduction="mean").item()
            account()
            save_checkpoint(trainer, trainer.output_dir, run, config.keep_checkpoints)
            clock[0] = time.perf_counter()  # saving is not training
    bar.close()
    account()
    run.loss_sum = accelerator.reduce(epoch_loss, reduction="mean").item()


def note_recent(run: RunState, images: int, right: float, closing: bool) -> None:
    """The training batches' accuracy before each step, in stretches of --log-every steps (`closing` at each
    multiple: a log point a checkpoint, a stop or an epoch's end adds in between only adds to the open one, so
    a resumed run's stretches are the uninterrupted one's), kept over just enough of them to cover
    PROGRESSIVE_IMAGES images: what EvaluationCadence.due reads."""
    run.open_stretch = [run.open_stretch[0] + images, run.open_stretch[1] + round(right)]
    if not closing:
        return
    run.recent.append(tuple(run.open_stretch))
    run.open_stretch = [0, 0]
    while len(run.recent) > 1 and sum(count for count, _ in run.recent[1:]) >= PROGRESSIVE_IMAGES:
        run.recent.pop(0)


def log_training(trainer: Trainer, run: RunState, mean_loss: float) -> None:
    """The training loss since the last log point (the mean over every process) and the schedule's learning
    rate after this step: into the run's series (metrics.json, checkpoints) and the trackers."""
    lr = float(trainer.scheduler.get_last_lr()[0])
    run.train_log.append({"step": run.global_step, "epoch": run.epoch,
                          "images": run.global_step * trainer.config.batch_size, "loss": mean_loss, "lr": lr})
    trainer.accelerator.log({"train/loss": mean_loss, "train/lr": lr}, step=run.global_step)


def epoch_batches(trainer: Trainer, run: RunState) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """This epoch's batches from where `run` stands; the order is a function of (seed, epoch) alone."""
    batches = trainer.batches
    if isinstance(batches, ShuffledBatches):
        return batches.epoch(run.epoch - 1, start=run.batches_done)
    batches.set_epoch(run.epoch - 1)
    if run.batches_done:  # resuming mid-epoch: the same order, minus the batches already trained
        batches = trainer.accelerator.skip_first_batches(batches, run.batches_done)
        batches.set_epoch(run.epoch - 1)
    return batches


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: torch.nn.Module, loader: Iterable) -> dict[str, torch.Tensor]:
    """Predictions for the whole test set, in order, on every rank.

    gather_for_metrics drops the samples DDP pads the last batch with, so each image counts once.
    """
    model.eval()
    predicted, confidence, truth = [], [], []
    for images, labels in loader:
        probabilities = model(images).float().softmax(dim=1)
        top, classes = probabilities.max(dim=1)
        classes, top, labels = accelerator.gather_for_metrics((classes, top, labels))
        predicted.append(classes)
        confidence.append(top)
        truth.append(labels)
    # one copy to the host at the end, not one per batch: each would wait for the GPU
    return {name: torch.cat(parts).cpu() for name, parts in
            (("predicted", predicted), ("confidence", confidence), ("truth", truth))}


def record_evaluation(accelerator: Accelerator, config: TrainConfig, run: RunState,
                      predictions: dict[str, torch.Tensor], epoch_ended: bool) -> None:
    """Add the evaluation (and, at an epoch's end, the epoch) to `run`; log and print it."""
    accuracy = (predictions["predicted"] == predictions["truth"]).float().mean().item()
    evaluation = {
        "step": run.global_step, "epoch": run.epoch, "images": run.global_step * config.batch_size,
        "test_accuracy": accuracy, "eval_samples": len(predictions["truth"]),
        "elapsed_seconds": run.elapsed_seconds,
    }
    run.evaluations.append(evaluation)
    accelerator.log({"test/accuracy": accuracy}, step=run.global_step)
    if not epoch_ended:
        announce(accelerator.state, f"epoch {run.epoch}/{config.epochs}  step {run.global_step}  test accuracy "
                                    f"{accuracy:.2%} ({evaluation['eval_samples']:,} images)  "
                                    f"elapsed {run.elapsed_seconds:.1f} s")
        return
    record = {
        "epoch": run.epoch,
        "train_loss": run.loss_sum / run.batches_done,
        "test_accuracy": accuracy,
        "eval_samples": evaluation["eval_samples"],
        "train_seconds": run.epoch_train_seconds,
        "train_images_per_second": run.batches_done * config.batch_size / run.epoch_train_seconds,
        "elapsed_seconds": run.elapsed_seconds,
    }
    run.epochs.append(record)
    accelerator.log({"train/images_per_second": record["train_images_per_second"]}, step=run.global_step)
    announce(accelerator.state,
             f"epoch {run.epoch}/{config.epochs}  train loss {record['train_loss']:.4f}  test accuracy {accuracy:.2%} "
             f"({record['eval_samples']:,} images)  {record['train_seconds']:.1f} s training  "
             f"{record['train_images_per_second']:,.0f} images/s")


def run_metrics(trainer: Trainer, run: RunState) -> dict[str, Any]:
    config, accelerator = trainer.config, trainer.accelerator
    reached = [e for e in run.evaluations if meets_target(config, e)]
    return {
        "config": asdict(config),
        "world_size": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "precision": precision_label(accelerator),
        "cuda_graph": isinstance(trainer.step, GraphedStep),
        "versions": versions(),
        "steps_per_epoch": len(trainer.batches),
        "epochs": run.epochs,
        "train_log": run.train_log,
        "evaluations": run.evaluations,
        "final_test_accuracy": run.evaluations[-1]["test_accuracy"],
        # the first evaluation at ≥ the target; False for a target that was missed, None without one
        "reached_target": reached[0] if reached else (False if config.target_accuracy is not None else None),
        "best_evaluation": max(run.evaluations, key=lambda e: e["test_accuracy"]),
        "train_seconds": run.train_seconds,
        "eval_seconds": run.eval_seconds,
        "compile_seconds": run.compile_seconds,
    }


def run(config: TrainConfig) -> int:
    """Train; a stop on a signal (its checkpoint saved) becomes one line and the exit status 128 + N."""
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


def main(argv: list[str] | None = None) -> None:
    with exit_on_user_error(), launch_record():
        status = run(parse_train_config(argv))
    exit_quickly(status)


if __name__ == "__main__":
    main()
