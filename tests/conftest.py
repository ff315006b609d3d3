from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Subprocesses find the data the way CI does; default to the shared checkout beside the repository.
os.environ.setdefault("LENET_DATA_DIR", str(ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ["LENET_DATA_DIR"]).resolve()
    if not (path / "MNIST" / "raw" / "t10k-images-idx3-ubyte").is_file():
        pytest.fail(f"real MNIST is needed at {path}; set LENET_DATA_DIR")
    return path


def run(
    command: list[str], *, timeout: float = 600, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    """Run a real process from the repository root (or a copy of it), as a user would."""
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


FIGURES = ("predictions.png", "training_curves.png", "confusion_matrix.png", "confident_mistakes.png")
RUN_FILES = ("checkpoints", "config.json", "metrics.json", "model.safetensors", *FIGURES)


def read_metrics(output_dir: Path) -> dict:
    return json.loads((output_dir / "metrics.json").read_text())


def assert_png(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    with Image.open(path) as image:
        image.verify()
