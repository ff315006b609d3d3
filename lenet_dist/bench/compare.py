"""`lenet-dist bench compare A.json B.json …`: saved benchmark results side by side, matched row by row.

Rows match on (device, pipeline, precision, compile, batch); each file is a column labelled by its
machine, with the ratio of its training images/s to the first file's. Rows that are not in every
file are listed apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lenet_dist.config import CompareConfig
from lenet_dist.errors import UserError
from lenet_dist.files import write_atomically, write_json

KEY = ("device", "pipeline", "precision", "compile", "batch_size")
SCHEMA = "lenet-dist-bench/3"  # what suite.py writes; here so that comparing imports no torch
READABLE = ("lenet-dist-bench/2", SCHEMA)  # 3 added sections; the rows compare matches are unchanged


def load_result(path: Path) -> dict[str, Any]:
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not JSON"
        raise UserError(f"{path}: cannot read it ({reason}); pass a file written by lenet-dist bench --json") from None
    schema = result.get("schema") if isinstance(result, dict) else None
    if schema is None:
        if isinstance(result, dict) and "rows" in result and "machine" in result:
            raise UserError(f"{path}: a bench result from an older schema (before {SCHEMA}); re-run lenet-dist bench")
        raise UserError(f"{path}: not a lenet-dist bench result; pass a file written by lenet-dist bench --json")
    if schema not in READABLE:
        raise UserError(f"{path}: bench schema {schema}, this lenet-dist reads {', '.join(READABLE)}; re-run "
                        "lenet-dist bench")
    return result


def compare(results: list[dict[str, Any]]) -> dict[str, Any]:
    tables = [{tuple(row[key] for key in KEY): row for row in result["rows"]} for result in results]
    matched = [key for key in tables[0] if all(key in table for table in tables[1:])]
    rows = []
    for key in matched:
        rates = [table[key]["train_images_per_second"] for table in tables]
        rows.append({**dict(zip(KEY, key, strict=True)), "train_images_per_second": rates,
                     "ratio": [rate / rates[0] for rate in rates]})
    unmatched = [{"file": index, **dict(zip(KEY, key, strict=True))}
                 for index, table in enumerate(tables) for key in table if key not in matched]
    return {"machines": [f"{label(result['machine'])}, commit {result['machine'].get('commit') or 'not a checkout'}, "
                         f"{result['date'][:10]}" for result in results], "rows": rows,
            "unmatched": unmatched}


def label(machine: dict[str, Any]) -> str:
    """One line naming a machine: `Intel Xeon … (AMX, 2 cores), torch 2.14.1` and its GPU if any."""
    gpus = f", {machine['gpus'][0]}" if machine.get("gpus") else ""
    count = machine["usable_cores"]
    cores = f"{machine['isa']}, {count} core{'' if count == 1 else 's'}"
    return f"{machine['cpu']} ({cores}){gpus}, torch {machine['versions']['torch']}"


def run(config: CompareConfig) -> dict[str, Any]:
    paths = [Path(name) for name in config.results]
    comparison = {"files": [str(path) for path in paths], **compare([load_result(path) for path in paths])}
    show(comparison)
    if config.json:
        print(f"wrote {write_json(Path(config.json), comparison)}")
    if config.chart:
        print(f"wrote {chart(comparison, Path(config.chart))}")
    return comparison


def show(comparison: dict[str, Any]) -> None:
    from rich.table import Table

    from lenet_dist.console import wide_console

    out = wide_console(200)
    for index, (path, machine) in enumerate(zip(comparison["files"], comparison["machines"], strict=True)):
        out.print(f"[{index + 1}] {path}: {machine}")
    table = Table(title="training images/s; × = ratio to [1]")
    for column in ("device", "pipeline", "precision", "compile", "batch"):
        table.add_column(column)
    for index in range(len(comparison["files"])):
        table.add_column(f"[{index + 1}] img/s", justify="right")
        if index:
            table.add_column(f"[{index + 1}] ×", justify="right")
    for row in comparison["rows"]:
        cells = [f"{row['train_images_per_second'][0]:,.0f}"]
        for rate, ratio in zip(row["train_images_per_second"][1:], row["ratio"][1:], strict=True):
            cells += [f"{rate:,.0f}", f"{ratio:.2f}"]
        table.add_row(*(str(row[key]) for key in KEY), *cells)
    out.print(table)
    for row in comparison["unmatched"]:
        out.print(f"only in [{row['file'] + 1}]: " + " ".join(str(row[key]) for key in KEY))


def chart(comparison: dict[str, Any], path: Path) -> Path:
    figure = comparison_figure(comparison)
    return write_atomically(path, lambda partial: figure.savefig(partial, dpi=110, format="png"))


def comparison_figure(comparison: dict[str, Any]):
    """One bar per file and row, from zero (their lengths are the ratios); the legend names each file's machine."""
    from matplotlib.figure import Figure

    rows, files = comparison["rows"], comparison["files"]
    figure = Figure(figsize=(9, 0.35 * len(rows) * len(files) + 1.5), layout="constrained")
    axes = figure.subplots()
    height = 0.8 / len(files)
    for index in range(len(files)):
        axes.barh([position + index * height for position in range(len(rows))],
                  [row["train_images_per_second"][index] for row in rows], height=height,
                  label=f"[{index + 1}] {comparison['machines'][index]}")
    axes.set_yticks([position + 0.4 - height / 2 for position in range(len(rows))],
                    [" ".join(str(row[key]) for key in KEY) for row in rows], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0, 1.1 * max(rate for row in rows for rate in row["train_images_per_second"]))
    axes.set_xlabel("training images/s")
    figure.legend(fontsize=7, loc="outside lower center")
    return figure
