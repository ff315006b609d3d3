"""`make gpu-check` rehearsed on the CPU: every stage's CPU analogue passes, and the verdict machinery holds
(a stage that fails or hangs is one failed stage, the others still run, the JSON verdict is written)."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT, call

GPU_CHECK = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--rehearse"]


@pytest.mark.slow
@pytest.mark.ddp
def test_every_stage_passes_its_cpu_rehearsal(tmp_path, data_dir):
    result = call([*GPU_CHECK, "--data-dir", str(data_dir), "--out", str(tmp_path)], timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    verdict = json.loads((tmp_path / "verdict.json").read_text())
    assert verdict["passed"] and verdict["rehearsal"]
    assert [stage["status"] for stage in verdict["stages"]] == ["passed"] * 10
    assert "verdict: PASSED" in (tmp_path / "verdict.txt").read_text()
    assert not (tmp_path / "work").exists()  # only the verdict, the log (and traces on a GPU) come back


@pytest.mark.slow
def test_a_failing_and_a_hanging_stage_fail_alone_and_the_check_keeps_to_its_budget(tmp_path, data_dir):
    """A stage that fails or hangs is one failed stage (a hang killed at its limit) and the next still runs;
    a stage that finds the budget spent is reported as not run (a failure), and the check ends in time."""
    result = call([*GPU_CHECK, "--data-dir", str(data_dir), "--out", str(tmp_path), "--only",
                  "environment,recipe,graph_equals_eager,environment,throughput,deterministic", "--inject",
                  "recipe=fail", "--inject", "graph_equals_eager=hang", "--inject", "throughput=hang",
                  "--stage-limit", "6", "--budget", "16"], timeout=300)
    assert result.returncode == 1, result.stdout[-3000:]
    verdict = json.loads((tmp_path / "verdict.json").read_text())
    statuses = [(stage["stage"], stage["status"]) for stage in verdict["stages"]]
    assert statuses == [("environment", "passed"), ("recipe", "failed"), ("graph_equals_eager", "timeout"),
                        ("environment", "passed"), ("throughput", "timeout"), ("deterministic", "not run")]
    assert "injected failure" in verdict["stages"][1]["error"]
    assert 6 <= verdict["stages"][2]["seconds"] < 16  # killed at its limit, not left to hang the call
    assert verdict["stages"][-1]["error"] == "no time left in the budget"
    assert not verdict["passed"] and "verdict: FAILED" in result.stdout
