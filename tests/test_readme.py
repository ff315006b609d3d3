"""Every shell command README.md shows, run as written, so the README never goes stale."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run

# `make test` is this very suite; running it from inside itself would recurse.
NOT_RUN_HERE = {"make test"}


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            command = line.split(" # ")[0].strip()
            if command and not command.startswith("#") and command not in NOT_RUN_HERE:
                commands.append(command)
    return commands


def test_readme_shows_commands():
    assert len(readme_commands()) >= 8


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_runs(command, data_dir):
    made = {folder: set(os.listdir(ROOT / folder)) if (ROOT / folder).is_dir() else set()
            for folder in ("runs", "profiles")}
    try:
        env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        result = run(["bash", "-c", command], env=env, timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    finally:  # leave runs/ and profiles/ as they were
        for folder, before in made.items():
            if (ROOT / folder).is_dir():
                for name in set(os.listdir(ROOT / folder)) - before:
                    shutil.rmtree(ROOT / folder / name, ignore_errors=True)
