"""Launching: the packaged accelerate configs, and `lenet-dist launch`, accelerate's launcher with an exit
status a requeue script can trust.

    accelerate launch --config_file "$(lenet-dist launch-config cpu-ddp)" -m lenet_dist.train
    lenet-dist launch --config_file "$(lenet-dist launch-config cpu-ddp)" -m lenet_dist.train

`accelerate launch` forwards SIGTERM to the ranks, which save, but then ends with a traceback and exit 1, as
for a crash. `lenet-dist launch` runs accelerate's launcher in-process with the same flags, also forwards
SIGUSR1 (torchrun does not by default), and ends in one line: 128 + N when every rank on this node stopped on
signal N after saving, 1 when the job failed, 0 when it finished.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lenet_dist.distributed.configs import check_config_file
from lenet_dist.distributed.launch_records import LAUNCH_RECORDS_ENV

# signals.py's, spelled here: it imports torch
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
# torchrun's agent forwards to the ranks only the signals it handles; its default list lacks SIGUSR1
FORWARDED = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
GRACE_SECONDS = 30  # how long the ranks may take to save after a signal, as under torchrun


def main(argv: list[str]) -> int:
    """`lenet-dist launch [accelerate launch's flags] -m lenet_dist.train [train's flags]`."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    parser = launch_command_parser()
    parser.prog = "lenet-dist launch"
    parser.description = ("accelerate launch, ending in one line that says how the ranks ended (128 + N when every "
                          "rank stopped on signal N after saving). All of accelerate launch's flags work.")
    with accelerate_help_in_full(argv):
        args = parser.parse_args(argv)
    if args.config_file:
        check_config_file(args.config_file)
    os.environ.setdefault("PET_SIGNALS_TO_HANDLE", FORWARDED)  # torchrun's own setting, read from PET_*
    quiet_torchrun_logs()
    records = Path(tempfile.mkdtemp(prefix="lenet-dist-launch-"))
    os.environ[LAUNCH_RECORDS_ENV] = str(records)
    try:
        with forwarding_for_one_process():
            launch_command(args)
        return 0
    except SignalException as error:  # the agent was signalled and passed it on; the records say how ranks ended
        return _verdict(records, int(error.sigval))
    except ChildFailedError as error:  # ranks ended non-zero without the launcher being signalled
        return _verdict(records, None, ", ".join(f"rank {rank} {_ended(failure.exitcode)}"
                                                 for rank, failure in sorted(error.failures.items())))
    except SystemExit as exiting:  # accelerate >= 1.16 exits 128 + N itself on the agent's signal N
        code = exiting.code if isinstance(exiting.code, int) else 1  # 1.15's --quiet one-process launcher exits 1
        if code > 128:
            return _verdict(records, code - 128)
        return _verdict(records, None, f"the training process exited {code}") if code else 0
    except subprocess.CalledProcessError as error:  # the one-process launcher
        return _verdict(records, None, f"the training process exited {error.returncode}")
    except KeyboardInterrupt:  # Ctrl-C before the ranks started: nothing to save
        print("lenet-dist launch: interrupted before training started", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        for record in records.iterdir():
            record.unlink()
        records.rmdir()


@contextmanager
def accelerate_help_in_full(argv: list[str]) -> Iterator[None]:
    """Make --help list all of accelerate's flag groups: its formatter does so only when sys.argv reads
    `accelerate launch …`."""
    ours = sys.argv
    sys.argv = ["accelerate", "launch", *argv]
    try:
        yield
    finally:
        sys.argv = ours


def quiet_torchrun_logs() -> None:
    """Silence torchrun's agent loggers (one per module): the ranks say what went wrong, and this launcher
    how the job ended, in one line each."""
    import torch.distributed.run  # noqa: F401  (creates the agent's loggers)

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


@contextmanager
def forwarding_for_one_process() -> Iterator[None]:
    """Forward the stop signals to the single process accelerate starts with Popen, which passes none on.

    The handler goes in just before that process starts: installed earlier, it would not run until the
    multi-process rendezvous (blocking in C++) ended, leaving the launcher deaf.
    """
    import accelerate.commands.launch as accelerate_launch

    original = accelerate_launch.simple_launcher

    def forward(number: int, _frame) -> None:
        import psutil

        for child in psutil.Process().children():
            child.send_signal(number)

    def simple_launcher(args) -> None:
        for number in STOP_SIGNALS:
            signal.signal(number, forward)
        original(args)

    accelerate_launch.simple_launcher = simple_launcher
    try:
        yield
    finally:
        accelerate_launch.simple_launcher = original


def _verdict(records: Path, launcher_signal: int | None, failure: str = "") -> int:
    """128 + N when every rank of this node recorded a stop on signal N, else 1; one line either way."""
    for number in STOP_SIGNALS:  # repeated Ctrl-C while the ranks save changes nothing now
        signal.signal(number, signal.SIG_IGN)
    ranks = _wait_for_ranks(records)
    stops = {record.get("signal") for record in ranks.values()}
    if ranks and all(record["outcome"] == "stopped" for record in ranks.values()) and len(stops) == 1:
        (number,) = stops
        newest = max(ranks.values(), key=lambda record: record["step"])
        print(f"lenet-dist launch: {signal.Signals(number).name}: every rank on this node ({len(ranks)}) stopped "
              f"after saving {newest['checkpoint']}; exit {128 + number}", file=sys.stderr, flush=True)
        return 128 + number
    explained = [record["status"] for record in ranks.values() if record["outcome"] == "explained"]
    if explained and launcher_signal is None:  # a rank said why, in its one line; the others were stopped for it
        return max(explained)
    running = sorted(name for name, record in ranks.items() if record["outcome"] != "stopped")
    reason = failure or (f"{signal.Signals(launcher_signal).name}, but {', '.join(running) or 'no rank'} did not "
                         "stop cleanly" if launcher_signal else "the job failed")
    print(f"lenet-dist launch: {reason}; exit 1", file=sys.stderr, flush=True)
    return 1


def _ended(exit_code: int) -> str:
    """`exited 2`, or `was killed by SIGTERM` for torchrun's negative exit codes."""
    return f"was killed by {signal.Signals(-exit_code).name}" if exit_code < 0 else f"exited {exit_code}"


def _wait_for_ranks(records: Path) -> dict[str, dict]:
    """Each rank's record, once no rank of this node runs: ranks still saving get GRACE_SECONDS, then are
    killed."""
    import psutil

    _, alive = psutil.wait_procs(psutil.Process().children(recursive=True), timeout=GRACE_SECONDS)
    for process in alive:
        process.kill()
    return {path.stem: json.loads(path.read_text()) for path in sorted(records.glob("rank*.json"))}
