"""Mixed precision, torch.compile and the benchmark: short real runs on CPU."""

from __future__ import annotations

import json
import statistics
import sys

import pytest
import torch

from conftest import BIN, assert_png, read_metrics, run
from lenet_dist.checkpoint import load_model
from lenet_dist.model import LeNet5

ROW_FIELDS = {
    "device", "pipeline", "precision", "compile", "batch_size", "train_images_per_second",
    "inference_images_per_second", "train_flops_per_image", "roofline_percent", "time_to_98", "speedup_vs_seed",
}


def test_bench_quick_writes_rows_json_and_chart(tmp_path, data_dir):
    out, chart = tmp_path / "out.json", tmp_path / "chart.png"
    result = run([str(BIN / "lenet-dist"), "bench", "--quick", "--json", str(out), "--chart", str(chart),
                  "--profile", "--profile-dir", str(tmp_path / "profiles")], timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {(r["pipeline"], r["batch_size"]) for r in rows} == {("torchvision", 64), ("torchvision", 128),
                                                                 ("tensor", 64), ("tensor", 128)}
    for row in rows:
        assert ROW_FIELDS <= row.keys()
        assert row["train_images_per_second"] > 0 and row["inference_images_per_second"] > 0
        assert 0 < row["roofline_percent"] < 100
        assert 1e6 < row["train_flops_per_image"] < 5e6  # LeNet-5 is ~2.3 MFLOP per training image
    timed = [r for r in rows if r["time_to_98"] is not None]
    assert len(timed) == 1 and timed[0]["pipeline"] == "tensor" and 0 < timed[0]["time_to_98"] < 120
    assert report["peak_matmul_flops_per_second"]["cpu/no"] > 1e9
    assert "lenet-dist bench" in result.stdout and "time_to_98" in result.stdout
    assert_png(chart)
    # --profile traced the default recipe's row, and inspect reads it
    (trace_dir,) = (tmp_path / "profiles").iterdir()
    assert [p.name.split(".")[0] for p in trace_dir.iterdir()] == ["cpu-tensor-no-eager-b128"]
    shown = run([str(BIN / "lenet-dist"), "inspect", str(trace_dir), "--json", "-"], timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["workers"]["cpu-tensor-no-eager-b128"]["conv_share"] > 0.1


def test_bench_rows_report_the_median_of_their_rounds(tmp_path, data_dir):
    out = tmp_path / "out.json"
    result = run([str(BIN / "lenet-dist"), "bench", "--pipelines", "tensor", "--precisions", "no",
                  "--compile-modes", "eager", "--batch-sizes", "64,128", "--window-images", "512", "--rounds", "3",
                  "--no-time-to-98", "--no-ddp-scaling", "--json", str(out)], timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("round 3/3") == 2
    for row in json.loads(out.read_text())["rows"]:
        for measure in ("train_images_per_second", "inference_images_per_second"):
            assert len(row[f"{measure}_rounds"]) == 3
            assert row[measure] == statistics.median(row[f"{measure}_rounds"])


@pytest.mark.parametrize("flags", [["--mixed-precision", "bf16"], ["--compile"]], ids=["bf16", "compile"])
def test_precision_and_compile_train_and_export_plain_weights(flags, tmp_path, data_dir):
    result = run([sys.executable, "lenet_dist/train.py", "--epochs", "1", *flags, "--output-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    metrics = read_metrics(tmp_path)
    assert metrics["final_test_accuracy"] > 0.9  # chance is 0.1
    if "bf16" in flags:
        assert metrics["mixed_precision"] == "bf16"
    model, metadata = load_model(tmp_path)
    plain = LeNet5()
    plain.load_state_dict(model.state_dict())  # the names a plain LeNet-5 has: no _orig_mod., no module.
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in model.state_dict())
    assert metadata["config"]["compile"] == ("--compile" in flags)
    with torch.no_grad():
        assert plain(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
