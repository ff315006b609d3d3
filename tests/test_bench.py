"""The benchmark: real rows, real training commands, the scaling sweep, comparing saved results."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from conftest import BIN, TRAIN, assert_png, read_metrics, run
from lenet_dist.checkpoint import load_model
from lenet_dist.model import LeNet5

ROW_FIELDS = {
    "device", "pipeline", "precision", "compile", "batch_size", "train_images_per_second",
    "inference_images_per_second", "train_flops_per_image", "roofline_percent", "speedup_vs_original",
}
BENCH = [str(BIN / "lenet-dist"), "bench"]


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory, data_dir):
    folder = tmp_path_factory.mktemp("bench")
    result = run([*BENCH, "--quick", "--json", str(folder / "out.json"), "--chart", str(folder / "chart.png"),
                  "--profile", "--profile-dir", str(folder / "profiles")], timeout=300)
    assert result.returncode == 0, result.stderr
    return folder, result


@pytest.mark.slow
def test_bench_quick_writes_rows_json_chart_and_a_profile(quick_result):
    folder, result = quick_result
    report = json.loads((folder / "out.json").read_text())
    assert report["schema"] == "lenet-dist-bench/2"
    rows = report["rows"]
    assert {(r["pipeline"], r["batch_size"]) for r in rows} == {("original", 64), ("original", 128), ("tuned", 64),
                                                                 ("tuned", 128)}
    for row in rows:
        assert ROW_FIELDS <= row.keys()
        assert row["train_images_per_second"] > 0 and row["inference_images_per_second"] > 0
        assert 0 < row["roofline_percent"] < 100
        assert 1e6 < row["train_flops_per_image"] < 5e6  # LeNet-5 is ~2.3 MFLOP per training image
    machine = report["machine"]
    assert machine["isa"] != "unknown" and machine["cpu_count"] >= 1 and machine["versions"]["torch"]
    assert report["peak_matmul_flops_per_second"]["cpu/no"] > 1e9
    assert "runs" not in report and "scaling" not in report  # --quick leaves the training runs out
    assert "lenet-dist bench" in result.stdout
    assert_png(folder / "chart.png")
    # --profile traced the default recipe's row, and inspect reads it
    (trace_dir,) = (folder / "profiles").iterdir()
    assert [p.name.split(".")[0] for p in trace_dir.iterdir()] == ["cpu-tuned-no-eager-b128"]
    shown = run([str(BIN / "lenet-dist"), "inspect", str(trace_dir), "--json", "-"], timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["workers"]["cpu-tuned-no-eager-b128"]["conv_share"] > 0.1


@pytest.mark.slow
def test_bench_rows_report_the_median_of_their_rounds(tmp_path, data_dir):
    out = tmp_path / "out.json"
    result = run([*BENCH, "--quick", "--pipelines", "tuned", "--window-images", "512", "--rounds", "3",
                  "--json", str(out)], timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("round 3/3") == 2  # --quick's own defaults give way to the flags given
    for row in json.loads(out.read_text())["rows"]:
        for measure in ("train_images_per_second", "inference_images_per_second"):
            assert len(row[f"{measure}_rounds"]) == 3
            assert row[measure] == statistics.median(row[f"{measure}_rounds"])


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--mixed-precision", "bf16"], ["--compile"]], ids=["bf16", "compile"])
def test_precision_and_compile_train_and_export_plain_weights(flags, tmp_path, data_dir):
    result = run([*TRAIN, "--target-accuracy", "0.9", *flags, "--output-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    metrics = read_metrics(tmp_path)
    assert metrics["final_test_accuracy"] >= 0.9
    if "bf16" in flags:
        assert metrics["mixed_precision"] == "bf16"
    else:
        assert metrics["compile_seconds"] > 0 and "inductor's cache: " in result.stdout
    model, metadata = load_model(tmp_path)
    plain = LeNet5()
    plain.load_state_dict(model.state_dict())  # the names a plain LeNet-5 has: no _orig_mod., no module.
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in model.state_dict())
    assert metadata["config"]["compile"] == ("--compile" in flags)
    with torch.no_grad():
        assert plain(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
