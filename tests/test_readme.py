"""Every shell command README.md shows, run in order as written, so the README never goes stale."""

from __future__ import annotations

import os
import re

import pytest

from conftest import BIN, ROOT, copy_checkout, run

# `make test` is this very suite (running it from inside itself would recurse); `make train` is the
# default run that `python -m lenet_dist.train --output-dir runs/first` below makes too, in the venv
# this suite already runs in.
NOT_RUN_HERE = {"make test", "make train"}


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            command = line.split(" # ")[0].strip()
            if command and not command.startswith("#") and command not in NOT_RUN_HERE:
                commands.append(command)
    return commands


@pytest.mark.slow
def test_every_readme_command_runs(data_dir, tmp_path):
    commands = readme_commands()
    assert len(commands) >= 10, commands
    # In a copy of the checkout: a user's own runs/first (from following the README) must neither make
    # the commands fail nor be touched. The copy shares the installed .venv; copying keeps file times,
    # so `make` sees the install as current and does not re-point it at the copy.
    checkout = copy_checkout(tmp_path / "checkout")
    if (ROOT / ".venv").is_dir():
        (checkout / ".venv").symlink_to(ROOT / ".venv")
    env = {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "LENET_DATA_DIR": str(data_dir)}
    for command in commands:  # in order: later commands use what earlier ones wrote
        result = run(["bash", "-c", command], env=env, timeout=600, cwd=checkout)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
