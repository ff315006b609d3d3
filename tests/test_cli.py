"""The command line, in-process: flags generated from the config dataclasses, help texts, one-line errors, exit
statuses."""

from __future__ import annotations

import sys

import pytest

import lenet_dist
from conftest import call, run_cli
from lenet_dist import cli
from lenet_dist.config import TRACKERS, TrainConfig, parse_train_config
from lenet_dist.errors import UsageError, UserError, exit_on_user_error


def test_version_is_defined_once(capsys):
    status, out, _ = run_cli(["--version"], capsys)
    assert status == 0 and out.strip() == f"lenet-dist {lenet_dist.__version__}"
    with pytest.raises(SystemExit):
        parse_train_config(["--version"])
    assert capsys.readouterr().out.strip() == f"lenet-dist {lenet_dist.__version__}"


@pytest.mark.parametrize("command", [["train"], ["bench", "compare"], ["inspect"]])
def test_a_subcommand_answers_version_too(command, capsys):
    """Not `did you mean --mixed-precision?`: the version, as `lenet-dist --version` prints it."""
    status, out, err = run_cli([*command, "--version"], capsys)
    assert (status, out.strip(), err) == (0, f"lenet-dist {lenet_dist.__version__}", "")


@pytest.mark.parametrize(
    ("flags", "culprit"),
    [
        (["--epochs", "0"], "--epochs"),
        (["--batch-size", "-4"], "--batch-size"),
        (["--lr", "0"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--lr", "-inf"], "--lr"),
        (["--workers", "-1"], "--workers"),
        (["--target-accuracy", "98"], "--target-accuracy"),
        (["--checkpoint-every", "-1"], "--checkpoint-every"),
        (["--log-with", "tensorboard,neptune"], "neptune"),
        (["--dataset", "cifar"], "--dataset"),
        (["--mixed-precision", "fp8"], "--mixed-precision"),
        (["--data-pipeline", "dali"], "--data-pipeline"),
        (["--epochs", "two"], "--epochs"),
    ],
)
def test_bad_train_flags_are_one_line_usage_errors(flags, culprit, capsys, tmp_path):
    output_dir = tmp_path / "out"
    status, out, err = run_cli(["train", *flags, "--output-dir", str(output_dir)], capsys)
    assert status == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and culprit in err, err
    assert out == "" and not output_dir.exists()


@pytest.mark.parametrize(
    ("argv", "culprit"),
    [
        (["bench", "--batch-sizes", "64,20000"], "--batch-sizes"),  # bigger than the test set: no whole batch
        (["inspect", "profiles/x", "--top", "0"], "--top"),
        (["predict", "--model", "runs/x", "a.png", "--top", "0"], "--top"),
        (["predict", "--model", "runs/x"], "image file"),
        (["predict", "a.png"], "--model"),
    ],
)
def test_bad_flags_of_the_other_commands_are_one_line_usage_errors(argv, culprit, capsys):
    status, out, err = run_cli(argv, capsys)
    assert status == 2 and err.count("\n") == 1 and culprit in err, err


def test_usage_and_runtime_failures_have_their_own_exit_status(capsys):
    def status_of(error: Exception) -> int:
        with pytest.raises(SystemExit) as stopped, exit_on_user_error():
            raise error
        return stopped.value.code

    assert status_of(UsageError("bad flag")) == 2
    assert status_of(UserError("disk full")) == 1
    assert capsys.readouterr().err == "error: bad flag\nerror: disk full\n"


def test_tracker_names_are_accelerates():
    from accelerate.utils import LoggerType

    assert set(TRACKERS) | {"all"} == {tracker.value for tracker in LoggerType}


def test_every_train_flag_comes_from_the_config(capsys):
    status, out, _ = run_cli(["train", "--help"], capsys)
    assert status == 0
    import dataclasses

    for field in dataclasses.fields(TrainConfig):
        assert "--" + field.name.replace("_", "-") in out, field.name
    assert "-j WORKERS, --workers WORKERS" in out and "(default: 2)" in out


def test_help_inspect_and_predict_start_without_torch():
    probe = (
        "import sys; from lenet_dist import cli\n"
        "for argv in (['--help'], ['predict', '--help'], ['inspect', '--help'], ['inspect', '/nonexistent']):\n"
        "    cli.command_status(argv)\n"
        "heavy = sorted(m for m in ('torch', 'accelerate', 'torchvision', 'matplotlib') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    result = call([sys.executable, "-c", probe], timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_flags_are_generated_from_a_dataclass():
    from dataclasses import dataclass

    from lenet_dist.flags import ArgumentParser, add_config_arguments, config_from_args, flag

    @dataclass
    class Example:
        name: str = flag("", "a positional", positional=True)
        files: list[str] = flag([], "one or more", metavar="FILE")
        count: int = flag(3, "a number", short="-n")
        ratio: float | None = flag(None, "may be left out")
        mode: str = flag("a", "one of two", choices=("a", "b"))
        resume: str | None = flag(None, "a value or bare", bare="latest")
        fast: bool = flag(True, "on unless --no-fast")

    parser = ArgumentParser(prog="example")
    add_config_arguments(parser, Example)

    def parse(*argv: str) -> Example:
        return config_from_args(Example, parser.parse_args(list(argv)))

    assert parse("x") == Example(name="x")
    assert parse("x", "f1", "f2", "-n", "5", "--ratio", "0.5", "--mode", "b", "--resume", "--no-fast") == Example(
        name="x", files=["f1", "f2"], count=5, ratio=0.5, mode="b", resume="latest", fast=False)
    assert parse("x", "--resume", "dir").resume == "dir"
    assert "(default: 3)" in parser.format_help() and "FILE" in parser.format_help()


@pytest.mark.parametrize(("flags", "meant"), [(["--epoch", "1"], "--epochs"),
                                              (["--target-acc", "0.9"], "--target-accuracy")])
def test_a_prefix_of_a_flag_is_an_error_that_names_the_flag(flags, meant, capsys, tmp_path):
    """A flag added later must not change what an old command line means: prefixes are not flags."""
    status, out, err = run_cli(["train", *flags, "--output-dir", str(tmp_path / "out")], capsys)
    assert status == 2 and err.count("\n") == 1, err
    assert f"did you mean {meant}?" in err and "(see lenet-dist train --help)" in err
    assert not (tmp_path / "out").exists()


def test_help_shows_each_default_once_and_the_default_of_on_off_flags(capsys):
    _, out, _ = run_cli(["train", "--help"], capsys)
    text = " ".join(out.split())
    assert "(default: None)" not in text  # --data-dir says its default in words, once
    assert "$LENET_DATA_DIR, else ./data" in text
    assert "channels-last (oneDNN's fast layout on CPU) (default: on)" in text
    assert "--compile" in text and "(inductor) (default: off)" in text
    # a recipe's part: the value it stands for, not "the --recipe's"
    assert "(default: 128, from --recipe default)" in text and "the --recipe's" not in text


@pytest.mark.launcher
def test_a_launch_config_is_found_by_its_file_name_too():
    from lenet_dist.distributed.configs import config_path

    assert config_path("cpu_ddp") == config_path("cpu-ddp") == config_path("cpu_ddp.yaml")
    assert config_path("cpu-ddp").name == "cpu_ddp.yaml"
    assert config_path("slurm-multi-node") == config_path("slurm_multi_node.sbatch")
    assert config_path("slurm-single-node").read_text().startswith("#!/bin/bash")
    with pytest.raises(UsageError, match="choose from cpu-ddp"):
        config_path("cpu")


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_a_seed_numpy_cannot_take_is_a_usage_error(seed, capsys, tmp_path):
    status, _, err = run_cli(["train", "--seed", seed, "--output-dir", str(tmp_path / "out")], capsys)
    assert status == 2 and err.count("\n") == 1 and "--seed must be in 0" in err, err


def test_launch_config_help_shows_no_empty_default(capsys):
    assert cli.command_status(["launch-config", "--help"]) == 0
    assert "(default: )" not in capsys.readouterr().out
