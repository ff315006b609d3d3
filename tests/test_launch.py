"""`lenet-dist launch` and `lenet-dist launch-config`: a mistyped or missing accelerate config, a batch script passed
as one, and the editable copy of a packaged file, each one line; the flags its help lists; the same on the oldest
accelerate (`make test-oldest`)."""

from __future__ import annotations

import pytest

from conftest import run_cli
from lenet_dist import cli
from lenet_dist.distributed.configs import config_path

pytestmark = pytest.mark.launcher
CPU_DDP = config_path("cpu-ddp").read_text()


@pytest.mark.parametrize(("text", "culprit"), [
    (CPU_DDP.replace("MULTI_GPU", "MULTI_GPUU"), "distributed_type 'MULTI_GPUU' is not one of accelerate's; did you "
                                                 "mean MULTI_GPU?"),
    (CPU_DDP.replace("num_processes: 2", "num_proceses: 2"), "unknown key 'num_proceses'; did you mean "
                                                             "'num_processes'?"),
    (CPU_DDP.replace("num_processes: 2", "num_processes: two"), "num_processes must be a whole number, got 'two'"),
    ("a: [1,\nb: }\n", "not valid YAML at line 2, column 4"),
    ("- just\n- a list\n", "not an accelerate config"),
    (config_path("slurm-multi-node").read_text(), "a script, not an accelerate config (a SLURM batch script goes to "
                                                  "sbatch"),
], ids=["type", "key", "number", "yaml", "list", "sbatch"])
def test_a_mistyped_launch_config_is_one_line_naming_it(text, culprit, tmp_path, capsys):
    config = tmp_path / "mine.yaml"
    config.write_text(text)
    status, _, err = run_cli(["launch", "--config_file", str(config), "-m", "lenet_dist.train"], capsys)
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: --config_file {config}: {culprit}"), err


def test_the_packaged_configs_pass_the_check(capsys):
    from lenet_dist.distributed.configs import check_config_file

    for name in ("cpu-ddp", "single-gpu", "multi-gpu", "multi-node"):
        check_config_file(str(config_path(name)))


def test_a_copy_of_a_batch_script_is_written_once_and_never_over_an_edited_one(tmp_path, capsys):
    assert cli.command_status(["launch-config", "slurm-single-node", "--copy", str(tmp_path)]) == 0
    copy = tmp_path / "slurm_single_node.sbatch"
    assert capsys.readouterr().out.strip() == str(copy)
    assert copy.read_text() == config_path("slurm-single-node").read_text()
    copy.write_text("#!/bin/bash\n# edited\n")
    assert cli.command_status(["launch-config", "slurm-single-node", "--copy", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{copy} is already there" in err and copy.read_text().endswith("# edited\n")
    assert cli.command_status(["launch-config", "slurm-single-node", "--copy", str(tmp_path / "no")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_a_launch_config_that_is_not_there_is_one_line_naming_the_packaged_one(capsys):
    status, _, err = run_cli(["launch", "--config_file", "launch/cpu-ddp.yaml", "-m", "lenet_dist.train"], capsys)
    assert status == 2 and err.count("\n") == 1, err
    assert "--config_file launch/cpu-ddp.yaml: no such file" in err and "cpu_ddp.yaml" in err


def test_launch_help_lists_the_flags_readme_uses(capsys):
    from lenet_dist.distributed.launcher import main

    with pytest.raises(SystemExit) as exiting:
        main(["--help"])
    assert exiting.value.code == 0
    shown = capsys.readouterr().out
    assert shown.startswith("usage: lenet-dist launch")
    for flag in ("--config_file", "--num_processes", "--max_restarts", "--machine_rank", "--main_process_ip",
                 "--main_process_port", "--num_machines"):
        assert f"  {flag}" in shown, flag
