"""User-facing errors: one line on stderr, a non-zero exit, no traceback.

Exit statuses follow the shell's conventions: 2 for a command line that cannot work (argparse's own
status), 1 for a run that failed on the way (missing data, a full disk, a NaN loss, a corrupt
checkpoint), and 128 + N for a run stopped by signal N after saving its checkpoint (see train).
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn


class UserError(Exception):
    """A failure the user can fix: missing data, an unwritable path, a corrupt file. The message says how.

    Under DDP the ranks agree on such errors before raising them, so rank 0 alone prints them, unless
    `every_rank` is set (a rank reporting what it alone saw).
    """

    exit_status = 1
    every_rank = False


class UsageError(UserError):
    """The command line asks for something that cannot work: a bad value, flags that contradict each other."""

    exit_status = 2


class NothingToDo(UserError):
    """Nothing is wrong and nothing is left to do (`--resume auto` on a finished run): said in one line, exit 0."""

    exit_status = 0


def launched_as_rank_zero() -> bool:
    """Rank 0 by the launcher's environment (a single process too): who prints when there is no process group."""
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Turn a UserError into `error: <message>` and its exit status instead of a traceback."""
    try:
        yield
    except UserError as error:
        if isinstance(error, NothingToDo):
            if launched_as_rank_zero():
                print(error, flush=True)
        elif error.every_rank or launched_as_rank_zero():
            print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(error.exit_status) from None


def status_of(command: Callable[[], int]) -> int:
    """Run a command-line entry point in this process: its exit status, a SystemExit's included."""
    try:
        return command()
    except SystemExit as exiting:  # exit_on_user_error's, argparse's
        return exiting.code if isinstance(exiting.code, int) else int(exiting.code is not None)
    except KeyboardInterrupt:  # Ctrl-C before training started (in training it stops at a step, see train)
        if launched_as_rank_zero():
            print("interrupted before training started; nothing was saved", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    except Exception:  # a bug: its traceback, then the same quick exit as every other way out
        traceback.print_exc()
        return 1


def exit_quickly(status: int) -> NoReturn:
    """End the process with `status` once the atexit handlers (trackers, logging) have run, without the
    interpreter's teardown. That teardown spends ~0.7 s collecting the object graphs of torch and dynamo, and in
    a process that was in a gloo process group the C++ destructors it runs afterwards end now and then in
    `terminate called without an active exception` (SIGABRT, with no Python frame on the stack): 1 run in 4 of
    two processes on a small data set, after the run had finished and written everything."""
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
