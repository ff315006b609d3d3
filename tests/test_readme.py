"""README.md as a user follows it: every shell command in its `bash` blocks, run in order as written, the
output it quotes (a `text` block right after a `bash` block) checked line by line for structure and words
(numbers may differ), and the launch table's commands that can run on this machine."""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import BIN, ROOT, call, copy_checkout, launch_table

# `make test` is this very suite (running it from inside itself would recurse); `make train` is the
# default run that `python -m lenet_dist.train --output-dir runs/first` below makes too, in the venv
# this suite already runs in; tests/test_bench.py runs `lenet-dist bench --quick` (naming its outputs, a
# profile and the MNIST slice) and checks what it wrote: a second run here would cost half a minute.
NOT_RUN_HERE = {"make test", "make train", "lenet-dist bench --quick"}
BLOCK = re.compile(r"```(bash|text)\n(.*?)```(\s*)", flags=re.S)
BOX = re.compile(r"[┃│━┏┓┗┛┡┩└┘┌┐├┤┬┴┼╇╈╋─═║┳┻]")
NUMBER = re.compile(r"[+-−]?\d[\d,.]*")
SHELL_SYNTAX = re.compile(r"[|&;<>()$`*?~{}\\[\]]")
TRACE_HASH = re.compile(r"-[0-9a-f]{8}\b")  # profiles/<run>-<hash of the output dir's path>


def readme_steps() -> list[tuple[list[str], str | None]]:
    """Each bash block's commands, with the output README quotes for them: the text block right after (only
    blank lines between), else None."""
    blocks = [(match[1], match[2], match.end(), match.start()) for match in BLOCK.finditer(
        (ROOT / "README.md").read_text())]
    steps = []
    for index, (kind, body, end, _) in enumerate(blocks):
        if kind != "bash":
            continue
        following = blocks[index + 1] if index + 1 < len(blocks) else None
        quoted = following[1] if following and following[0] == "text" and following[3] == end else None
        commands = [line.split(" # ")[0].strip() for line in body.replace("\\\n", " ").splitlines()]
        steps.append(([c for c in commands if c and not c.startswith("#") and c not in NOT_RUN_HERE], quoted))
    return steps


def shape(line: str) -> str:
    """A line's words and structure: numbers become #, table rules and padding go."""
    return " ".join(NUMBER.sub("#", TRACE_HASH.sub("-#", BOX.sub(" ", line))).split())


OPERATOR_ROWS = ("│ optimizer_step", "│ Optimizer.", "│ data_loading", "│ conv1 ", "│ conv2 ", "│ classifier ")
# inspect A B's verdict on the step times: whether the two runs' ranges overlap is the measurement's own
NOISE_VERDICT = re.compile(r"\b(overlap|apart)\b")


def assert_quoted(quoted: str, printed: str, command: str) -> None:
    """Every line README quotes appears, numbers aside, among the lines the command printed. Rows of the
    profiler's operator tables are the machine's own (which operators lead differs between CPUs): those need
    only exist; so does the A/B verdict on noise, whose words depend on what was measured."""
    printed_shapes = {NOISE_VERDICT.sub("#", shape(line)) for line in printed.splitlines()}
    for line in quoted.splitlines():
        wanted = NOISE_VERDICT.sub("#", shape(line))
        if not wanted or not re.search(r"[A-Za-z]", wanted):
            continue
        if "::" in line or line.strip().startswith(OPERATOR_ROWS):
            assert any("::" in s for s in printed_shapes), f"{command}: no operator rows printed"
            continue
        if line.startswith("step time: "):
            assert any(s.startswith("step time: ") for s in printed_shapes), f"{command}: no step-time verdict"
            continue
        assert wanted in printed_shapes, f"{command}: README quotes\n  {line}\nbut it printed\n{printed[-3000:]}"


@pytest.mark.slow
def test_every_readme_command_runs_and_prints_what_readme_quotes(data_dir, mnist_sliver, tmp_path):
    steps = readme_steps()
    assert sum(len(commands) for commands, _ in steps) >= 10 and sum(q is not None for _, q in steps) >= 4
    # In a copy of the checkout: a user's own runs/first (from following the README) must neither make
    # the commands fail nor be touched. The copy shares the installed .venv; copying keeps file times,
    # so `make` sees the install as current and does not re-point it at the copy.
    checkout = copy_checkout(tmp_path / "checkout")
    if (ROOT / ".venv").is_dir():
        (checkout / ".venv").symlink_to(ROOT / ".venv")
    path = f"{BIN}{os.pathsep}{os.environ['PATH']}"
    for commands, quoted in steps:  # in order: later commands use what earlier ones wrote
        # on 4,096 MNIST images, which print the same lines with other numbers; a quoted target reached needs MNIST
        data = data_dir if quoted and "reached " in quoted else mnist_sliver
        for command in commands:
            result = call(as_run(command, path), env={"PATH": path, "LENET_DATA_DIR": str(data)}, timeout=600,
                          cwd=checkout)
            assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        if quoted:
            assert_quoted(quoted, result.stdout, command)


def as_run(command: str, path: str) -> list[str]:
    """The command as bash would run it: a plain one (no shell syntax) as its words, the program found on `path`
    as bash finds it, so that `call` can fork lenet-dist's own commands; anything else through bash itself."""
    words = shlex.split(command)
    program = shutil.which(words[0], path=path) if words and not SHELL_SYNTAX.search(command) else None
    if program is None:
        return ["bash", "-c", command]
    return [sys.executable if Path(program) == BIN / "python" else program, *words[1:]]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["1 CPU process"])  # gloo: tests/test_ddp.py; torchrun: tests/test_install.py
def test_the_launch_tables_cpu_rows_run_as_written(where, mnist_slice, tmp_path):
    """With a short run's flags appended (the launchers are what is tested)."""
    command = launch_table()[where]
    flags = "--epochs 1 --batch-size 256 --no-progress --output-dir run"
    path = f"{BIN}{os.pathsep}{os.environ['PATH']}"
    result = call(as_run(f"{command} {flags}", path), cwd=tmp_path, timeout=600,
                  env={"PATH": path, "LENET_DATA_DIR": str(mnist_slice), "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    assert result.stdout.count("epoch 1/1  train loss") == 1 and (tmp_path / "run" / "metrics.json").is_file()


def test_the_launch_table_names_every_way_to_run():
    table = launch_table()
    assert {"1 CPU process", "2 CPU processes (gloo)", "1 GPU", "N GPUs (NCCL)", "torchrun", "several nodes"} <= \
        set(table)
    if not torch.cuda.is_available():  # the GPU rows run in `make gpu-check`; several nodes in tests/test_cluster.py
        assert all("launch-config" in table[row] for row in ("1 GPU", "N GPUs (NCCL)", "several nodes"))


def test_the_package_map_in_readme_is_the_tree():
    """README's map of lenet_dist/ names every module and folder of the package, each once, and nothing else."""
    section = (ROOT / "README.md").read_text().partition("## The code")[2]
    block = section.split("```")[1]
    mapped, folders = set(), []
    for line in block.strip().splitlines():
        depth = (len(line) - len(line.lstrip())) // 2
        name = line.split()[0]
        folders[depth:] = [name.rstrip("/")]
        mapped.add("/".join(folders))
    package = ROOT / "lenet_dist"
    tree = {"lenet_dist"} | {
        str(path.relative_to(ROOT)) for path in package.rglob("*")
        if path.suffix == ".py" and path.name not in ("__init__.py", "__main__.py") or (
            path.is_dir() and path.name != "__pycache__")
    } | {str(path.relative_to(ROOT)) for path in package.glob("*/__init__.py")  # one that holds more than its
         if len(ast.parse(path.read_text()).body) > 1}                          # docstring is a module too
    assert mapped == tree
