"""Every shell command README.md shows, run in order as written, so the README never goes stale."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from conftest import ROOT, run

# `make test` is this very suite; running it from inside itself would recurse.
NOT_RUN_HERE = {"make test"}
SCRATCH = ("runs", "profiles")


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            command = line.split(" # ")[0].strip()
            if command and not command.startswith("#") and command not in NOT_RUN_HERE:
                commands.append(command)
    return commands


def listing(folder: str) -> set[str]:
    return set(os.listdir(ROOT / folder)) if (ROOT / folder).is_dir() else set()


def test_every_readme_command_runs(data_dir):
    commands = readme_commands()
    assert len(commands) >= 10, commands
    before = {folder: listing(folder) for folder in SCRATCH}
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    try:
        for command in commands:  # in order: later commands use what earlier ones wrote
            result = run(["bash", "-c", command], env=env, timeout=600)
            assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    finally:  # leave runs/ and profiles/ as they were
        for folder in SCRATCH:
            for name in listing(folder) - before[folder] - {"README.md"}:
                shutil.rmtree(ROOT / folder / name, ignore_errors=True)
