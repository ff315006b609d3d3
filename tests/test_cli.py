"""The command line, in-process: flags generated from the config dataclasses, one-line errors, exit statuses."""

from __future__ import annotations

import math
import sys

import pytest

import lenet_dist
from conftest import BIN, run
from lenet_dist import cli
from lenet_dist.config import TRACKERS, TrainConfig, parse_train_config
from lenet_dist.errors import UsageError, UserError, exit_on_user_error


def exit_of(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    captured = capsys.readouterr()
    return stopped.value.code, captured.out, captured.err


def test_version_is_defined_once(capsys):
    status, out, _ = exit_of(["--version"], capsys)
    assert status == 0 and out.strip() == f"lenet-dist {lenet_dist.__version__}"
    with pytest.raises(SystemExit):
        parse_train_config(["--version"])
    assert capsys.readouterr().out.strip() == f"lenet-dist {lenet_dist.__version__}"


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
    status, out, err = exit_of(["train", *flags, "--output-dir", str(output_dir)], capsys)
    assert status == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and culprit in err, err
    assert out == "" and not output_dir.exists()


def test_usage_and_runtime_failures_have_their_own_exit_status(capsys):
    def status_of(error: Exception) -> int:
        with pytest.raises(SystemExit) as stopped, exit_on_user_error():
            raise error
        return stopped.value.code

    assert status_of(UsageError("bad flag")) == 2
    assert status_of(UserError("disk full")) == 1
    assert capsys.readouterr().err == "error: bad flag\nerror: disk full\n"


def test_nan_lr_never_reaches_the_optimizer():
    with pytest.raises(UsageError, match="--lr must be a positive number, got nan"):
        TrainConfig(lr=math.nan)


def test_tracker_names_are_accelerates():
    from accelerate.utils import LoggerType

    assert set(TRACKERS) | {"all"} == {tracker.value for tracker in LoggerType}


def test_every_train_flag_comes_from_the_config(capsys):
    status, out, _ = exit_of(["train", "--help"], capsys)
    assert status == 0
    import dataclasses

    for field in dataclasses.fields(TrainConfig):
        assert "--" + field.name.replace("_", "-") in out, field.name
    assert "-j WORKERS, --workers WORKERS" in out and "(default: 2)" in out


def test_help_inspect_and_predict_start_without_torch():
    probe = (
        "import sys; from lenet_dist import cli\n"
        "for argv in (['--help'], ['predict', '--help'], ['inspect', '--help'], ['inspect', '/nonexistent']):\n"
        "    try: cli.main(argv)\n"
        "    except SystemExit: pass\n"
        "heavy = sorted(m for m in ('torch', 'accelerate', 'torchvision', 'matplotlib') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    result = run([sys.executable, "-c", probe], timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_console_script_is_installed():
    result = run([str(BIN / "lenet-dist"), "--version"], timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == f"lenet-dist {lenet_dist.__version__}"
