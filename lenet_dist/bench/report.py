"""The benchmark's result on the terminal, as JSON and as charts."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from lenet_dist.bench.compare import label
from lenet_dist.bench.measure import Cell, Throughput
from lenet_dist.files import write_atomically, write_json


def row_line(cell: Cell, measured: Throughput) -> str:
    return (f"{cell.label():<34} train {measured.train_images_per_second:>12,.0f}/s  "
            f"infer {measured.inference_images_per_second:>12,.0f}/s")


def show(result: dict[str, Any]) -> None:
    from rich.table import Table

    from lenet_dist.console import wide_console

    out = wide_console(160)
    table = Table(title=f"lenet-dist bench: {label(result['machine'])}")
    for column in ("device", "pipeline", "precision", "compile", "batch", "train img/s", "infer img/s", "MFU %",
                   "× original"):
        table.add_column(column, justify="right")
    for row in result["rows"]:
        speedup = row["speedup_vs_original"]
        table.add_row(row["device"], row["pipeline"], row["precision"], row["compile"], str(row["batch_size"]),
                      f"{row['train_images_per_second']:,.0f}", f"{row['inference_images_per_second']:,.0f}",
                      f"{row['mfu_percent']:.1f}", "" if speedup is None else f"{speedup:.2f}")
    out.print(table)
    if noise := noise_line(result["rows"]):
        out.print(noise, highlight=False)
    out.print("MFU %: training FLOP/s (torch's flop counter × images/s) over the dense matmul rate measured here in "
              "the same precision: " + ", ".join(f"{key} {peak['flops_per_second'] / 1e9:,.0f} GFLOP/s "
                                                 f"({peak['precision']}, {peak['matmul']})"
                                                 for key, peak in result["peak_matmul"].items()), highlight=False)
    for device, timings in (result.get("runs") or {}).items():
        for line in run_lines(device, timings):
            out.print(line, highlight=False)
    for row in (result.get("loop") or {}).get("rows", []):
        compiled = row.get("bare_compiled_images_per_second")
        bare = (f"{row['bare_images_per_second']:,.0f} eager and {compiled:,.0f} compiled: "
                f"{row['ours_over_best_bare']:.0%} of the better one" if compiled is not None else
                f"{row['bare_images_per_second']:,.0f} eager (and compiled when --compile-modes has compile): "
                f"{row['ours_over_best_bare']:.0%} of it")
        out.print(f"cpu, batch {row['batch_size']}: lenet-dist train's loop {row['ours_images_per_second']:,.0f} "
                  f"images/s, the bare loop {bare}", highlight=False)
    if result.get("scaling"):
        out.print(scaling_table(result["scaling"]))


NOISY_SPREAD = 0.10  # timings of one row further apart than this: the machine did other work meanwhile


def noise_line(rows: list[dict[str, Any]]) -> str | None:
    """One line when rows' own timings disagree (a loaded machine): their ratios, the × original column among them,
    are then not to be trusted."""
    noisy = [row for row in rows if (row.get("train_spread") or 0) > NOISY_SPREAD]
    if not noisy:
        return None
    worst = max(noisy, key=lambda row: row["train_spread"])
    where = "rounds" if len(worst.get("train_images_per_second_rounds", [])) > 1 else "timed windows"
    return (f"noisy: in {len(noisy)} of {len(rows)} rows the {where} disagree by more than {NOISY_SPREAD:.0%} (up to "
            f"{worst['train_spread']:.0%}: {worst['device']} {worst['pipeline']} batch {worst['batch_size']}); the "
            "machine was busy, so compare rows with care; rerun on an idle machine, or with more --rounds")


def run_lines(device: str, timings: dict[str, Any]) -> list[str]:
    original = timings["original"]
    lines = [f"{device}: the original script, {len(original['runs'])} run(s): whole process "
             f"{original['wall_seconds']:.1f} s, {_percent(original['final_test_accuracy'])} after 2 epochs, time "
             f"to 98% {_seconds(original['time_to_98'])} after {_images(original['images'])}"]
    for count in sorted(int(key.split("_")[0]) for key in timings if key.endswith("_process")):
        default, fast = timings[f"{count}_process"]["default"], timings[f"{count}_process"]["fast_to_98"]
        seeds = len(default["runs"])
        lines.append(
            f"{device}, {count} process(es), default 2-epoch run over {seeds} seeds: test accuracy median "
            f"{_percent(default['final_test_accuracy'])} ({_spread(default, 'final_test_accuracy', _percent)}); "
            f"whole process (the median run, seed {default['median_seed']}) {default['wall_seconds']:.1f} s = "
            f"training {default['train_seconds']:.1f} s + "
            f"evaluation {default['eval_seconds']:.1f} s + fixed overhead {default['overhead_seconds']:.1f} s"
            + (f"; {original['wall_seconds'] / default['wall_seconds']:.2f}× faster than the original script"
               if count == 1 else ""))
        within = sum(run["first_epoch"] for run in fast["runs"])
        ratio = (f"; {original['time_to_98'] / fast['time_to_98']:.1f}× shorter than the original script's"
                 if count == 1 and original["time_to_98"] and fast["time_to_98"] else "")
        lines.append(
            f"{device}, {count} process(es), --recipe fast-to-98 over {len(fast['runs'])} seeds: time to 98% median "
            f"{_seconds(fast['time_to_98'])} ({_spread(fast, 'time_to_98', _seconds)}), images median "
            f"{_images(fast['images'])} ({_spread(fast, 'images', _images)}), {fast['misses']} missed, "
            f"{within}/{len(fast['runs'])} within the first epoch, evaluation "
            f"{statistics.median(run['eval_share'] for run in fast['runs']):.0%} of the time{ratio}")
    compiled = timings.get("compile")
    if compiled:
        lines.append(f"{device}: --compile spends {compiled['cold_seconds']:.1f} s compiling with an empty inductor "
                     f"cache, {compiled['warm_seconds']:.1f} s with a warm one; epoch images/s eager "
                     f"{compiled['runs']['eager']['train_images_per_second']:,.0f}, compiled "
                     f"{compiled['runs']['warm']['train_images_per_second']:,.0f}")
    return lines


def _spread(group: dict[str, Any], key: str, show) -> str:
    return " / ".join(show(run[key]) for run in group["runs"])


def _images(value: float | None) -> str:
    return "not reached" if value is None else f"{value:,.0f} images"


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{value:.2%}"


def _seconds(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.2f} s"


def scaling_table(scaling: dict[str, Any]):
    from rich.table import Table

    threads = scaling["threads_per_process"]
    table = Table(title=f"scaling on {scaling['device']}" + (f", {threads} thread(s) per process" if threads else ""))
    for column in ("scaling", "processes", "global batch", "train img/s", "step ms", "efficiency"):
        table.add_column(column, justify="right")
    for row in scaling["rows"]:
        table.add_row(row["mode"], str(row["processes"]), str(row["global_batch"]),
                      f"{row['train_images_per_second']:,.0f}", f"{row['step_ms']:.2f}",
                      "" if row["efficiency"] is None else f"{row['efficiency']:.0%}")
    return table


def save(result: dict[str, Any], json_path: str | None, chart_path: str | None) -> None:
    if json_path:
        print(f"wrote {write_json(Path(json_path), result)}")
    if chart_path:
        print(f"wrote {write_png(throughput_figure(result), Path(chart_path))}")
        if result.get("scaling"):
            path = Path(chart_path)
            print(f"wrote {write_png(scaling_figure(result), path.with_name(path.stem + '-scaling' + path.suffix))}")


PIPELINES = {"original": ("tab:gray", "the original script's pipeline"), "tuned": ("tab:blue", "lenet-dist's pipeline")}


def chart_title(what: str, result: dict[str, Any]) -> str:
    """What a chart shows, on which machine, from which commit, when: a chart read without its JSON still says."""
    machine = result["machine"]
    return f"{what}\n{label(machine)}, commit {machine.get('commit') or 'not a checkout'}, {result['date'][:10]}"


def throughput_figure(result: dict[str, Any]):
    """Bars from zero (their lengths are the ratios), each labelled with its rate; the legend names only the
    pipelines drawn."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = result["rows"]
    labels = [Cell(**{key: row[key] for key in Cell.__dataclass_fields__}).label() for row in rows]
    rates = [row["train_images_per_second"] for row in rows]
    figure = Figure(figsize=(9, 0.32 * len(rows) + 1.5), layout="constrained")
    axes = figure.subplots()
    bars = axes.barh(labels, rates, color=[PIPELINES[row["pipeline"]][0] for row in rows])
    axes.bar_label(bars, labels=[f"{rate:,.0f}" for rate in rates], padding=3, fontsize=7)
    axes.set_xlim(0, 1.4 * max(rates))  # room on the right for the rates and the legend
    axes.invert_yaxis()
    axes.set_xlabel("training images/s (median of timed windows)")
    drawn = dict.fromkeys(row["pipeline"] for row in rows)
    axes.legend(handles=[Patch(color=PIPELINES[name][0], label=PIPELINES[name][1]) for name in drawn], fontsize=8,
                loc="lower right")
    axes.set_title(chart_title("LeNet-5 training throughput", result), fontsize=9)
    return figure


def scaling_figure(result: dict[str, Any]):
    from matplotlib.figure import Figure

    scaling = result["scaling"]
    figure = Figure(figsize=(8, 3.8), layout="constrained")
    rate_axis, efficiency_axis = figure.subplots(1, 2)
    for mode, color in (("strong", "tab:blue"), ("weak", "tab:orange")):
        rows = [row for row in scaling["rows"] if row["mode"] == mode]
        counts = [row["processes"] for row in rows]
        rate_axis.plot(counts, [row["train_images_per_second"] for row in rows], marker="o", color=color,
                       label=f"{mode} (global batch {'fixed' if mode == 'strong' else 'grows'})")
        efficiency_axis.plot(counts, [100 * (row["efficiency"] or 0) for row in rows], marker="o", color=color)
    rate_axis.set(xlabel="processes", ylabel="training images/s", title=f"Throughput on {scaling['device']}")
    rate_axis.set_ylim(bottom=0)
    rate_axis.legend(fontsize=8)
    efficiency_axis.axhline(100, color="gray", linestyle=":")
    efficiency_axis.set(xlabel="processes", ylabel="scaling efficiency (%)", title="Efficiency vs. ideal")
    efficiency_axis.set_ylim(bottom=0)
    figure.suptitle(chart_title("LeNet-5 scaling", result), fontsize=9)
    return figure


def write_png(figure, path: Path) -> Path:
    return write_atomically(path, lambda partial: figure.savefig(partial, dpi=110, format="png"))
