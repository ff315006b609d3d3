"""The benchmark: real rows, compile and precision in real runs, comparing saved results, the sweep's limits.

(The training commands it times and the scaling sweep run from an installed package: tests/test_install.py.)
"""

from __future__ import annotations

import json
import re
import statistics

import pytest
import torch

from conftest import BIN, ROOT, TRAIN, assert_png, call, one_line_error, read_metrics
from lenet_dist import cli
from lenet_dist.bench.compare import compare, comparison_figure
from lenet_dist.bench.report import scaling_figure, throughput_figure
from lenet_dist.checkpoint import load_model
from lenet_dist.model import LeNet5

ROW_FIELDS = {
    "device", "pipeline", "precision", "compile", "batch_size", "train_images_per_second",
    "inference_images_per_second", "train_flops_per_image", "mfu_percent", "speedup_vs_original",
}
BENCH = [str(BIN / "lenet-dist"), "bench"]


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory, mnist_slice):
    """README's `lenet-dist bench --quick` (tests/test_readme.py leaves it to this), with where its outputs go."""
    assert "\nlenet-dist bench --quick " in (ROOT / "README.md").read_text()
    folder = tmp_path_factory.mktemp("bench")
    result = call([*BENCH, "--quick", "--json", str(folder / "out.json"), "--chart", str(folder / "chart.png"),
                  "--profile", "--profile-dir", str(folder / "profiles"), "--data-dir", str(mnist_slice)], timeout=300)
    assert result.returncode == 0, result.stderr
    return folder, result


@pytest.mark.slow
def test_bench_quick_writes_rows_json_chart_and_a_profile(quick_result):
    folder, result = quick_result
    report = json.loads((folder / "out.json").read_text())
    assert report["schema"] == "lenet-dist-bench/3"
    rows = report["rows"]
    assert {(r["pipeline"], r["batch_size"]) for r in rows} == {("original", 64), ("original", 128), ("tuned", 64),
                                                                 ("tuned", 128)}
    for row in rows:
        assert ROW_FIELDS <= row.keys()
        assert row["train_images_per_second"] > 0 and row["inference_images_per_second"] > 0
        assert 0 < row["mfu_percent"] < 100
        assert 1e6 < row["train_flops_per_image"] < 5e6  # LeNet-5 is ~2.3 MFLOP per training image
    machine = report["machine"]
    assert machine["isa"] != "unknown" and machine["cpu_count"] >= 1 and machine["versions"]["torch"]
    peak = report["peak_matmul"]["cpu/no"]
    assert peak["flops_per_second"] > 1e9 and peak["precision"] == "fp32" and peak["matmul"] == "2048²"
    assert "MFU %: training FLOP/s" in result.stdout and "cpu/no" in result.stdout  # the column says what it is
    assert "runs" not in report and "scaling" not in report  # --quick leaves the training runs out
    assert "lenet-dist bench" in result.stdout
    assert_png(folder / "chart.png")
    # --profile traced the default recipe's row, and inspect reads it
    (trace_dir,) = (folder / "profiles").iterdir()
    assert [p.name.split(".")[0] for p in trace_dir.iterdir()] == ["cpu-tuned-no-eager-b128"]
    shown = call([str(BIN / "lenet-dist"), "inspect", str(trace_dir), "--json", "-"], timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["workers"]["cpu-tuned-no-eager-b128"]["conv_share"] > 0.1


@pytest.fixture(scope="module")
def three_rounds(tmp_path_factory, mnist_slice):
    out = tmp_path_factory.mktemp("rounds") / "out.json"
    result = call([*BENCH, "--quick", "--pipelines", "tuned", "--batch-sizes", "128,256", "--window-images", "512",
                  "--rounds", "3", "--json", str(out), "--data-dir", str(mnist_slice)], timeout=300)
    assert result.returncode == 0, result.stderr
    return out, result


@pytest.mark.slow
def test_bench_rows_report_the_median_of_their_rounds(three_rounds):
    out, result = three_rounds
    assert result.stdout.count("round 3/3") == 2  # --quick's own defaults give way to the flags given
    for row in json.loads(out.read_text())["rows"]:
        for measure in ("train_images_per_second", "inference_images_per_second"):
            assert len(row[f"{measure}_rounds"]) == 3
            assert row[measure] == statistics.median(row[f"{measure}_rounds"])


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--mixed-precision", "bf16"], ["--compile"]], ids=["bf16", "compile"])
def test_precision_and_compile_train_and_export_plain_weights(flags, tmp_path, mnist_slice):
    # dynamo logs every recompilation: the compiled run should make its training graph, then its evaluation
    # graph (one recompilation, both before the first step), and no more: no partial batch, no new shape
    result = call([*TRAIN, "--epochs", "1", "--batch-size", "256", "--target-accuracy", "0.9", *flags, "--output-dir",
                  str(tmp_path / "run")], env={"TORCH_LOGS": "recompiles", "LENET_DATA_DIR": str(mnist_slice),
                                                "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),  # cold, as CI
                                                # on two cores inductor's pool of compile workers costs more
                                                # than it wins: 30 CPU-s against 39 with it (AVX-512 EPYC)
                                                "TORCHINDUCTOR_COMPILE_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    metrics = read_metrics(tmp_path / "run")
    assert metrics["final_test_accuracy"] >= 0.9
    if "bf16" in flags:
        assert metrics["mixed_precision"] == "bf16"
    else:
        assert metrics["compile_seconds"] > 0 and "inductor's cache: " in result.stdout
        assert result.stderr.count("Recompiling function") == 1, result.stderr[-3000:]
        # no torch warning lines (W1207 12:00:00 …): not dynamo's per profiler range, not cpp_extension's CUDA one
        assert not re.search(r"^W\d{4} ", result.stderr, flags=re.M), result.stderr[-3000:]
    model, metadata = load_model(tmp_path / "run")
    plain = LeNet5()
    plain.load_state_dict(model.state_dict())  # the names a plain LeNet-5 has: no _orig_mod., no module.
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in model.state_dict())
    assert metadata["config"]["compile"] == ("--compile" in flags)
    with torch.no_grad():
        assert plain(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.slow
def test_compare_matches_rows_of_two_real_results_and_lists_the_rest(quick_result, three_rounds, tmp_path):
    folder, _ = quick_result
    other, _ = three_rounds
    chart = tmp_path / "compare.png"
    compared = call([*BENCH, "compare", str(folder / "out.json"), str(other), "--chart", str(chart), "--json",
                    str(tmp_path / "compare.json")], timeout=120)
    assert compared.returncode == 0, compared.stderr
    comparison = json.loads((tmp_path / "compare.json").read_text())
    (row,) = comparison["rows"]  # the one row both ran
    assert (row["pipeline"], row["batch_size"]) == ("tuned", 128)
    first = json.loads((folder / "out.json").read_text())
    second = json.loads(other.read_text())
    rates = [next(r["train_images_per_second"] for r in result["rows"] if (r["pipeline"], r["batch_size"]) ==
                  ("tuned", 128)) for result in (first, second)]
    assert row["train_images_per_second"] == rates and row["ratio"] == [1.0, rates[1] / rates[0]]
    assert {(r["file"], r["pipeline"], r["batch_size"]) for r in comparison["unmatched"]} == {
        (0, "original", 64), (0, "original", 128), (0, "tuned", 64), (1, "tuned", 256)}
    assert "AMX" in compared.stdout or "AVX" in compared.stdout  # each column names its machine's instruction set
    assert_png(chart)


def test_compare_refuses_what_is_not_a_current_bench_result(tmp_path):
    from lenet_dist.bench.compare import load_result
    from lenet_dist.errors import UserError

    broken = tmp_path / "broken.json"
    broken.write_text('{"rows": [')
    older = tmp_path / "older.json"
    older.write_text(json.dumps({"machine": {}, "rows": [], "ddp_scaling": None}))  # before results had a schema
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"accuracy": 0.98}))
    for path, message in ((broken, "not JSON"), (older, "older schema"), (other, "not a lenet-dist bench result"),
                          (tmp_path / "missing.json", "No such file")):
        with pytest.raises(UserError, match=message):
            load_result(path)
    result = call([*BENCH, "compare", str(broken), str(older)], timeout=60)
    one_line_error(result, 1, str(broken))


@pytest.mark.parametrize("flag", ["--json", "--chart"])
def test_an_output_path_it_could_not_write_is_refused_before_measuring(flag, tmp_path, capsys, monkeypatch):
    from lenet_dist.bench import suite

    def measured(*args, **kwargs):
        raise AssertionError("measured before refusing")

    monkeypatch.setattr(suite, "device_list", measured)
    missing = tmp_path / "missing" / "folder" / "x.json"
    assert cli.command_status(["bench", "--quick", flag, str(missing)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {flag} {missing}: there is no folder {missing.parent}; create it or choose another path"]


def test_process_counts_beyond_the_machine_are_refused(monkeypatch):
    from lenet_dist.bench.suite import process_counts
    from lenet_dist.config import BenchConfig
    from lenet_dist.errors import UsageError

    cpu = torch.device("cpu")
    monkeypatch.setattr("os.sched_getaffinity", lambda _: {0, 1})
    assert process_counts(BenchConfig(processes="2,1"), cpu) == [1, 2]
    assert process_counts(BenchConfig(), cpu) == [1, 2] and process_counts(BenchConfig(quick=True), cpu) == []
    with pytest.raises(UsageError, match="--processes 4 is more than this machine's 2 cores; pass --oversubscribe"):
        process_counts(BenchConfig(processes="1,2,4"), cpu)
    assert process_counts(BenchConfig(processes="1,2,4", oversubscribe=True), cpu) == [1, 2, 4]


def test_the_default_runs_parts_come_from_one_run_the_median_one():
    """Field-by-field medians need not add up; the median run's own parts do."""
    from lenet_dist.bench.runs import median_run

    runs = [{"seed": 0, "wall_seconds": 10.0, "train_seconds": 6.0, "eval_seconds": 1.0, "overhead_seconds": 3.0,
             "final_test_accuracy": 0.985},
            {"seed": 1, "wall_seconds": 12.0, "train_seconds": 9.0, "eval_seconds": 1.0, "overhead_seconds": 2.0,
             "final_test_accuracy": 0.987},
            {"seed": 2, "wall_seconds": 11.0, "train_seconds": 5.0, "eval_seconds": 2.0, "overhead_seconds": 4.0,
             "final_test_accuracy": 0.986}]
    median = median_run(runs)
    assert median["median_seed"] == 2 and median["wall_seconds"] == 11.0
    assert median["train_seconds"] + median["eval_seconds"] + median["overhead_seconds"] == median["wall_seconds"]
    assert median["final_test_accuracy"] == 0.986


def test_a_seed_that_misses_98_is_counted_not_dropped():
    from lenet_dist.bench.runs import median_to_98

    def seeds(*times):
        return [{"seed": i, "time_to_98": t, "images": None if t is None else 1000 * t} for i, t in enumerate(times)]

    assert median_to_98(seeds(3.0, None, 5.0)) == {"time_to_98": 5.0, "images": 5000.0, "misses": 1}  # not 4.0
    assert median_to_98(seeds(3.0, None, None))["time_to_98"] is None  # most missed: no median to show
    assert median_to_98(seeds(3.0, 4.0, 5.0))["misses"] == 0


def test_profiling_stays_out_of_the_timed_rounds(monkeypatch, data_dir, tmp_path):
    """--profile records the default row in a pass of its own, after every timed round."""
    from lenet_dist.bench import measure, suite
    from lenet_dist.config import BenchConfig
    from lenet_dist.profiling.capture import NoProfiler

    calls = []
    monkeypatch.setattr(measure, "measure", lambda cell, *args: calls.append((cell, args[-1])) or
                        measure.Throughput(1.0, 1.0))
    monkeypatch.setattr(measure, "matmul_flops_per_second", lambda device, precision: 1e9)
    bench = BenchConfig(quick=True, pipelines="tuned", batch_sizes="64,128", rounds=2, profile=True,
                        profile_dir=str(tmp_path))
    monkeypatch.setattr(suite, "profiler_for", lambda *args: __import__("contextlib").nullcontext("profiling"))
    suite.throughput_matrix(bench, [torch.device("cpu")], data_dir)
    timed, profiled = calls[:4], calls[4:]
    assert all(isinstance(profiler, NoProfiler) for _, profiler in timed)
    assert [(cell.batch_size, profiler) for cell, profiler in profiled] == [(128, "profiling")]


def test_rows_whose_timings_disagree_are_called_noisy_under_the_table(monkeypatch, data_dir):
    """A loaded machine: one row's timed windows 40 % apart. One line says so, naming the row; tight rows say
    nothing."""
    from lenet_dist.bench import measure, report, suite
    from lenet_dist.config import BenchConfig

    windows = iter([(90.0, 100.0, 130.0), (99.0, 100.0, 101.0)])
    monkeypatch.setattr(measure, "measure", lambda *args: measure.Throughput(100.0, 100.0, next(windows)))
    monkeypatch.setattr(measure, "matmul_flops_per_second", lambda device, precision: 1e9)
    bench = BenchConfig(quick=True, pipelines="tuned", batch_sizes="64,128")
    rows = suite.throughput_matrix(bench, [torch.device("cpu")], data_dir)["rows"]
    assert [round(row["train_spread"], 2) for row in rows] == [0.4, 0.02]
    assert report.noise_line(rows) == (
        "noisy: in 1 of 2 rows the timed windows disagree by more than 10% (up to 40%: cpu tuned batch 64); the "
        "machine was busy, so compare rows with care; rerun on an idle machine, or with more --rounds")
    assert report.noise_line(rows[1:]) is None


def test_scaling_efficiency_is_each_count_against_one_process_of_its_own_mode(monkeypatch, tmp_path):
    """Strong scaling splits the global batch 128; weak keeps 64 a process; efficiency is images/s over N times
    the same mode's one process; each process gets `threads` cores."""
    from lenet_dist.bench import runs

    launched = []

    def metrics_of(command, env):
        processes, batch = int(command[command.index("--num_processes") + 1]), int(
            command[command.index("--batch-size") + 1])
        launched.append((processes, batch, env["OMP_NUM_THREADS"]))
        rate = {(1, 128): 1000.0, (2, 128): 1500.0, (1, 64): 800.0}[(processes, batch)]
        return 1.0, {"epochs": [{"train_images_per_second": rate}]}

    monkeypatch.setattr(runs, "metrics_of", metrics_of)
    rows = runs.scaling(tmp_path, "cpu", [1, 2], threads=1)["rows"]
    assert launched == [(1, 128, "1"), (2, 128, "1"), (1, 64, "1"), (2, 128, "1")]
    assert [(row["mode"], row["processes"], row["global_batch"]) for row in rows] == [
        ("strong", 1, 128), ("strong", 2, 128), ("weak", 1, 64), ("weak", 2, 128)]
    assert [row["efficiency"] for row in rows] == pytest.approx([1.0, 0.75, 1.0, 1500 / 1600])
    assert rows[1]["step_ms"] == pytest.approx(1000 * 128 / 1500)
    alone = runs.scaling(tmp_path, "cpu", [2], threads=1)["rows"]
    assert [row["efficiency"] for row in alone] == [None, None]  # no one-process run to compare with


def test_benchmarks_compare_command_runs(tmp_path, capsys):
    """BENCHMARKS.md's `bench compare` of its two saved results (an older schema with the same rows)."""
    status = cli.command_status(["bench", "compare", "docs/bench-cpu.json", "docs/bench-cpu-1core.json", "--chart",
                                 str(tmp_path / "compare.png")])
    assert status == 0, capsys.readouterr().err
    assert "[2] docs/bench-cpu-1core.json" in capsys.readouterr().out


@pytest.mark.parametrize(("saved", "drawn"), [
    ("bench-cpu-avx512.json", ["lenet-dist's pipeline"]),  # its rows are all the tuned pipeline's
    ("bench-cpu.json", ["the original script's pipeline", "lenet-dist's pipeline"]),
])
def test_charts_start_at_zero_name_only_what_they_draw_and_say_their_machine_and_commit(saved, drawn):
    result = json.loads((ROOT / "docs" / saved).read_text())
    (axes,) = throughput_figure(result).axes
    assert axes.get_xlim()[0] == 0 and [text.get_text() for text in axes.get_legend().get_texts()] == drawn
    assert len(axes.patches) == len(result["rows"]) and f"commit {result['machine']['commit']}" in axes.get_title()
    scaling = scaling_figure(result)
    assert [axis.get_ylim()[0] for axis in scaling.axes] == [0, 0]
    assert f"commit {result['machine']['commit']}" in scaling.get_suptitle()
    other = json.loads((ROOT / "docs" / "bench-cpu-1core.json").read_text())
    comparison = comparison_figure({"files": [saved, "bench-cpu-1core.json"], **compare([result, other])})
    (legend,) = comparison.legends
    assert comparison.axes[0].get_xlim()[0] == 0 and len(legend.get_texts()) == 2
