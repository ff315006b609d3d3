"""How many training images `lenet-dist train` needs to reach 98 % test accuracy, over recipes and seeds.

Each candidate is a set of flags on top of `--recipe fast-to-98`, trained by the product itself (train(), in
this process) with its own evaluation trigger, so "images to 98 %" is what a user's run reports. One line
of JSON per run, then a line per candidate: its median images over the seeds and how many reached 98 %.

    python scripts/recipe_search.py --stage muon --seeds 0,1,2,3,4 > muon.jsonl
    python scripts/recipe_search.py --stage adam --seeds 0,1,2,3,4 > adam.jsonl
    python scripts/recipe_search.py --stage seconds --seeds 0,1,2,3,4 > seconds.jsonl

The seconds stage picks by what a user waits for: the candidate with the fewest median seconds to 98 % among
those whose every seed reached it within the first epoch, in a median of at most 30,000 images (its last line).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lenet_dist import cadence  # noqa: E402
from lenet_dist.config import TrainConfig  # noqa: E402
from lenet_dist.train import train  # noqa: E402


def candidates(stage: str) -> list[dict[str, Any]]:
    if stage == "adam":  # the Adam recipe and its batch-size neighbours, for the record
        return [{"optimizer": "adam", "batch_size": batch} for batch in (32, 64)]
    if stage == "muon-fine":  # around the best of the first stage: batch 64, Muon at 0.02, LeCun's init
        return [{"optimizer": "muon", "batch_size": batch, "muon_lr": muon_lr, "init": "lecun"}
                for batch, muon_lr in ((64, 0.01), (64, 0.015), (32, 0.01), (32, 0.015), (48, 0.015), (48, 0.02))]
    if stage == "window":  # the best of muon-fine, for trying the trigger's --window
        return [{"optimizer": "muon", "batch_size": batch, "muon_lr": muon_lr, "init": "lecun"}
                for batch, muon_lr in ((32, 0.01), (32, 0.015), (64, 0.01), (64, 0.015))]
    if stage == "seconds":  # batch against Muon's rate, LeCun's init, the committed trigger window
        return [{"optimizer": "muon", "batch_size": batch, "muon_lr": muon_lr, "init": "lecun"}
                for batch, muon_lr in itertools.product((32, 64, 128), (0.01, 0.015, 0.02))]
    grid = itertools.product((32, 64, 128), (0.02, 0.04), ("lecun", "pytorch"))
    return [{"optimizer": "muon", "batch_size": batch, "muon_lr": muon_lr, "init": init}
            for batch, muon_lr, init in grid]


def images_to_98(flags: dict[str, Any], seed: int, data_dir: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()):
        metrics = train(TrainConfig(recipe="fast-to-98", seed=seed, data_dir=data_dir, progress=False,
                                    output_dir=f"{folder}/run", **flags))
    reached = metrics["reached_target"]
    return {**flags, "seed": seed, "images": reached["images"] if reached else None,
            "seconds": reached["elapsed_seconds"] if reached else None,
            "eval_share": metrics["eval_seconds"] / (metrics["train_seconds"] + metrics["eval_seconds"]),
            "evaluations": len(metrics["evaluations"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("muon", "muon-fine", "window", "adam", "seconds"), default="muon")
    parser.add_argument("--window", type=int, default=None,
                        help="the trigger's window of recent training images (cadence.PROGRESSIVE_IMAGES) to try")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    if args.window:
        cadence.PROGRESSIVE_IMAGES = cadence.EVALUATION_GAP_IMAGES = args.window
    summaries = []
    for flags in candidates(args.stage):
        runs = [images_to_98(flags, seed, args.data_dir) for seed in seeds]
        for run in runs:
            print(json.dumps(run), flush=True)
        reached = [run["images"] for run in runs if run["images"] is not None]
        summaries.append({"candidate": flags, "window": cadence.PROGRESSIVE_IMAGES,
                          "reached": f"{len(reached)}/{len(runs)}",
                          "median_images": statistics.median(reached) if len(reached) == len(runs) else None,
                          "median_seconds": statistics.median(run["seconds"] or float("inf") for run in runs),
                          "max_eval_share": max(run["eval_share"] for run in runs)})
        print(json.dumps(summaries[-1]), flush=True)
    if args.stage == "seconds":
        eligible = [summary for summary in summaries
                    if summary["median_images"] is not None and summary["median_images"] <= 30_000]
        best = min(eligible, key=lambda summary: summary["median_seconds"], default=None)
        print(json.dumps({"fastest": best["candidate"] if best else None,
                          "median_seconds": best["median_seconds"] if best else None}), flush=True)


if __name__ == "__main__":
    main()
