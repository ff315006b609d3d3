"""What goes wrong, said in one line: a refused run (a batch larger than the data, an output dir that is a file),
bad data, a NaN loss, bad checkpoints, a full disk, Ctrl-C during start-up, a rank that dies or is lost.

Usage errors exit 2, failures on the way exit 1 (an unexpected exception with its traceback); nothing half-written is
left behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (
    ROOT,
    RUN_FILES,
    SHORT,
    TRAIN,
    call,
    kill_all,
    launch_ddp,
    one_line_error,
    rank_pids,
    read_metrics,
    start,
    wait_for,
)
from lenet_dist.errors import status_of


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
    # Adam moves every weight by ~lr on its first step: at 1e36 the next forward overflows float32
    result = call([*TRAIN, "--lr", "1e36", "--schedule", "constant", "--checkpoint-every", "1", "--log-every", "1",
                  "--output-dir", str(tmp_path)], timeout=120)
    one_line_error(result, 1, "by step 2", str(tmp_path / "checkpoints"))
    checkpoints = sorted((tmp_path / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-00000001"]
    assert json.loads((checkpoints[0] / "progress.json").read_text())["global_step"] == 1
    assert not (tmp_path / "metrics.json").exists()


def test_finished_run_is_not_overwritten(short_run, sliced):
    before = (short_run / "metrics.json").read_bytes()
    result = call([*TRAIN, "--epochs", "1", "--output-dir", str(short_run)], timeout=120, env=sliced)
    one_line_error(result, 2, str(short_run), "--overwrite")
    assert (short_run / "metrics.json").read_bytes() == before


def test_overwrite_deletes_nothing_through_a_link_out_of_the_run(short_run, tmp_path, mnist_sliver):
    """checkpoints/ linked to a scratch disk: refused in one line while the linked folder holds anything, nothing of
    the old run deleted; emptied by the user, the link stays and the new run writes through it."""
    run, scratch = tmp_path / "run", tmp_path / "scratch"
    shutil.copytree(short_run, run)
    (run / "checkpoints").rename(scratch)
    (run / "checkpoints").symlink_to(scratch)
    before = sorted(path.name for path in scratch.iterdir())
    command = [*TRAIN, *SHORT, "--overwrite", "--output-dir", str(run)]
    result = call(command, timeout=120, env={"LENET_DATA_DIR": str(mnist_sliver)})
    one_line_error(result, 2, f"{run / 'checkpoints'} is a link to {scratch}", f"rm {run / 'checkpoints'}")
    assert sorted(path.name for path in scratch.iterdir()) == before and (run / "metrics.json").is_file()

    shutil.rmtree(scratch)
    scratch.mkdir()
    result = call(command, timeout=120, env={"LENET_DATA_DIR": str(mnist_sliver)})
    assert result.returncode == 0, result.stderr
    assert (run / "checkpoints").is_symlink() and [path.name for path in scratch.iterdir()] == ["step-00000016"]


@pytest.mark.parametrize("theirs", [["predictions.png"], ["metrics.json", "config.json"]], ids=["figure", "json"])
def test_a_users_own_files_are_never_replaced_unasked(theirs, tmp_path, mnist_sliver):
    """Files with a run's names in a folder no run wrote: named, kept, and replaced only with --overwrite; a
    metrics.json of the user's is not "a finished run" (whose --init-from hint would then fail)."""
    for name in [*theirs, "notes.txt"]:
        (tmp_path / name).write_text("{}" if name.endswith(".json") else "mine")
    command = [*TRAIN, *SHORT, "--output-dir", str(tmp_path)]
    result = call(command, timeout=120, env={"LENET_DATA_DIR": str(mnist_sliver)})
    line = one_line_error(result, 2, f"--output-dir {tmp_path} holds {', '.join(sorted(theirs, key=RUN_FILES.index))}",
                          "which no lenet-dist run wrote there", "--overwrite")
    assert "finished run" not in line
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([*theirs, "notes.txt"])
    assert all((tmp_path / name).read_text() in ("{}", "mine") for name in theirs)

    result = call([*command, "--overwrite"], timeout=120, env={"LENET_DATA_DIR": str(mnist_sliver)})
    assert result.returncode == 0, result.stderr
    assert read_metrics(tmp_path)["epochs"] and (tmp_path / "notes.txt").read_text() == "mine"


def test_a_finished_runs_init_from_hint_works(short_run, tmp_path, sliced):
    """Its weights gone, the hint names its newest checkpoint instead, and that command trains."""
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    (run / "model.safetensors").unlink()
    result = call([*TRAIN, *SHORT, "--output-dir", str(run)], timeout=120, env=sliced)
    line = one_line_error(result, 2, "already holds a finished run")
    source = re.search(r"--init-from (\S+) --output-dir NEW", line)[1]
    assert source == str(run / "checkpoints" / "step-00000064")
    result = call([*TRAIN, *SHORT, "--init-from", source, "--output-dir", str(tmp_path / "new")], timeout=120,
                  env=sliced)
    assert result.returncode == 0, result.stderr


def test_unwritable_output_dir_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = call([*TRAIN, "--output-dir", str(blocker / "run")], timeout=120)
    one_line_error(result, 1, str(blocker / "run"), "not writable")


@pytest.mark.slow
@pytest.mark.parametrize(("user", "function", "calls_before", "culprit", "kept"), [
    ("train", "save_checkpoint", 1, "checkpoints/step-00000040", "step-00000020"),
    ("outputs", "export_weights", 0, "model.safetensors", "step-00000064"),
], ids=["checkpoint", "weights"])
def test_a_write_that_fails_is_one_line_and_keeps_the_last_checkpoint(user, function, calls_before, culprit, kept,
                                                                      tmp_path, sliced):
    """Files limited to 100 kB, as on a disk that fills up: writes fail with EFBIG (Python ignores SIGXFSZ).

    The limit is set from inside the run just before the write under test (a checkpoint is ~0.75 MB: the
    weights and Adam's two moments), after `calls_before` of them went through, so an earlier complete
    checkpoint exists to be kept.
    """
    script = (
        f"import resource, sys; from lenet_dist import {user} as user, train\n"
        f"original, calls = user.{function}, []\n"
        "def limited(*args, **kwargs):\n"
        f"    if len(calls) == {calls_before}:\n"
        "        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))\n"
        "    calls.append(1)\n"
        "    return original(*args, **kwargs)\n"
        f"user.{function} = limited\n"
        "train.main(sys.argv[1:])\n"
    )
    result = call([sys.executable, "-c", script, *SHORT, "--checkpoint-every", "20", "--keep-checkpoints", "1",
                  "--output-dir", str(tmp_path)], timeout=300, env=sliced)
    line = one_line_error(result, 1, "could not write", "File too large")
    assert culprit in line, line
    (checkpoint,) = (tmp_path / "checkpoints").glob("step-*")
    assert checkpoint.name == kept and (checkpoint / "progress.json").is_file()
    assert not list(tmp_path.rglob("*.partial"))
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.launcher
def test_a_dying_rank_is_named_and_ends_the_whole_job_quickly(tmp_path, data_dir):
    marker = f"dying-{os.getpid()}"
    process = start(launch_ddp("--epochs", "5", "--output-dir", str(tmp_path)), env={"LENET_TEST_LAUNCH": marker})
    try:
        wait_for(lambda: (tmp_path / "config.json").exists(), 120, process)
        wait_for(lambda: len(rank_pids(marker)) == 2, 30, process)
        time.sleep(2)  # inside the training loop, rank 0 waiting on rank 1 in every all-reduce
        ranks = rank_pids(marker)
        cores = [os.sched_getaffinity(ranks[rank]) for rank in (0, 1)]
        assert cores[0] and cores[1] and not cores[0] & cores[1]  # --pin-cores: a slice of cores each
        os.kill(ranks[1], signal.SIGKILL)
        killed_at = time.monotonic()
        output, errors = process.communicate(timeout=60)
        assert time.monotonic() - killed_at < 60
    finally:
        kill_all(process, marker)
    assert process.returncode != 0
    assert re.search(rf"error: rank 1 \(pid {ranks[1]}\) died \(killed or crashed\); rank 0 stops too", errors), \
        errors[-3000:]
    assert not (tmp_path / "metrics.json").exists()


def test_a_run_that_fails_leaves_the_process_group(tmp_path):
    """The error path destroys the process group too (NCCL otherwise prints a warning after our one line)."""
    script = (
        "import sys, torch.distributed as dist\n"
        "from lenet_dist import train\n"
        "from lenet_dist.config import TrainConfig\n"
        "from lenet_dist.errors import UsageError\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path}/store', rank=0, world_size=1)\n"
        f"try:\n    train.train_command(TrainConfig(resume='latest', output_dir='{tmp_path}/run'))\n"
        "except UsageError as error:\n    print('refused:', error)\n"
        "print('still in a process group:', dist.is_initialized())\n"
    )
    result = call([sys.executable, "-c", script], timeout=120)
    assert result.returncode == 0, result.stderr
    assert "refused: --resume: no checkpoint" in result.stdout
    assert "still in a process group: False" in result.stdout


def test_only_failures_to_write_count_as_write_failures():
    """A full disk gets "free space" advice; an error that is not about writing (out of memory, a bug) must not."""
    from lenet_dist.files import is_write_failure

    assert is_write_failure(OSError(28, "No space left on device"))
    assert is_write_failure(RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598"))
    assert is_write_failure(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"))
    assert not is_write_failure(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_write_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (64x400 and 256x120)"))


def test_two_runs_started_together_into_one_output_dir_run_once(tmp_path, mnist_slice):
    """The output dir is claimed atomically (an exclusive lock): one run trains, the other refuses in one line."""
    command = [*TRAIN, "--epochs", "1", "--batch-size", "256", "--no-progress", "--output-dir", str(tmp_path / "run")]
    env = {"LENET_DATA_DIR": str(mnist_slice)}
    both = [start(command, env=env), start(command, env=env)]
    results = [(process.returncode, *outputs) for process, outputs in
               ((process, process.communicate(timeout=300)) for process in both)]
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [0, 2], [(status, err[-1500:]) for status, _, err in results]
    (_, _, refusal), = [result for result in results if result[0] == 2]
    (line,) = refusal.strip().splitlines()
    assert line.startswith(f"error: --output-dir {tmp_path / 'run'} ") and (
        "is in use by another run (" in line or "already holds a finished run" in line), line
    assert read_metrics(tmp_path / "run")["epochs"][0]["epoch"] == 1


def test_an_output_dir_in_use_names_the_run_that_holds_it(tmp_path):
    """Whoever holds the lock has written who it is (the race above may see the lock before that line)."""
    import fcntl

    from lenet_dist.errors import UsageError
    from lenet_dist.output_dir import LOCK_FILE, _claim

    (tmp_path / LOCK_FILE).write_text("pid 4242 on nodea")
    with open(tmp_path / LOCK_FILE) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UsageError, match=r"is in use by another run \(pid 4242 on nodea\)"):
            _claim(tmp_path, None, False, "profiles")
    assert (tmp_path / LOCK_FILE).read_text() == "pid 4242 on nodea"


@pytest.mark.parametrize("posix_locks", [True, False], ids=["record-locks", "no-locks"])
def test_a_file_system_without_flock_falls_back_to_record_locks_or_is_named(tmp_path, monkeypatch, posix_locks):
    """Some NFS and Lustre mounts refuse flock (ENOLCK): the run takes a POSIX record lock there instead, and
    where there is none either, rank 0's one line names the folder and its file system (the ranks agree on it)."""
    import errno
    import fcntl

    from lenet_dist.errors import UserError
    from lenet_dist.output_dir import _claim

    def no_locks(*_):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    if not posix_locks:
        monkeypatch.setattr(fcntl, "lockf", no_locks)
        with pytest.raises(UserError, match=rf"--output-dir {tmp_path}: its file system \(\w+\) has no file locks "
                                            r"\(No locks available\), which keep two runs out of one folder"):
            _claim(tmp_path, None, False, "profiles")
        return
    claimed = _claim(tmp_path, None, False, "profiles")
    try:
        probe = subprocess.run([sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a+'); "
                                "fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)", str(tmp_path / ".lenet-dist.lock")],
                               capture_output=True, text=True)
        assert probe.returncode != 0 and "Resource temporarily unavailable" in probe.stderr  # held by this run
    finally:
        claimed.lock.close()


def test_a_refused_run_creates_nothing(tmp_path):
    output = tmp_path / "new"
    result = call([*TRAIN, "--resume", "--output-dir", str(output)], timeout=120)
    one_line_error(result, 2, "--resume: no checkpoint in")
    assert not output.exists()


@pytest.mark.slow
def test_overwrite_leaves_no_trace_of_the_old_run(tmp_path, mnist_slice):
    """Neither its TensorBoard events (TensorBoard would mix the two runs) nor its profiler traces."""
    output, profiles = tmp_path / "run", tmp_path / "profiles"
    short = [*TRAIN, "--epochs", "1", "--batch-size", "512", "--no-progress", "--output-dir", str(output),
             "--profile-dir", str(profiles)]
    env = {"LENET_DATA_DIR": str(mnist_slice)}
    first = call([*short, "--log-with", "tensorboard", "--profile", "--profile-wait", "1"], env=env)
    assert first.returncode == 0, first.stderr
    old_traces = Path(read_metrics(output)["profile_dir"])
    assert (output / "trackers").is_dir() and list(old_traces.glob("rank0.*.pt.trace.json"))
    second = call([*short, "--overwrite", "--seed", "1"], env=env)
    assert second.returncode == 0, second.stderr
    assert not (output / "trackers").exists() and not old_traces.exists()
    assert read_metrics(output)["config"]["seed"] == 1 and read_metrics(output)["profile_dir"] is None


def test_wandb_without_a_login_is_refused_before_the_run_starts(tmp_path):
    """Not a 30-line traceback and a half-written config.json: one line naming the way out, and nothing made."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("WANDB_", "NETRC"))}
    result = subprocess.run([*TRAIN, "--log-with", "wandb", "--output-dir", str(tmp_path / "run")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, env={**env, "HOME": str(tmp_path)})
    one_line_error(result, 1, "--log-with wandb: not logged in", "wandb login", "WANDB_MODE=offline")
    assert not (tmp_path / "run").exists()


def test_a_batch_larger_than_the_training_set_is_refused_and_leaves_nothing(mnist_sliver, tmp_path):
    result = call([*TRAIN, "--batch-size", "70000", "--output-dir", str(tmp_path / "out")],
                  env={"LENET_DATA_DIR": str(mnist_sliver)}, timeout=60)
    one_line_error(result, 2, "--batch-size 70000", "4,096 training images")
    assert not (tmp_path / "out").exists()


def test_an_output_dir_that_is_a_file_is_named_as_such(tmp_path, mnist_sliver):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = call([*TRAIN, "--output-dir", str(blocker)], env={"LENET_DATA_DIR": str(mnist_sliver)}, timeout=60)
    one_line_error(result, 2, f"--output-dir {blocker} is a file, not a folder")
    assert blocker.read_text() == "not a folder"


INTERRUPTED_IN_START_UP = """
import sys
from lenet_dist import train
from lenet_dist.recipe import build as recipe
def interrupted(*args, **kwargs):
    raise KeyboardInterrupt
recipe.build_optimizer = interrupted
train.main(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.launcher
def test_ctrl_c_during_start_up_is_one_line_exit_130_and_leaves_no_output_dir(mnist_sliver, tmp_path):
    result = call([sys.executable, "-c", INTERRUPTED_IN_START_UP, "--output-dir", str(tmp_path / "out")],
                  env={"LENET_DATA_DIR": str(mnist_sliver)}, timeout=60)
    one_line_error(result, 130, "interrupted before training started")
    assert not (tmp_path / "out").exists()


def test_a_lost_rank_is_named_only_when_a_rank_is_missing(monkeypatch):
    from lenet_dist.distributed.lost_ranks import Ranks

    ranks = Ranks.__new__(Ranks)
    ranks.rank, ranks.members = 0, [(0, "here", 1), (1, "here", 1)]  # pid 1 is alive: nobody died here
    monkeypatch.setattr(Ranks, "_unanswered", lambda self: [])
    assert ranks.lost(RuntimeError("gloo: Timed out waiting"), "checkpoints: none") is None
    monkeypatch.setattr(Ranks, "_unanswered", lambda self: [1])
    lost = ranks.lost(RuntimeError("gloo: Timed out waiting"), "checkpoints: none")
    assert lost is not None and "lost contact with rank 1 (node here)" in str(lost)


def test_an_unexpected_exception_gets_its_traceback_and_a_status(capsys):
    def broken() -> int:
        raise RuntimeError("a bug")

    assert status_of(broken) == 1 and "RuntimeError: a bug" in capsys.readouterr().err
