"""The output folder a run claims: chosen and checked by rank 0, locked while the run runs (one run per folder),
emptied of an old run's outputs by --overwrite, removed again when a run is refused before it starts.

    .lenet-dist.lock       held while the run runs: one run per output dir
    config.json            the resolved flags and the run id, written once the run has started (or resumed)
    checkpoints/           see checkpoint.py
    trackers/              TensorBoard, wandb, … (see trackers.py)
    model.safetensors      the trained LeNet-5, plain names, config in its metadata
    predictions.png, training_curves.png, confusion_matrix.png, confident_mistakes.png
    metrics.json           written last (outputs.py): its presence marks the run finished

Profiler traces go to a folder of the run's own under --profile-dir (profiling.run_trace_dir), named
in metrics.json.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TextIO

from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from lenet_dist.checkpoint import CHECKPOINTS_DIR, RUN_CONFIG_FILE, WEIGHTS_FILE, complete_checkpoints
from lenet_dist.errors import NothingToDo, UsageError, UserError
from lenet_dist.profiling.capture import run_trace_dir
from lenet_dist.resume import run_id_in
from lenet_dist.trackers import TRACKERS_DIR

METRICS_FILE = "metrics.json"
# Everything a run writes into its output dir: --overwrite removes these and nothing else of the folder.
RUN_OUTPUTS = (RUN_CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE, CHECKPOINTS_DIR, TRACKERS_DIR, "predictions.png",
               "training_curves.png", "confusion_matrix.png", "confident_mistakes.png")
LOCK_FILE = ".lenet-dist.lock"


@dataclass(frozen=True)
class OutputDir:
    path: Path
    created: bool  # by this run: a run refused before it started removes it again
    # rank 0's open lock file: the claim holds as long as this object lives (or the process, however it ends)
    lock: TextIO | None = field(default=None, compare=False, repr=False)


def default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def claim_output_dir(state: PartialState, requested: str | None, *, resume: str | None, overwrite: bool,
                     profile_dir: str) -> OutputDir:
    """Rank 0 picks the directory (a timestamp would differ across ranks), checks it and locks it until the process
    ends, so that of two runs started into one folder exactly one runs; then it tells the others. `resume` and
    `overwrite` are the flags' (what an existing run there may become), `profile_dir` where --overwrite finds the old
    run's traces."""
    chosen = [str(requested or default_run_dir())]
    broadcast_object_list(chosen, from_process=0)
    path = Path(chosen[0])
    outcome: list = [None]
    claimed = None
    if state.is_main_process:
        try:
            claimed = _claim(path, resume, overwrite, profile_dir)
            outcome = [replace(claimed, lock=None)]  # a file does not travel to the other ranks
        except UserError as error:
            outcome = [error]
    broadcast_object_list(outcome, from_process=0)
    if isinstance(outcome[0], UserError):
        raise outcome[0]
    return claimed or outcome[0]


def _lock(lock: TextIO, path: Path) -> None:
    """flock, else POSIX record locks (NFS and Lustre mounts without flock often have these); BlockingIOError
    when another run holds it, one line naming the file system when neither kind of lock exists there."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        raise
    except OSError as error:
        if error.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # lockf says EACCES or EAGAIN when the lock is taken
        raise BlockingIOError from None
    except OSError as error:
        lock.close()
        raise UserError(f"--output-dir {path}: its file system ({_file_system(path)}) has no file locks "
                        f"({error.strerror}), which keep two runs out of one folder; choose a folder on a local "
                        "disk, or ask for NFS or Lustre mounted with locks (-o flock)") from None


def _file_system(path: Path) -> str:
    """The type of the mount that holds `path`, from /proc/mounts ("unknown" elsewhere)."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown"
    resolved = str(path.resolve())
    held = [(len(point), kind) for _, point, kind, *_ in mounts
            if resolved == point or resolved.startswith(point.rstrip("/") + "/")]
    return max(held)[1] if held else "unknown"


def _claim(path: Path, resume: str | None, overwrite: bool, profile_dir: str) -> OutputDir:
    if _finished_run(path) and not overwrite:
        if resume == "auto":  # a requeued job that already finished: success, nothing to redo
            raise NothingToDo(f"{path} holds a finished run: nothing to resume (--resume auto)")
        weights = path if (path / WEIGHTS_FILE).is_file() else next(reversed(complete_checkpoints(path)), None)
        raise UsageError(f"--output-dir {path} already holds a finished run; pass --overwrite or another --output-dir"
                         + (f" (to train on from its weights: --init-from {weights} --output-dir NEW)" if weights
                            else ""))
    if not overwrite and (theirs := _not_ours(path)):
        raise UsageError(f"--output-dir {path} holds {', '.join(theirs)}, which no lenet-dist run wrote there (no "
                         f"run's {RUN_CONFIG_FILE} beside them) and a run would replace; move them, choose another "
                         "--output-dir, or pass --overwrite to replace them")
    if complete_checkpoints(path) and not resume and not overwrite:
        raise UsageError(f"--output-dir {path} holds the checkpoints of an unfinished run; continue it with --resume "
                         "(or --resume auto), or pass --overwrite to start again")
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output-dir {path} is a file, not a folder; choose another --output-dir")
    try:
        created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        lock = open(path / LOCK_FILE, "a+")  # held open for the process's lifetime
    except OSError as error:
        raise UserError(f"--output-dir {path} is not writable ({error.strerror}); choose another "
                        "--output-dir") from None
    try:
        _lock(lock, path)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "another process"
        lock.close()
        raise UsageError(f"--output-dir {path} is in use by another run ({owner}); wait for it or choose another "
                         "--output-dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}")
    lock.flush()
    if overwrite and not resume:  # nothing of the old run may mix with the new one
        _refuse_links_out(path)
        for name in RUN_OUTPUTS:
            target = path / name
            if target.is_symlink() and target.is_dir():  # empty (_refuse_links_out): kept, to write through
                continue
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        shutil.rmtree(run_trace_dir(profile_dir, path), ignore_errors=True)
    return OutputDir(path, created, lock)


def _finished_run(path: Path) -> bool:
    """Whether the folder's metrics.json is a finished lenet-dist run's (not any file of that name)."""
    try:
        metrics = json.loads((path / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(metrics, dict) and {"config", "final_test_accuracy", "versions"} <= metrics.keys()


def _not_ours(path: Path) -> list[str]:
    """The names a run writes that the folder holds, where no lenet-dist run has been (its config.json holds a run
    id): a user's own predictions.png, say, which a run would silently replace. Other files are left alone."""
    if not path.is_dir() or run_id_in(path / RUN_CONFIG_FILE):
        return []
    ours = {CHECKPOINTS_DIR} if complete_checkpoints(path) else set()  # a run's, from before runs had ids
    return [name for name in RUN_OUTPUTS if name not in ours and (path / name).exists()]


def _refuse_links_out(path: Path) -> None:
    """--overwrite deletes the old run's outputs, never through a link: a folder of them that links elsewhere
    (checkpoints/ on a scratch disk, say) is the user's to empty. Empty, the link stays and the new run writes
    through it."""
    for name in RUN_OUTPUTS:
        link = path / name
        if link.is_symlink() and link.is_dir() and any(link.iterdir()):
            raise UsageError(f"--overwrite: {link} is a link to {link.resolve()}, and lenet-dist deletes nothing "
                             f"through a link; empty that folder yourself (or remove the link: rm {link}), then run "
                             "again")


def abandon_output_dir(state: PartialState, output: OutputDir) -> None:
    """A run refused before training: remove the output dir again if this run made it (it holds nothing)."""
    if state.is_main_process and output.created:
        shutil.rmtree(output.path, ignore_errors=True)
