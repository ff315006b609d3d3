"""lenet-dist's own commands as real processes that skip the interpreter's start-up.

A forkserver (multiprocessing's) imports torch, accelerate and lenet-dist once per test session; each
command is then a process forked from it: its own pid, session, signals, stdout, stderr and exit status,
running the command's real entry point as `python -m lenet_dist.train` or the `lenet-dist` script would,
without paying for `import torch` (2-5 s) again. What the forked process cannot share with a fresh one (an
environment read while importing, the launchers) runs as a plain subprocess instead: `forkable` says which.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# what a run imports, including what it imports late: the figures' matplotlib, the TensorBoard tracker, and the
# other subcommands' modules
PRELOAD = ["torch", "accelerate", "lenet_dist.train", "lenet_dist.cli", "lenet_dist.figures",
           "lenet_dist.predict.classify", "lenet_dist.profiling.inspection", "lenet_dist.bench.suite",
           "torch.utils.tensorboard"]
# what a forked command may set differently from the forkserver: read at run time, never at import time
RUN_TIME_VARIABLES = {"LENET_DATA_DIR", "LENET_TEST_LAUNCH", "HF_HOME", "COLUMNS", "WANDB_MODE", "WANDB_DIR",
                      "PATH", "HOME", "PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR", "TMPDIR"}
_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(PRELOAD)
# the environment the forkserver imports PRELOAD in: the test session's as it starts, whenever the server starts
_started_with = dict(os.environ)


def _ensure_server() -> None:
    """Start the forkserver on the first fork, in the environment the session started with."""
    if multiprocessing.forkserver._forkserver._forkserver_pid is not None:
        return
    current = dict(os.environ)
    os.environ.clear()
    os.environ.update(_started_with)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(current)


def forkable(command: list[str], env: dict[str, str], script: Path) -> bool:
    """`python -m lenet_dist.train …` or `lenet-dist …` (not `lenet-dist launch`, whose launcher reads accelerate's
    config paths at import), with an environment that differs from the forkserver's only where read at run time."""
    ours = command[:3] == [sys.executable, "-m", "lenet_dist.train"] or (
        command[:1] == [str(script)] and command[1:2] != ["launch"])
    changed = {key for key in env.keys() | _started_with.keys() if env.get(key) != _started_with.get(key)}
    return ours and changed <= RUN_TIME_VARIABLES


def _run(command: list[str], env: dict[str, str], cwd: str, stdout: str, stderr: str) -> None:
    """In the forked process: become a session of its own in `cwd` with `env`, then run the command."""
    os.setsid()
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, stdout), (2, stderr)):
        file = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(file, fd)
        os.close(file)
    if command[1:3] == ["-m", "lenet_dist.train"]:  # what `python -m` runs: the module's main()
        from lenet_dist.train import main

        sys.argv = [sys.modules["lenet_dist.train"].__file__, *command[3:]]
    else:  # what the console script runs
        from lenet_dist.cli import main

        sys.argv = command
    main()


class ForkedProcess:
    """A forked command, with the part of subprocess.Popen's interface the tests use."""

    def __init__(self, command: list[str], env: dict[str, str], cwd: Path, stdout: Path | None = None) -> None:
        """`stdout`: a file (a named pipe, say) to write stdout to instead; `communicate` then returns '' for it."""
        self.args = command
        self._outputs = [tempfile.NamedTemporaryFile(prefix="forked-", delete=False) for _ in range(2)]
        for output in self._outputs:
            output.close()
        self._stdout = stdout
        _ensure_server()
        outputs = (str(stdout or self._outputs[0].name), self._outputs[1].name)
        self._process = _context.Process(target=_run, args=(command, env, str(cwd), *outputs))
        self._process.start()
        self.pid = self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the end (killing the process's session at `timeout`, as subprocess.run does), then its output."""
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self._process.join()
            raise
        finally:
            texts = [Path(output.name).read_text(errors="replace") for output in self._outputs]
            for output in self._outputs:
                Path(output.name).unlink(missing_ok=True)
        return "" if self._stdout else texts[0], texts[1]
