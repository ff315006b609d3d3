"""What syncing to disk adds to one checkpoint: a checkpoint's three files (a trained LeNet-5's weights, Adam's
state, a 2-epoch run's progress) written as save_checkpoint writes them, with and without the fsyncs (the files,
the folder, and the parent after the rename), alternating, 15 rounds each; the medians.

    python scripts/checkpoint_sync_cost.py [FOLDER]    # FOLDER: on the disk to measure (default: a temp folder here)
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lenet_dist.cadence import RunState  # noqa: E402
from lenet_dist.config import TrainConfig  # noqa: E402
from lenet_dist.files import fsync_folder  # noqa: E402
from lenet_dist.recipe.build import build_model, build_optimizer  # noqa: E402

ROUNDS = 15


def write_checkpoint(root: Path, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     progress: RunState, synced: bool) -> float:
    started = time.perf_counter()
    folder = root / f".{name}.partial"
    folder.mkdir()
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(folder / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict()}, folder / "training_state.pt")
    (folder / "progress.json").write_text(json.dumps(asdict(progress), indent=2) + "\n")
    if synced:
        fsync_folder(folder)
    folder.rename(root / name)
    if synced:
        fsync_folder(root, files=False)
    return time.perf_counter() - started


def main() -> None:
    config = TrainConfig(batch_size=128)
    model = build_model(config, num_classes=10)
    optimizer = build_optimizer(config, model)
    model(torch.zeros(8, 1, 28, 28)).sum().backward()
    optimizer.step()
    progress = RunState(train_log=[{"step": step, "epoch": 1 + step // 468, "images": step * 128, "loss": 0.1,
                                    "lr": 1e-3} for step in range(10, 937, 10)])
    root = Path(tempfile.mkdtemp(dir=sys.argv[1] if len(sys.argv) > 1 else ".", prefix="sync-cost-"))
    seconds: dict[bool, list[float]] = {False: [], True: []}
    try:
        for index in range(ROUNDS):
            for synced in (False, True):
                seconds[synced].append(write_checkpoint(root, f"step-{index}-{synced}", model, optimizer, progress,
                                                        synced))
        size = sum(path.stat().st_size for path in (root / "step-0-True").iterdir())
    finally:
        shutil.rmtree(root)
    plain, synced = (statistics.median(seconds[flag]) * 1e3 for flag in (False, True))
    print(f"a checkpoint of {size / 1e3:,.0f} kB: {plain:.1f} ms written, {synced:.1f} ms written and synced "
          f"(+{synced - plain:.1f} ms), medians of {ROUNDS} alternating rounds")


if __name__ == "__main__":
    main()
