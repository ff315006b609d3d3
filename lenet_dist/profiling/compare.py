"""`lenet-dist inspect A B`: run B's traces against run A's, per operator and per figure, with a noise verdict."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any


def _change(a: float, b: float) -> dict[str, float | None]:
    return {"a": a, "b": b, "change": b - a, "ratio": b / a if a else None}


def compare_runs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Run B against run A, each side's figures the mean over its ranks so that runs with different process
    counts compare per rank (an operator a rank never ran counts 0 there)."""

    def mean(report: dict[str, Any], figure: Callable[[dict[str, Any]], float]) -> float:
        return statistics.fmean(figure(worker) for worker in report["workers"].values())

    def self_ms(name: str) -> Callable[[dict[str, Any]], float]:
        return lambda worker: worker["self_ms_per_step"].get(name, 0.0)

    names = {name for report in (a, b) for worker in report["workers"].values() for name in worker["self_ms_per_step"]}
    operators = [{"name": name, **_change(mean(a, self_ms(name)), mean(b, self_ms(name)))} for name in names]
    figures: dict[str, Callable[[dict[str, Any]], float]] = {
        "step_ms_median": lambda w: w["step_ms"]["median"],
        "conv_share": lambda w: w["conv_share"],
    }
    if all("gpu" in worker for report in (a, b) for worker in report["workers"].values()):
        figures |= {"gpu_busy_share": lambda w: w["gpu"]["busy_share"],
                    "kernel_ms_per_step": lambda w: w["gpu"]["kernel_ms_per_step"]}
    a_range, b_range = step_ms_range(a), step_ms_range(b)
    return {
        "run_dirs": [a["run_dir"], b["run_dir"]],
        "ranks": [len(a["workers"]), len(b["workers"])],
        "mixed_runs": [a["mixed_runs"], b["mixed_runs"]],
        "self_ms_per_step": sorted(operators, key=lambda row: (-abs(row["change"]), row["name"])),
        "figures": {key: _change(mean(a, figure), mean(b, figure)) for key, figure in figures.items()},
        "step_ms_range": {
            "a": a_range, "b": b_range,
            # a step-time median that moved less than the steps themselves vary is not a measured change
            "within_noise": a_range["min"] <= b_range["max"] and b_range["min"] <= a_range["max"],
        },
    }


def step_ms_range(report: dict[str, Any]) -> dict[str, float]:
    """The shortest and the longest step of any rank, the spread a change in the median is held against
    (a straggler's slow steps count as noise)."""
    workers = report["workers"].values()
    return {"min": min(w["step_ms"]["min"] for w in workers), "max": max(w["step_ms"]["max"] for w in workers)}


def noise_verdict(comparison: dict[str, Any]) -> str:
    """Whether B's step time differs from A's by more than their steps vary, in words."""
    spread = comparison["step_ms_range"]
    if spread["within_noise"]:
        return "step time: within noise: the step-time ranges overlap"
    change = comparison["figures"]["step_ms_median"]["change"]
    return f"step time: B−A {change:+.2f} ms, beyond noise: the step-time ranges do not overlap"


def print_comparison(comparison: dict[str, Any], top: int) -> None:
    from rich.table import Table

    from lenet_dist.console import wide_console

    console = wide_console(100 + 14 * 4)
    (a, b), (a_ranks, b_ranks) = comparison["run_dirs"], comparison["ranks"]
    spread = comparison["step_ms_range"]
    console.print(f"A: [bold]{a}[/bold] ({a_ranks} rank(s))\nB: [bold]{b}[/bold] ({b_ranks} rank(s))")

    def ratio(row: dict[str, Any]) -> str:
        return "–" if row["ratio"] is None else f"{row['ratio']:.2f}×"

    ops = Table(title=f"self time per step (ms, mean over ranks), top {top} by change")
    for column in ("operator", "A", "B", "B−A", "B/A"):
        ops.add_column(column, justify="left" if column == "operator" else "right")
    for row in comparison["self_ms_per_step"][:top]:
        ops.add_row(row["name"], f"{row['a']:.3f}", f"{row['b']:.3f}", f"{row['change']:+.3f}", ratio(row))
    console.print(ops)

    figures = Table(title="steps (mean over ranks)")
    for column in ("", "A", "B", "B−A", "B/A"):
        figures.add_column(column, justify="left" if not column else "right")
    labels = {"step_ms_median": "step ms (median)", "conv_share": "conv fwd+bwd share",
              "gpu_busy_share": "GPU busy", "kernel_ms_per_step": "kernel ms per step"}
    for key, row in comparison["figures"].items():
        if key.endswith("share"):  # a share's change is in percentage points
            cells = (f"{row['a']:.1%}", f"{row['b']:.1%}", f"{100 * row['change']:+.1f} pp")
        else:
            cells = (f"{row['a']:.2f}", f"{row['b']:.2f}", f"{row['change']:+.2f}")
        figures.add_row(labels[key], *cells, ratio(row))
        if key == "step_ms_median":
            ranges = (f"{spread[side]['min']:.2f} / {spread[side]['max']:.2f}" for side in ("a", "b"))
            figures.add_row("step ms (min / max, all ranks)", *ranges, "overlap" if spread["within_noise"] else "apart",
                            "")
    console.print(figures)
    console.print(noise_verdict(comparison))
