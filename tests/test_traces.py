"""`lenet-dist inspect` on GPU traces, traces without step markers, gzipped traces, and two runs side by side.

The GPU figures are checked against a computation from the raw events written here on its own terms: a
1-µs boolean timeline per kind of GPU work, and a brute-force search for the host ranges around each launch.
"""

from __future__ import annotations

import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from conftest import TRAIN, one_line_error, run
from lenet_dist import traces
from lenet_dist.config import InspectConfig

# Two real Kineto traces of a 128-rank NCCL job on A100s (see their README); gzipped, as torch writes them.
GPU_TRACES = Path(__file__).parent / "data" / "gpu-traces"
INSPECT = [sys.executable, "-m", "lenet_dist", "inspect"]
# A third computation, made apart from both (sorted-interval merges over the raw events): busy share
# (kernels, copies, sets) and NCCL ∩ compute as a share of NCCL time, inside the two ProfilerStep windows.
PUBLISHED = {"rank0": (547656 / 1230240, 59216 / 396199), "rank1": (580050 / 1238543, 75530 / 379053)}


@pytest.fixture(scope="module")
def gpu_traces() -> Path:
    return GPU_TRACES


def raw_events(path: Path) -> list[dict]:
    return [e for e in json.loads(gzip.decompress(path.read_bytes()))["traceEvents"] if e.get("ph") == "X"]


def reference(path: Path) -> dict:
    """Busy share, NCCL overlap, the longest idle gap and kernel time by launching operator, from scratch."""
    events = raw_events(path)
    steps = [e for e in events if e["name"].startswith("ProfilerStep#")]
    origin = min(s["ts"] for s in steps)
    size = int(max(s["ts"] + s["dur"] for s in steps) - origin)

    def timeline(selected) -> np.ndarray:  # one cell per µs (the trace's times are whole µs)
        line = np.zeros(size, dtype=bool)
        for e in selected:
            line[max(0, int(e["ts"] - origin)):max(0, int(e["ts"] + e["dur"] - origin))] = True
        return line

    in_steps = timeline(steps)
    kernels = [e for e in events if e["cat"] == "kernel"]
    nccl = timeline(k for k in kernels if "nccl" in k["name"].lower()) & in_steps
    compute = timeline(k for k in kernels if "nccl" not in k["name"].lower()) & in_steps
    busy = timeline(e for e in events if e["cat"] in ("kernel", "gpu_memcpy", "gpu_memset")) & in_steps
    idle = np.diff(np.flatnonzero(np.diff(np.concatenate(([1], (busy | ~in_steps).astype(int), [1])))))[::2]

    launches = {e["args"]["correlation"]: e for e in events if e["cat"] in ("cuda_runtime", "cuda_driver")}
    host = defaultdict(list)
    for e in events:
        if e["cat"] in ("cpu_op", "user_annotation") and not e["name"].startswith("ProfilerStep#"):
            host[e["pid"], e["tid"]].append(e)
    by_operator: dict[str, float] = defaultdict(float)
    for kernel in kernels:
        if not any(s["ts"] <= kernel["ts"] < s["ts"] + s["dur"] for s in steps):
            continue
        launch = launches.get(kernel["args"].get("correlation"))
        around = [] if launch is None else sorted(
            (h for h in host[launch["pid"], launch["tid"]]
             if h["ts"] <= launch["ts"] and h["ts"] + h["dur"] >= launch["ts"] + launch["dur"]),
            key=lambda h: (h["ts"], -h["dur"]),
        )
        is_nccl = "nccl" in kernel["name"].lower()
        picked = ([h for h in around if is_nccl and h["name"].startswith(("c10d::", "nccl:"))]
                  or [h for h in around if h["cat"] == "cpu_op"] or around)
        by_operator[picked[-1]["name"] if picked else "<unattributed>"] += kernel["dur"] / 1000 / len(steps)
    return {
        "busy_share": busy.sum() / sum(s["dur"] for s in steps),
        "nccl_overlap_share": (nccl & compute).sum() / nccl.sum(),
        "nccl_overlap_ms_per_step": (nccl & compute).sum() / 1000 / len(steps),
        "longest_idle_ms": idle.max() / 1000,
        "kernel_ms_per_step_by_operator": dict(by_operator),
    }


def close(a: float, b: float) -> bool:
    return a == pytest.approx(b, rel=1e-3)


def test_gpu_section_matches_a_computation_from_the_raw_events(gpu_traces):
    report = traces.inspect_run(gpu_traces)
    assert list(report["workers"]) == ["rank0", "rank1"]
    for worker, result in report["workers"].items():
        (path,) = result["files"]
        assert path.endswith(".pt.trace.json.gz") and result["steps"] == 2
        gpu, expected = result["gpu"], reference(Path(path))
        for key in ("busy_share", "nccl_overlap_share", "nccl_overlap_ms_per_step"):
            assert close(gpu[key], expected[key]), (worker, key, gpu[key], expected[key])
        assert (gpu["busy_share"], gpu["nccl_overlap_share"]) == pytest.approx(PUBLISHED[worker], rel=1e-3)
        assert close(gpu["idle_gaps"][0]["ms"], expected["longest_idle_ms"])
        by_operator = gpu["kernel_ms_per_step_by_operator"]
        assert by_operator.keys() == expected["kernel_ms_per_step_by_operator"].keys()
        for name, ms in expected["kernel_ms_per_step_by_operator"].items():
            assert close(by_operator[name], ms), (worker, name, by_operator[name], ms)
        # NCCL is charged to the collective, not to the record_param_comms wrapper around its launch
        assert "record_param_comms" not in by_operator and by_operator["nccl:all_to_all"] > 0
        assert close(gpu["kernel_ms_per_step"], gpu["compute_ms_per_step"] + gpu["nccl_ms_per_step"])
        assert close(sum(gpu["kernel_ms_per_step_by_kernel"].values()), gpu["kernel_ms_per_step"])


def host(name: str, ts: float, dur: float, tid: int = 1, cat: str = "cpu_op") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "pid": 7, "tid": tid, "ts": ts, "dur": dur}


def gpu_work(name: str, ts: float, dur: float, correlation: int | None, stream: int = 7, cat: str = "kernel") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "pid": 0, "tid": stream, "ts": ts, "dur": dur,
            "args": {"correlation": correlation}}


def launch(ts: float, correlation: int, tid: int = 1) -> dict:
    # a ROCm trace names the call hipLaunchKernel under the same category
    return {"ph": "X", "cat": "cuda_runtime", "name": "hipLaunchKernel", "pid": 7, "tid": tid, "ts": ts, "dur": 2,
            "args": {"correlation": correlation}}


def write_trace(folder: Path, events: list[dict], gz: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"traceEvents": [{"ph": "M", "name": "process_name", "pid": 7}, *events]})
    path = folder / f"rank0.1.pt.trace.json{'.gz' if gz else ''}"
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return path


def test_a_trace_without_step_markers_is_one_window_and_gzip_reads_the_same(tmp_path, capsys):
    events = [host("outer", 1000, 100), host("inner", 1010, 30), host("inner", 1050, 20),
              host("backward", 1150, 60, tid=2)]
    plain = traces.analyse_worker([write_trace(tmp_path / "plain", events)])
    assert plain["window"] == traces.WHOLE_TRACE and plain["steps"] == 1
    assert plain["step_ms"]["median"] == pytest.approx(0.21)  # first event's start to last event's end
    assert plain["self_ms_per_step"] == pytest.approx({"outer": 0.05, "inner": 0.05, "backward": 0.06})
    assert "gpu" not in plain  # a CPU trace keeps today's report
    zipped = traces.analyse_worker([write_trace(tmp_path / "gz", events, gz=True)])
    assert {**zipped, "files": []} == {**plain, "files": []}

    traces.print_report(traces.inspect_run(tmp_path / "gz"), top=5)
    out = capsys.readouterr().out
    assert traces.WHOLE_TRACE in out and "outer" in out and "GPU busy" not in out


def test_kernels_are_charged_to_the_operator_that_launched_them(tmp_path):
    events = [
        host("ProfilerStep#1", 0, 1000, cat="user_annotation"),
        host("aten::mm", 10, 50), launch(20, 1),
        host("c10d::allreduce_", 100, 50), host("record_param_comms", 105, 40), launch(110, 2),
        host("## optimizer ##", 200, 50, cat="user_annotation"), launch(210, 3),
        launch(300, 4),  # directly under the step marker, which names no operator
        gpu_work("gemm_kernel<float>(float*)", 100, 200, 1),
        gpu_work("ncclKernel_AllReduce(ncclDevComm*)", 250, 150, 2, stream=20),
        gpu_work("Memcpy HtoD", 500, 100, 3, cat="gpu_memcpy"),
        gpu_work("adam_kernel", 700, 50, 3), gpu_work("relu_kernel", 800, 50, 4),
        gpu_work("orphan_kernel", 900, 20, None),
        gpu_work("late_kernel", 1100, 100, 1),  # starts after the step: not counted
    ]
    gpu = traces.analyse_worker([write_trace(tmp_path, events)])["gpu"]
    assert gpu["kernel_ms_per_step_by_operator"] == pytest.approx({
        "aten::mm": 0.2, "c10d::allreduce_": 0.15, "## optimizer ##": 0.05, "<unattributed>": 0.07,
    })
    # busy: 100–400 (gemm, then NCCL), 500–600, 700–750, 800–850, 900–920 of 1000 µs
    assert gpu["busy_share"] == pytest.approx(0.52)
    assert gpu["nccl_ms_per_step"] == pytest.approx(0.15) and gpu["compute_ms_per_step"] == pytest.approx(0.32)
    assert gpu["nccl_overlap_ms_per_step"] == pytest.approx(0.05) and gpu["nccl_overlap_share"] == pytest.approx(1 / 3)
    gaps = [(g["step"], round(g["offset_ms"], 6), round(g["ms"], 6)) for g in gpu["idle_gaps"]]
    assert gaps == [("ProfilerStep#1", 0, 0.1), ("ProfilerStep#1", 0.4, 0.1), ("ProfilerStep#1", 0.6, 0.1)]


@pytest.fixture(scope="module")
def two_profiles(tmp_path_factory, single_process_profile):
    """The default recipe (A, the shared profile) and the same with --no-channels-last (B)."""
    root = tmp_path_factory.mktemp("profiles")
    result = run([*TRAIN, "--target-accuracy", "0.95", "--no-channels-last", "--profile", "--profile-dir",
                  str(root), "--output-dir", str(root / "runs" / "b")])
    assert result.returncode == 0, result.stderr[-2000:]
    return single_process_profile[0], root / "b"


@pytest.mark.slow
def test_inspect_compares_two_runs(two_profiles, capsys):
    a, b = (traces.inspect_run(folder)["workers"]["rank0"] for folder in two_profiles)
    comparison = traces.run(InspectConfig(run_dirs=[str(p) for p in two_profiles], json="-", top=8))
    assert json.loads(capsys.readouterr().out) == comparison
    rows = comparison["self_ms_per_step"]
    assert {row["name"] for row in rows} == a["self_ms_per_step"].keys() | b["self_ms_per_step"].keys()
    assert [abs(row["change"]) for row in rows] == sorted((abs(row["change"]) for row in rows), reverse=True)
    assert rows[0]["change"] != 0
    for row in rows:
        assert row["a"] == pytest.approx(a["self_ms_per_step"].get(row["name"], 0))
        assert row["b"] == pytest.approx(b["self_ms_per_step"].get(row["name"], 0))
        assert row["change"] == pytest.approx(row["b"] - row["a"])
        assert row["ratio"] == (pytest.approx(row["b"] / row["a"]) if row["a"] else None)
    figures = comparison["figures"]
    assert "gpu_busy_share" not in figures  # CPU runs
    assert (figures["step_ms_median"]["a"], figures["step_ms_median"]["b"]) == (
        pytest.approx(a["step_ms"]["median"]), pytest.approx(b["step_ms"]["median"]))
    assert (figures["conv_share"]["a"], figures["conv_share"]["b"]) == (
        pytest.approx(a["conv_share"]), pytest.approx(b["conv_share"]))

    traces.run(InspectConfig(run_dirs=[str(p) for p in two_profiles], top=8))
    table = capsys.readouterr().out
    assert "B−A" in table and rows[0]["name"] in table and "conv fwd+bwd share" in table


@pytest.mark.parametrize("folders", [[], ["a", "b", "c"]])
def test_inspect_takes_one_or_two_folders(folders):
    one_line_error(run([*INSPECT, *folders], timeout=60), 2, "pass one profile folder, or two")


def test_inspect_prints_the_gpu_section_of_gzipped_traces(gpu_traces):
    shown = run([*INSPECT, str(gpu_traces)], timeout=120)
    assert shown.returncode == 0, shown.stderr
    for needle in ("GPU busy", "44.5%", "46.8%", "nccl:all_to_all", "ncclKernel_SendRecv_RING_SIMPLE_Sum_int8_t"):
        assert needle in shown.stdout, needle
