"""`lenet-dist inspect` on GPU traces, traces without step markers, gzipped traces, and two runs side by side;
what it accepts (a run's output folder, a trace folder, one trace file) and folders that mix runs.

The GPU figures are checked against a computation from the raw events written here on its own terms: a
1-µs boolean timeline per kind of GPU work, and a brute-force search for the host ranges around each launch.
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from conftest import TRAIN, call, one_line_error
from lenet_dist.config import InspectConfig
from lenet_dist.errors import UserError
from lenet_dist.profiling import compare, inspection, traces
from lenet_dist.profiling.host import analyse_worker

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
    report = inspection.inspect_run(gpu_traces)
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


def write_trace(folder: Path, events: list[dict], gz: bool = False, name: str = "rank0.1") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"traceEvents": [{"ph": "M", "name": "process_name", "pid": 7}, *events]})
    path = folder / f"{name}.pt.trace.json{'.gz' if gz else ''}"
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return path


def test_a_trace_without_step_markers_is_one_window_and_gzip_reads_the_same(tmp_path, capsys):
    events = [host("outer", 1000, 100), host("inner", 1010, 30), host("inner", 1050, 20),
              host("backward", 1150, 60, tid=2)]
    plain = analyse_worker([write_trace(tmp_path / "plain", events)])
    assert plain["window"] == traces.WHOLE_TRACE and plain["steps"] == 1
    assert plain["step_ms"]["median"] == pytest.approx(0.21)  # first event's start to last event's end
    assert plain["self_ms_per_step"] == pytest.approx({"outer": 0.05, "inner": 0.05, "backward": 0.06})
    assert "gpu" not in plain  # a CPU trace keeps today's report
    zipped = analyse_worker([write_trace(tmp_path / "gz", events, gz=True)])
    assert {**zipped, "files": []} == {**plain, "files": []}

    inspection.print_report(inspection.inspect_run(tmp_path / "gz"), top=5)
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
    gpu = analyse_worker([write_trace(tmp_path, events)])["gpu"]
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
def two_profiles(tmp_path_factory, single_process_profile, mnist_slice):
    """The default recipe (A, the shared profile's trace folder) and the same with --no-channels-last (B, named by
    its run's output folder, whose metrics.json records where its traces went)."""
    root = tmp_path_factory.mktemp("profiles")
    result = call([*TRAIN, "--epochs", "1", "--no-channels-last", "--profile", "--profile-dir", str(root),
                   "--output-dir", str(root / "runs" / "b")], env={"LENET_DATA_DIR": str(mnist_slice)})
    assert result.returncode == 0, result.stderr[-2000:]
    return single_process_profile[0], root / "runs" / "b"


@pytest.mark.slow
def test_inspect_compares_two_runs(two_profiles, capsys):
    a, b = (inspection.inspect_run(folder)["workers"]["rank0"] for folder in two_profiles)
    comparison = inspection.run(InspectConfig(run_dirs=[str(p) for p in two_profiles], json="-", top=8))
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
    spread = comparison["step_ms_range"]
    assert (spread["a"], spread["b"]) == ({"min": a["step_ms"]["min"], "max": a["step_ms"]["max"]},
                                          {"min": b["step_ms"]["min"], "max": b["step_ms"]["max"]})
    assert comparison["mixed_runs"] == [{}, {}]  # a real run's cycles are not taken for several runs

    inspection.run(InspectConfig(run_dirs=[str(p) for p in two_profiles], top=8))
    table = capsys.readouterr().out
    assert "B−A" in table and rows[0]["name"] in table and "conv fwd+bwd share" in table
    assert "step ms (min / max, all ranks)" in table and "step time: " in table


@pytest.mark.parametrize("folders", [[], ["a", "b", "c"]])
def test_inspect_takes_one_or_two_folders(folders):
    one_line_error(call([*INSPECT, *folders], timeout=60), 2, "pass one run, trace folder or trace file, or two")


def test_inspect_prints_the_gpu_section_of_gzipped_traces(gpu_traces):
    shown = call([*INSPECT, str(gpu_traces)], timeout=120)
    assert shown.returncode == 0, shown.stderr
    for needle in ("GPU busy", "44.5%", "46.8%", "nccl:all_to_all", "ncclKernel_SendRecv_RING_SIMPLE_Sum_int8_t"):
        assert needle in shown.stdout, needle


def test_inspect_reads_a_run_folder_a_trace_folder_or_one_trace_file(tmp_path, gpu_traces):
    elsewhere = tmp_path / "traces-of-a"
    stepped_trace(elsewhere, [1, 2, 3])
    run_a = tmp_path / "runs" / "a"
    run_a.mkdir(parents=True)
    (run_a / "metrics.json").write_text(json.dumps({"profile_dir": str(elsewhere)}))
    report = inspection.inspect_run(run_a)
    assert (report["run_dir"], report["traces"]) == (str(run_a), str(elsewhere))
    assert report["workers"]["rank0"]["steps"] == 3

    # a run that records no profile_dir (trained without --profile, or before runs recorded it) but holds traces
    run_c = tmp_path / "runs" / "c"
    stepped_trace(run_c, [1])
    (run_c / "metrics.json").write_text(json.dumps({"epochs": []}))
    assert inspection.inspect_run(run_c)["traces"] == str(run_c)

    one_file = gpu_traces / "rank1.1.pt.trace.json.gz"  # its folder also holds rank0's, which are left out
    shown = call([*INSPECT, str(one_file), "--json", "-"], timeout=120)
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["traces"] == str(one_file) and list(report["workers"]) == ["rank1"]
    assert report["workers"]["rank1"]["gpu"]["busy_share"] == pytest.approx(PUBLISHED["rank1"][0], rel=1e-3)


def test_inspect_says_in_one_line_what_it_cannot_read(tmp_path):
    not_a_trace = tmp_path / "notes.txt"
    not_a_trace.write_text("hello")
    one_line_error(call([*INSPECT, str(not_a_trace)], timeout=60), 1, str(not_a_trace), "*.pt.trace.json")
    with pytest.raises(UserError, match="does not exist"):
        inspection.inspect_run(tmp_path / "missing")
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "metrics.json").write_text(json.dumps({"profile_dir": str(tmp_path / "gone")}))
    with pytest.raises(UserError, match=f"{moved / 'metrics.json'} records profile_dir {tmp_path / 'gone'}"):
        inspection.inspect_run(moved)
    unprofiled = tmp_path / "unprofiled"
    unprofiled.mkdir()
    (unprofiled / "metrics.json").write_text(json.dumps({"profile_dir": None}))
    with pytest.raises(UserError, match=r"no \*\.pt\.trace\.json\[\.gz\] files in .*unprofiled"):
        inspection.inspect_run(unprofiled)
    (unprofiled / "metrics.json").write_text('{"profile_dir": ')
    with pytest.raises(UserError, match="metrics.json is not readable JSON"):
        inspection.inspect_run(unprofiled)


def stepped_trace(folder: Path, step_ms: list[float], name: str = "rank0.1") -> Path:
    """A trace of back-to-back ProfilerStep windows of the given lengths, one operator in each."""
    events, start = [], 0.0
    for number, ms in enumerate(step_ms):
        events += [host(f"ProfilerStep#{number}", start, ms * 1000, cat="user_annotation"),
                   host("aten::mm", start + 1, ms * 500)]
        start += ms * 1000
    return write_trace(folder, events, name=name)


def test_inspect_a_b_says_whether_the_step_time_change_is_within_noise(tmp_path, capsys):
    a, apart, overlapping = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    stepped_trace(a, [10, 11, 12])
    stepped_trace(apart, [20, 21, 22])  # every step slower than every step of A
    stepped_trace(overlapping, [20, 21, 22])
    stepped_trace(overlapping, [11.5, 12, 13], name="rank1.1")  # one rank's steps overlap A's: the spread is all ranks'

    comparison = inspection.run(InspectConfig(run_dirs=[str(a), str(apart)], json="-"))
    assert json.loads(capsys.readouterr().out) == comparison
    assert comparison["step_ms_range"] == {
        "a": {"min": pytest.approx(10), "max": pytest.approx(12)},
        "b": {"min": pytest.approx(20), "max": pytest.approx(22)},
        "within_noise": False,
    }
    compare.print_comparison(comparison, top=3)
    table = capsys.readouterr().out
    assert "step ms (min / max, all ranks)" in table and "10.00 / 12.00" in table and "20.00 / 22.00" in table
    assert "apart" in table and "step time: B−A +10.00 ms, beyond noise: the step-time ranges do not overlap" in table

    comparison = compare.compare_runs(inspection.inspect_run(a), inspection.inspect_run(overlapping))
    assert comparison["step_ms_range"]["b"] == {"min": pytest.approx(11.5), "max": pytest.approx(22)}
    assert comparison["step_ms_range"]["within_noise"] is True
    compare.print_comparison(comparison, top=3)
    table = capsys.readouterr().out
    assert "overlap" in table and "step time: within noise: the step-time ranges overlap" in table


# One run's traces as `train --profile --profile-repeat 2` writes them, through the same profiler: two
# recording cycles of two steps, so two files of worker rank0.
RECORD = """
import sys
from pathlib import Path

import torch

from lenet_dist.profiling.capture import step_profiler

with step_profiler(Path(sys.argv[1]), "rank0", wait=1, warmup=1, active=2, repeat=2, with_flops=False) as profiler:
    for _ in range(8):
        torch.randn(32, 32) @ torch.randn(32, 32)
        profiler.step()
"""


@pytest.fixture(scope="module")
def rerun_folder(tmp_path_factory) -> tuple[Path, Path]:
    """Real traces of a run and of its re-run, recorded into one folder; and a copy of the folder as the first
    run left it."""
    root = tmp_path_factory.mktemp("reruns")
    shared, first = root / "shared", root / "first-run"
    for attempt in ("first", "rerun"):
        recorded = call([sys.executable, "-c", RECORD, str(shared)], timeout=300)
        assert recorded.returncode == 0, recorded.stderr[-2000:]
        if attempt == "first":
            shutil.copytree(shared, first)
    return shared, first


def test_one_run_with_two_recording_cycles_is_not_mixed(rerun_folder):
    _, first = rerun_folder
    report = inspection.inspect_run(first)
    assert len(report["workers"]["rank0"]["files"]) == 2 and report["workers"]["rank0"]["recordings"] == 1
    assert report["mixed_runs"] == {} and inspection.mixed_runs_warning(report) is None


def test_inspect_warns_when_a_folder_mixes_runs(rerun_folder):
    shared, _ = rerun_folder
    shown = call([*INSPECT, str(shared), "--json", "-"], timeout=120)
    assert shown.returncode == 0, shown.stderr
    (warning,) = shown.stderr.strip().splitlines()
    assert warning.startswith(f"warning: {shared} mixes runs") and "rank0: 2 recordings (2 processes: pid " in warning
    report = json.loads(shown.stdout)  # the warning leaves --json - as JSON
    assert report["workers"]["rank0"]["steps"] == 8 and report["workers"]["rank0"]["recordings"] == 2
    mixed = report["mixed_runs"]["rank0"]
    assert mixed["recordings"] == 2 and "2 processes" in mixed["found"] and "recorded 2 times" in mixed["found"]


def test_either_sign_alone_tells_two_runs_apart(rerun_folder, tmp_path):
    """A re-run that got the first run's pid (a container's) shows by its repeated step numbers; a re-run with
    another schedule (other steps) by its pid."""
    shared, first = rerun_folder
    rerun_files = sorted({path.name for path in shared.iterdir()} - {path.name for path in first.iterdir()})
    first_pid = traces.load_trace(next(first.iterdir())).process
    rerun_pid = traces.load_trace(shared / rerun_files[0]).process

    def mixed_after(name: str, edit) -> dict:
        folder = tmp_path / name
        shutil.copytree(shared, folder)
        for file in rerun_files:
            trace = json.loads((folder / file).read_text())
            trace["traceEvents"] = [edit(event) for event in trace["traceEvents"]]
            (folder / file).write_text(json.dumps(trace))
        return inspection.inspect_run(folder)["mixed_runs"]["rank0"]

    def pid(text: str) -> int:
        return int(text.split()[1])

    same_pid = mixed_after("same-pid", lambda e: {**e, "pid": pid(first_pid)} if e.get("pid") == pid(rerun_pid) else e)
    assert same_pid["recordings"] == 2
    assert "recorded 2 times" in same_pid["found"] and "processes" not in same_pid["found"]

    def later_steps(event: dict) -> dict:
        name = event.get("name", "")
        if not name.startswith("ProfilerStep#"):
            return event
        return {**event, "name": f"ProfilerStep#{int(name.removeprefix('ProfilerStep#')) + 100}"}

    other_steps = mixed_after("other-steps", later_steps)
    assert other_steps["recordings"] == 2
    assert "2 processes" in other_steps["found"] and "recorded" not in other_steps["found"]
