"""`lenet-dist inspect RUN [OTHER]`: where a training step's time goes, per rank, without TensorBoard.

One column per rank, so that a straggler stands out: the operators with the most self time, the
convolutions' share of step time per layer and pass, step times, and the GPU's view for a trace with
kernels. With two runs: B against A (compare.py).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from lenet_dist.config import InspectConfig
from lenet_dist.files import write_json
from lenet_dist.profiling.compare import compare_runs, print_comparison
from lenet_dist.profiling.gpu import print_gpu_report
from lenet_dist.profiling.host import analyse_worker
from lenet_dist.profiling.traces import WHOLE_TRACE, find_traces


def inspect_run(given: Path) -> dict[str, Any]:
    """The report on a run's output folder, a trace folder or one trace file (see find_traces)."""
    traces, files = find_traces(given)
    workers = {worker: analyse_worker(paths) for worker, paths in files.items()}
    return {
        "run_dir": str(given),
        "traces": str(traces),
        "workers": workers,
        # a worker whose files come from several runs (or a resumed one): its figures pool their steps
        "mixed_runs": {worker: {"recordings": result["recordings"], "found": result["recordings_found"]}
                       for worker, result in workers.items() if result["recordings"] > 1},
    }


def mixed_runs_warning(report: dict[str, Any]) -> str | None:
    """One line saying which workers' traces in the report's folder come from several runs, or None."""
    if not report["mixed_runs"]:
        return None
    found = "; ".join(f"{worker}: {mixed['recordings']} recordings ({mixed['found']})"
                      for worker, mixed in report["mixed_runs"].items())
    return (f"warning: {report['traces']} mixes runs (or a run and its resumption), whose steps are pooled here: "
            f"{found}; to read one run, move the other's rank<N>.<ms> files away")


def _title(report: dict[str, Any]) -> str:
    named, traces = report["run_dir"], _as_typed(report["traces"])
    return f"[bold]{named}[/bold]" + (f" (traces: {traces})" if traces != named else "")


def _as_typed(path: str) -> str:
    """A path under the working directory as a user would type it (a run records its trace folder absolute)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


def print_report(report: dict[str, Any], top: int) -> None:
    from rich.table import Table

    from lenet_dist.console import wide_console

    workers = report["workers"]
    console = wide_console(100 + 14 * len(workers))
    ranking: dict[str, float] = defaultdict(float)
    for result in workers.values():
        for name, ms in result["self_ms_per_step"].items():
            ranking[name] += ms
    console.print(f"{_title(report)}: {len(workers)} trace worker(s)")
    if any(r["window"] == WHOLE_TRACE for r in workers.values()):
        console.print(f"profiled window: {WHOLE_TRACE}")
    ops = Table(title=f"self time per step (ms), top {top}")
    ops.add_column("operator")
    for worker in workers:
        ops.add_column(worker, justify="right")
    for name in sorted(ranking, key=ranking.get, reverse=True)[:top]:
        ops.add_row(name, *(f"{r['self_ms_per_step'].get(name, 0):.3f}" for r in workers.values()))
    console.print(ops)

    summary = Table(title="steps and the convolution hot path")
    summary.add_column("")
    for worker in workers:
        summary.add_column(worker, justify="right")
    rows = [
        ("profiled steps", lambda r: str(r["steps"])),
        ("step ms (median)", lambda r: f"{r['step_ms']['median']:.2f}"),
        ("step ms (min / max)", lambda r: f"{r['step_ms']['min']:.2f} / {r['step_ms']['max']:.2f}"),
        ("conv fwd+bwd share", lambda r: f"{r['conv_share']:.1%}"),
    ]
    passes = sorted({name for r in workers.values() for name in r["conv_passes_share"]})
    rows += [(f"  {name}", lambda r, n=name: f"{r['conv_passes_share'].get(n, 0):.1%}") for name in passes]
    for label, cell in rows:
        summary.add_row(label, *(cell(r) for r in workers.values()))
    console.print(summary)
    if any("gpu" in r for r in workers.values()):
        print_gpu_report(console, workers, top)


def run(config: InspectConfig) -> dict[str, Any]:
    reports = [inspect_run(Path(run_dir)) for run_dir in config.run_dirs]
    for warning in filter(None, map(mixed_runs_warning, reports)):
        print(warning, file=sys.stderr, flush=True)  # on stderr, so that `--json -` stays JSON
    report, show = (compare_runs(*reports), print_comparison) if len(reports) == 2 else (reports[0], print_report)
    if config.json == "-":
        print(json.dumps(report, indent=2))
        return report
    show(report, config.top)
    if config.json:
        write_json(Path(config.json), report)
        print(f"wrote {config.json}")
    return report
