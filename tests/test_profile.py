"""The profiler's traces, read back by TensorBoard's own plugin and by `lenet-dist inspect`."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import BIN, SHORT, TRAIN, call, call_with_stdout_closed, one_line_error, read_metrics
from lenet_dist.profiling.capture import no_trace_line, run_trace_dir

# torch_tb_profiler's RunLoader parses each trace in a spawned process, so it runs as its own script.
TB_PLUGIN_LOAD = """
import json, sys
from torch_tb_profiler import io
from torch_tb_profiler.profiler.loader import RunLoader
if __name__ == "__main__":
    loaded = RunLoader("run", sys.argv[1], io.Cache()).load()
    print(json.dumps({f"{w}/{s}": [v.name for v in p.views] for (w, s), p in loaded.profiles.items()}))
"""



@pytest.mark.slow
def test_trace_loads_in_tensorboard_plugin(single_process_profile):
    trace_dir, result = single_process_profile
    assert f"profiler traces (one per rank): {trace_dir}/" in result.stdout
    assert "CPUAllocator" not in result.stderr, result.stderr[-2000:]  # c10's line about blocks made before
    loaded = call([sys.executable, "-c", TB_PLUGIN_LOAD, str(trace_dir)], timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    profiles = json.loads(loaded.stdout.strip().splitlines()[-1])
    # a trace the plugin fails to parse is dropped with a warning, so the worker must be there
    (key,) = profiles
    assert key.startswith("rank0/") and {"overall", "operator", "trace"} <= set(profiles[key])


def test_trace_names_the_conv_hot_path(single_process_profile):
    trace_dir, _ = single_process_profile
    (trace,) = trace_dir.glob("rank0.*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]  # Chrome-trace JSON, as Perfetto opens it
    names = {e.get("name") for e in events}
    for expected in ("conv1", "conv2", "classifier", "optimizer_step", "data_loading",
                     "aten::convolution_backward", "ConvolutionBackward0"):
        assert expected in names
    assert sum(name.startswith("ProfilerStep#") for name in names) == 5  # --profile-active default


def test_inspect_reports_conv_share_and_steps(single_process_profile, tmp_path):
    trace_dir, _ = single_process_profile
    result = call([str(BIN / "lenet-dist"), "inspect", str(trace_dir), "--json", str(tmp_path / "r.json")], timeout=120)
    assert result.returncode == 0, result.stderr
    assert "conv fwd+bwd share" in result.stdout and "aten::convolution_backward" in result.stdout
    report = json.loads((tmp_path / "r.json").read_text())["workers"]["rank0"]
    assert report["steps"] == 5 and report["step_ms"]["min"] > 0
    assert 0.1 < report["conv_share"] < 1
    assert set(report["conv_passes_share"]) == {"conv 1→6 forward", "conv 6→16 forward",
                                                "conv 1→6 backward", "conv 6→16 backward"}
    assert abs(sum(report["conv_passes_share"].values()) - report["conv_share"]) < 1e-9



@pytest.mark.parametrize("flags", [[], ["--json", "-"]], ids=["table", "json"])
def test_inspect_ends_quietly_with_141_when_its_reader_has_gone(flags, single_process_profile, tmp_path):
    """`lenet-dist inspect RUN | head -1`, its reader gone before the first line: quiet, and SIGPIPE's 141."""
    trace_dir, _ = single_process_profile
    _, result = call_with_stdout_closed([str(BIN / "lenet-dist"), "inspect", *flags, str(trace_dir)],
                                        tmp_path / "stdout")
    assert (result.returncode, result.stderr) == (141, "")


def test_a_run_that_ends_before_the_profilers_window_says_so(tmp_path, mnist_sliver):
    """16 steps and a window from step 23: no trace is announced or recorded; the line says which flags fit."""
    output = tmp_path / "run"
    result = call([*TRAIN, *SHORT, "--profile", "--profile-wait", "20", "--profile-dir", str(tmp_path / "profiles"),
                   "--output-dir", str(output)], env={"LENET_DATA_DIR": str(mnist_sliver)})
    assert result.returncode == 0, result.stderr
    assert ("--profile: no trace recorded: the run had 16 steps, and the profiler's window starts at step 23 "
            "(--profile-wait 20 --profile-warmup 2); use --profile-wait 9") in result.stdout
    assert "profiler traces" not in result.stdout and read_metrics(output)["profile_dir"] is None
    assert not run_trace_dir(str(tmp_path / "profiles"), output).exists()
    # shorter runs: the window shrinks to fit
    assert no_trace_line(4, 5, 2, 5).endswith("use --profile-wait 0 --profile-active 2")
    assert no_trace_line(2, 5, 2, 5).endswith("use --profile-wait 0 --profile-warmup 0 --profile-active 2")

def test_inspect_empty_folder_fails_in_one_line(tmp_path):
    one_line_error(call([str(BIN / "lenet-dist"), "inspect", str(tmp_path)], timeout=60), 1, str(tmp_path))


def test_inspect_truncated_trace_fails_in_one_line(single_process_profile, tmp_path):
    trace_dir, _ = single_process_profile
    (trace,) = trace_dir.glob("rank0.*.pt.trace.json")
    broken = tmp_path / trace.name
    broken.write_bytes(trace.read_bytes()[: trace.stat().st_size // 2])
    one_line_error(call([str(BIN / "lenet-dist"), "inspect", str(tmp_path)], timeout=60), 1, str(broken))


def test_a_trace_that_cannot_be_written_is_one_warning_and_training_goes_on(tmp_path, capsys):
    """Written by each rank onto its own disk, so only that rank knows: it says so in one line, and the run (its
    checkpoints, the other ranks) is not stopped for a lost trace."""
    from types import SimpleNamespace

    from lenet_dist.profiling.capture import trace_writer

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    trace_writer(blocked / "traces", "rank1")(SimpleNamespace(export_chrome_trace=lambda path: None))
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"warning: rank1: cannot make {blocked / 'traces'} for its profiler trace") and \
        line.endswith("training goes on")

    def no_space(path: str) -> None:
        raise OSError(28, "No space left on device")

    trace_writer(tmp_path / "traces", "rank0")(SimpleNamespace(export_chrome_trace=no_space))
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("warning: rank0: ") and "No space left on device" in line, line
    assert list((tmp_path / "traces").iterdir()) == []  # no partial file left
