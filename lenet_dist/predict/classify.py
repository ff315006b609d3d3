"""`lenet-dist predict --model RUN_DIR IMAGE...`: classify your own images with a trained run.

`--model` takes a run's output dir or one of its checkpoints. An unreadable file is one `error: <path>: <what>;
<what to do>` line on stderr (with --json also a {"file", "error"} object on stdout), and the rest are still
classified. A reader that stops early (`| head -1`) ends the run quietly with SIGPIPE's status, 141.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from lenet_dist.checkpoint import PROGRESS_FILE, load_model
from lenet_dist.config import PredictConfig
from lenet_dist.data import DATASETS, normalize
from lenet_dist.errors import UsageError, UserError, quiet_after_reader_gone
from lenet_dist.files import write_atomically
from lenet_dist.model import LeNet5
from lenet_dist.predict.frames import to_frame

SAVED_INPUT_SUFFIX = ".28x28.png"  # --save-inputs: digit.jpg → digit.jpg.28x28.png, never an input's own name


@torch.no_grad()
def classify(model: torch.nn.Module, frame: torch.Tensor, dataset: str, top: int) -> list[tuple[str, float]]:
    info = DATASETS[dataset]
    probabilities = model(normalize(frame.unsqueeze(0), info)).softmax(dim=1)[0]
    values, classes = probabilities.topk(top)
    return [(info.classes[c], float(v)) for c, v in zip(classes.tolist(), values.tolist(), strict=True)]


def load_trained(model_path: Path) -> tuple[LeNet5, str]:
    """The model and its data set: from the exported weights' config, else from a checkpoint's progress.json."""
    if not model_path.exists():
        raise UsageError(f"--model {model_path}: does not exist; pass a training run's output dir (or one of its "
                         "checkpoints)")
    model, metadata = load_model(model_path)
    dataset = metadata.get("config", {}).get("dataset")
    progress = (model_path if model_path.is_dir() else model_path.parent) / PROGRESS_FILE
    if dataset is None and progress.is_file():
        try:
            dataset = json.loads(progress.read_text())["trajectory"]["dataset"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UserError(f"{progress}: unreadable ({type(error).__name__}); pass the run's output dir, or another "
                            "checkpoint") from None
    return model, dataset or "mnist"  # weights saved with neither: MNIST, the default data set


def _prepare_folder(folder: Path) -> Path:
    """--save-inputs' folder, made now, so that an unusable one is refused before any image is read."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = "a file is in the way" if isinstance(error, (FileExistsError, NotADirectoryError)) else error.strerror
        raise UserError(f"--save-inputs {folder}: cannot make the folder ({reason}); choose another folder") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"--save-inputs {folder}: not writable; make it writable (chmod u+w) or choose another folder")
    return folder


def _saved_input_path(folder: Path, image: Path, taken: set[Path]) -> Path:
    """<folder>/<image's name>.28x28.png, numbered (-2, -3, …) to avoid `taken`: this run's images and names so far."""
    target, number = folder / (image.name + SAVED_INPUT_SUFFIX), 1
    while target.resolve() in taken:
        number += 1
        target = folder / f"{image.name}-{number}{SAVED_INPUT_SUFFIX}"
    taken.add(target.resolve())
    return target


SHADES = " .:-=+*#%@"  # --explain: a frame pixel's brightness, 0 to 255, as one of ten characters


def ascii_frame(frame: torch.Tensor) -> str:
    """The frame as text, two characters a pixel (a terminal cell is about twice as tall as wide), framed."""
    rows = ("".join(SHADES[value * len(SHADES) // 256] * 2 for value in row) for row in frame.tolist())
    edge = "+" + "-" * 2 * frame.shape[1] + "+"
    return "\n".join([edge, *(f"|{row}|" for row in rows), edge])


def _save_frame(frame: torch.Tensor, path: Path) -> Path:
    from PIL import Image

    return write_atomically(path, lambda partial: Image.fromarray(frame.numpy()).save(partial, "PNG"))


def run(config: PredictConfig) -> int:
    """Classify every file; report unreadable ones and carry on. Returns the exit status."""
    model, dataset = load_trained(Path(config.model))
    folder = _prepare_folder(Path(config.save_inputs)) if config.save_inputs else None
    taken = {Path(name).resolve() for name in config.images}
    failures = 0
    try:
        for name in config.images:
            try:
                frame = to_frame(Path(name), dataset)
            except UserError as error:
                print(f"error: {error}", file=sys.stderr, flush=True)
                if config.json:  # a reader of stdout alone sees every file too
                    print(json.dumps({"file": name, "error": str(error)}), flush=True)
                failures += 1
                continue
            ranked = classify(model, frame, dataset, min(config.top, model.num_classes))
            saved = _save_frame(frame, _saved_input_path(folder, Path(name), taken)) if folder else None
            # flushed line by line: a reader sees each answer as it comes, and a closed pipe is noticed here
            if config.json:
                answer = {"file": name, "prediction": ranked[0][0],
                          "top": [{"class": c, "probability": p} for c, p in ranked]}
                answer |= {"saved_input": str(saved)} if saved else {}
                print(json.dumps(answer | ({"frame": frame.tolist()} if config.explain else {})), flush=True)
            else:
                print(f"{name}: {ranked[0][0]}   top-{len(ranked)}: " + ", ".join(f"{c} {p:.1%}" for c, p in ranked),
                      flush=True)
                if config.explain:
                    print(ascii_frame(frame), flush=True)
    except BrokenPipeError:  # the reader stopped: quietly, 141, as every lenet-dist command
        return quiet_after_reader_gone()
    return 1 if failures else 0
