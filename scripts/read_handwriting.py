"""How many scanned handwritten digits trained models read through `lenet-dist predict`'s framing.

The digits are tests/handwriting.py's: MNIST *test* digits (no model here trained on them) redrawn with other pens,
slanted, narrowed or widened, scanned on light or grey paper at 200-1000 px. The last PER_CLASS test digits of each
class, in class order, one style each (deterministic). Each scan is written to a file and framed by predict's own
`to_frame`, then every model reads the frames; printed: right answers in all and per class 0-9.

    .venv/bin/python scripts/read_handwriting.py --per-class 20 runs/default runs/predict
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from handwriting import handwritten  # noqa: E402

from lenet_dist.config import resolve_data_dir  # noqa: E402
from lenet_dist.data import DATASETS, load_split, normalize  # noqa: E402
from lenet_dist.errors import UserError  # noqa: E402
from lenet_dist.predict.classify import load_trained  # noqa: E402
from lenet_dist.predict.frames import to_frame  # noqa: E402


def scanned_digits(data_dir: Path, per_class: int) -> tuple[list[torch.Tensor | None], np.ndarray]:
    """predict's frames of the scans (28 × 28, uint8; None where predict refuses one) and their labels."""
    test = load_split(data_dir, "test", "mnist")
    labels = test.labels.numpy()
    chosen = [i for digit in range(10) for i in np.flatnonzero(labels == digit)[::-1][:per_class]]
    frames = []
    with tempfile.TemporaryDirectory() as folder:
        for i, (data, _, style) in enumerate(handwritten(test.images[chosen].numpy())):
            path = Path(folder) / f"{i}.{'jpg' if style.jpeg else 'png'}"
            path.write_bytes(data)
            try:
                frames.append(to_frame(path))
            except UserError:  # predict would print its one line and read nothing: a miss for every model
                frames.append(None)
    return frames, labels[chosen]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="training runs' output dirs (or checkpoint folders)")
    parser.add_argument("--per-class", type=int, default=20, help="scanned digits per class")
    parser.add_argument("--data-dir", help="MNIST folder (default: $LENET_DATA_DIR, else ./data)")
    args = parser.parse_args()
    frames, labels = scanned_digits(resolve_data_dir(args.data_dir), args.per_class)
    framed = [i for i, frame in enumerate(frames) if frame is not None]
    if len(framed) < len(frames):
        print(f"{len(frames) - len(framed)} scan(s) predict could not frame (counted as misses)")
    for model_path in args.models:
        model, _ = load_trained(Path(model_path))
        right = np.zeros(len(frames), dtype=bool)
        with torch.no_grad():
            read = model.eval()(normalize(torch.stack([frames[i] for i in framed]), DATASETS["mnist"])).argmax(1)
        right[framed] = read.numpy() == labels[framed]
        per_class = " ".join(str(int(right[labels == digit].sum())) for digit in range(10))
        print(f"{model_path}: {int(right.sum())}/{len(right)} read; per class 0-9: {per_class}")


if __name__ == "__main__":
    main()
