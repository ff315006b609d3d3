"""The one error model: a failure the user can fix is one line on stderr, a non-zero exit, no traceback.

Who raises what, and who prints it:

- `UserError` (`UsageError` for a command line that cannot work, `NothingToDo` for a job already done) is
  raised alike on every rank: it follows from the command line or from what the ranks agreed on. Rank 0
  prints it.
- A check that depends on one rank's own disk or environment (reading the data or a checkpoint, a tracker's
  package, rank 0 writing a file) runs inside `on_every_rank`: the first rank's error, by rank, is raised on
  every rank, and rank 0 prints it with the rank and node that met it.
- `RankError` is what one rank alone saw (a peer it lost). Every rank that raises it prints it.

Exit statuses: 2 for the command line (argparse's own), 1 for a run that failed on the way, 0 for
NothingToDo, 128 + N for a run stopped by signal N after saving (distributed/signals.py), 141 (SIGPIPE's) for
a command whose reader closed stdout early (`| head -1`), quietly, as a Unix tool ends.
"""

from __future__ import annotations

import copy
import os
import select
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn, TextIO, TypeVar

T = TypeVar("T")

SIGPIPE_STATUS = 128 + signal.SIGPIPE  # what a shell reports for a tool that a closed pipe stopped


class UserError(Exception):
    """A failure the user can fix; the message says how. Raised alike on every rank: rank 0 prints it."""

    exit_status = 1


class UsageError(UserError):
    """The command line asks for something that cannot work: a bad value, flags that contradict each other."""

    exit_status = 2


class NothingToDo(UserError):
    """Nothing is wrong and nothing is left to do (`--resume auto` on a finished run): one line, exit 0."""

    exit_status = 0


class RankError(UserError):
    """What this rank alone saw: it prints the line itself."""


def on_every_rank(work: Callable[[], T]) -> T:
    """Run `work` on every rank, then agree: if any rank met a UserError, every rank raises the first one's."""
    problem, result = None, None
    try:
        result = work()
    except UserError as error:
        problem = error
    agree_on_any(problem)
    return result


def agree_on_any(problem: UserError | None) -> None:
    """Raise on every rank the first problem any rank met, naming that rank and its node when it is not rank 0."""
    from accelerate.utils import gather_object

    met = [(rank, host, p) for rank, (host, p) in enumerate(gather_object([(socket.gethostname(), problem)]))
           if p is not None]
    if met:
        rank, host, first = met[0]
        if rank:
            first = copy.copy(first)
            first.args = (f"rank {rank} (node {host}): {first}",)
        raise first


def launched_as_rank_zero() -> bool:
    """Rank 0 by the launcher's environment (a single process too): who prints when there is no process group."""
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """A UserError becomes `error: <message>`, printed as the module's docstring says, and its exit status."""
    try:
        yield
    except UserError as error:
        if isinstance(error, NothingToDo):
            if launched_as_rank_zero():
                print(error, flush=True)
        elif isinstance(error, RankError) or launched_as_rank_zero():
            print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(error.exit_status) from None


def status_of(command: Callable[[], int]) -> int:
    """Run a command-line entry point in this process: its exit status, a SystemExit's included."""
    try:
        return command()
    except SystemExit as exiting:  # exit_on_user_error's, argparse's
        return exiting.code if isinstance(exiting.code, int) else int(exiting.code is not None)
    except BrokenPipeError:
        if not stdout_reader_gone():  # another pipe (a child process's): a bug, reported as one
            traceback.print_exc()
            return 1
        return quiet_after_reader_gone()
    except KeyboardInterrupt:  # before training started; in training a signal stops it at a step
        if launched_as_rank_zero():
            print("interrupted before training started; nothing was saved", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    except Exception:  # a bug: its traceback, then the same quick exit as every other way out
        traceback.print_exc()
        return 1


def exit_quickly(status: int) -> NoReturn:
    """End the process once the atexit handlers (trackers, logging) have run, skipping the interpreter's teardown:
    it costs ~0.7 s, and after a gloo process group its C++ destructors sometimes abort (SIGABRT). atexit has no
    public call that runs its handlers early; its private one has been there since Python 2."""
    import atexit

    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # what was left for a reader that had gone (`| head -1`): lost, as 141 says
        status = status or quiet_after_reader_gone()
    sys.stderr.flush()
    os._exit(status)


def stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on its write end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLERR)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no file descriptor (a test's capture): not a pipe
        return False


def quiet_after_reader_gone() -> int:
    """stdout's reader stopped early (`| head -1`): the rest of stdout goes to /dev/null (a flush at exit would
    meet the closed pipe again, with a traceback), and the status is the one a shell reports for a Unix tool that
    SIGPIPE ended, 141, so that `set -o pipefail` sees it."""
    to_devnull(sys.stdout)
    return SIGPIPE_STATUS


def to_devnull(stream: TextIO) -> None:
    """Point the stream's file descriptor at /dev/null: what is still buffered, and all that follows, goes there."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)
