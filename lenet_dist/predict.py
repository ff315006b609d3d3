"""`lenet-dist predict --model RUN_DIR IMAGE...`: classify your own images with a trained run.

Photos and scans are brought to MNIST's conventions first: grayscale, a light digit on a dark
background (a dark digit on light paper is inverted), the digit's bounding box scaled to fit 20×20
and placed in a 28×28 frame by its centre of mass, as LeCun et al. prepared MNIST.

Every file is treated as hostile until read: a missing file, a folder, an empty, truncated or
animated file, or one too large to decode safely is one `error: <path>: <what>; <what to do>` line
on stderr, and the other files are still classified.
"""

from __future__ import annotations

import json
import stat
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lenet_dist.checkpoint import load_model
from lenet_dist.config import PredictConfig
from lenet_dist.data import DATASETS, normalize
from lenet_dist.errors import UserError

if TYPE_CHECKING:
    from PIL import Image

DIGIT_BOX, FRAME = 20, 28
INK_THRESHOLD = 0.2  # of the image's brightness range: fainter pixels are background
# Checked from the header, before any pixel is decoded (Image.open reads only the header). 40 megapixels
# is over three times a 12-megapixel phone photo and far more than a digit needs, yet reading one adds
# under 1 GB at the peak (measured: ~0.6 GB for RGB, ~0.85 GB with alpha). PIL's own guard starts at ~179.
MAX_MEGAPIXELS = 40
# How PIL opens 16-bit grayscale (and 32-bit integer) files: convert("L") would clip them to white.
WIDE_GRAY_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def to_mnist_frame(path: Path) -> torch.Tensor:
    """An image file as a uint8 28×28 tensor in MNIST's conventions; a UserError says what is wrong with it."""
    from PIL import Image

    gray = read_grayscale(path)  # changed in place below: a 40-megapixel photo's float copies are 160 MB each
    if np.median(gray) > 0.5:  # light background: MNIST has white ink on black
        np.subtract(1, gray, out=gray)
    low, high = gray.min(), gray.max()
    if high - low < 1e-6:
        raise UserError(f"{path}: the image is blank (one flat colour); nothing to classify")
    gray -= low
    gray /= high - low
    ink = gray > INK_THRESHOLD
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    digit = gray[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    scale = DIGIT_BOX / max(digit.shape)
    size = (max(1, round(digit.shape[1] * scale)), max(1, round(digit.shape[0] * scale)))
    resized = np.asarray(
        Image.fromarray((digit * 255).astype(np.uint8)).resize(size, Image.Resampling.LANCZOS), dtype=np.float32
    )
    frame = np.zeros((FRAME, FRAME), dtype=np.float32)
    top, left = (FRAME - resized.shape[0]) // 2, (FRAME - resized.shape[1]) // 2
    frame[top : top + resized.shape[0], left : left + resized.shape[1]] = resized
    frame = _centre_of_mass_shift(frame)
    return torch.from_numpy(frame.clip(0, 255).round().astype(np.uint8))


def read_grayscale(path: Path) -> np.ndarray:
    """The image's brightness, a new float32 array in 0..1 (height × width), decoded after its header's checks."""
    from PIL import Image

    _require_regular_file(path)
    with warnings.catch_warnings():
        # PIL warns on stderr from ~89 megapixels; MAX_MEGAPIXELS refuses those in a line of our own.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with _open_header(path) as image:
            _require_one_safe_frame(path, image)
            try:
                return _grayscale(image)
            except Exception as error:  # a truncated or corrupt file fails in the decoder, with many exception types
                raise _corrupt(path, error) from None


def _open_header(path: Path) -> Image.Image:
    """Image.open reads the header only: the pixels are decoded later, by the first conversion."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except Image.DecompressionBombError:
        raise UserError(
            f"{path}: over {2 * Image.MAX_IMAGE_PIXELS // 10**6} megapixels, too large to decode safely"
            f" (a decompression bomb?); scale it down to at most {MAX_MEGAPIXELS} megapixels"
        ) from None
    except PermissionError:
        raise UserError(f"{path}: permission denied; make it readable (chmod +r)") from None
    except UnidentifiedImageError:
        raise UserError(f"{path}: not a readable image (no format PIL knows); pass a PNG or JPEG file") from None
    except Exception as error:  # a known format whose header is cut short or corrupt
        raise _corrupt(path, error) from None


def _corrupt(path: Path, error: Exception) -> UserError:
    detail = " ".join(str(error).split())  # one line, whatever PIL wrote
    return UserError(f"{path}: truncated or corrupt image ({type(error).__name__}: {detail}); re-save or re-export it")


def _require_regular_file(path: Path) -> None:
    """Name the usual mistakes before PIL sees the path; a device or pipe could also block or never end."""
    try:
        status = path.stat()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; check the path") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read it ({error.strerror}); check the path and its permissions") from None
    if stat.S_ISDIR(status.st_mode):
        raise UserError(f"{path}: is a directory; pass the image files in it (e.g. {path}/*.png)")
    if not stat.S_ISREG(status.st_mode):
        raise UserError(f"{path}: not a regular file (a device, pipe or socket); pass an image file")
    if status.st_size == 0:
        raise UserError(f"{path}: empty file (0 bytes); pass a PNG or JPEG image")


def _require_one_safe_frame(path: Path, image: Image.Image) -> None:
    """Refuse, from the header alone, what would be too costly to decode or ambiguous to classify."""
    width, height = image.size
    if width * height > MAX_MEGAPIXELS * 10**6:
        raise UserError(f"{path}: {width}×{height} pixels, over the {MAX_MEGAPIXELS}-megapixel limit; scale it down")
    try:
        frames = getattr(image, "n_frames", 1)  # GIF counts its frames by walking their headers, not decoding
    except Exception as error:
        raise _corrupt(path, error) from None
    if frames > 1:  # which frame holds the digit is a guess: let the user pick it
        raise UserError(f"{path}: animated image with {frames} frames; pass a single frame (e.g. save one as PNG)")


def _grayscale(image: Image.Image) -> np.ndarray:
    """Brightness in 0..1 whatever the mode: 16-bit, alpha, palette, CMYK and 1-bit included. Decodes the pixels."""
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)  # a phone photo's pixels may be stored sideways, with an EXIF rotation
    if image.mode in WIDE_GRAY_MODES:
        # Stretch the values present, not the type's range: 16-bit files often hold 10- or 12-bit sensor data.
        values = np.asarray(image, dtype=np.float32)
        low = values.min()
        return (values - low) / max(float(values.max() - low), 1.0)
    if not image.has_transparency_data:
        return np.asarray(image.convert("L"), dtype=np.float32) / 255
    pixels = np.asarray(image.convert("RGBA").convert("LA"), dtype=np.float32)
    pixels /= 255
    luminance, alpha = pixels[..., 0], pixels[..., 1]
    # Transparent pixels are background whatever colour they hide: lay the image on the shade opposite its ink.
    ink = float(np.vdot(luminance, alpha) / max(float(alpha.sum()), 1e-6))
    background = 1.0 if ink < 0.5 else 0.0
    luminance -= background  # luminance · alpha + background · (1 - alpha), without a float copy per term
    luminance *= alpha
    luminance += background
    return luminance


def _centre_of_mass_shift(frame: np.ndarray) -> np.ndarray:
    total = frame.sum()
    rows, cols = np.indices(frame.shape)
    shift_rows = round(FRAME / 2 - 0.5 - (rows * frame).sum() / total)
    shift_cols = round(FRAME / 2 - 0.5 - (cols * frame).sum() / total)
    # no further than the ink's margins: np.roll would wrap a lopsided digit round to the other side
    ink_rows, ink_cols = np.nonzero(frame.any(axis=1))[0], np.nonzero(frame.any(axis=0))[0]
    shift_rows = min(max(shift_rows, -ink_rows[0]), FRAME - 1 - ink_rows[-1])
    shift_cols = min(max(shift_cols, -ink_cols[0]), FRAME - 1 - ink_cols[-1])
    return np.roll(frame, (shift_rows, shift_cols), axis=(0, 1))


@torch.no_grad()
def classify(model: torch.nn.Module, frame: torch.Tensor, dataset: str, top: int) -> list[tuple[str, float]]:
    info = DATASETS[dataset]
    probabilities = model(normalize(frame.unsqueeze(0), info)).softmax(dim=1)[0]
    values, classes = probabilities.topk(top)
    return [(info.classes[c], float(v)) for c, v in zip(classes.tolist(), values.tolist(), strict=True)]


def run(config: PredictConfig) -> int:
    """Classify every file; report unreadable ones and carry on. Returns the exit status."""
    model, metadata = load_model(Path(config.model))
    dataset = metadata.get("config", {}).get("dataset", "mnist")
    failures = 0
    for name in config.images:
        try:
            ranked = classify(model, to_mnist_frame(Path(name)), dataset, min(config.top, model.num_classes))
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            failures += 1
            continue
        if config.json:
            print(json.dumps({"file": name, "prediction": ranked[0][0],
                              "top": [{"class": c, "probability": p} for c, p in ranked]}))
        else:
            print(f"{name}: {ranked[0][0]}   top-{len(ranked)}: " + ", ".join(f"{c} {p:.1%}" for c, p in ranked))
    return 1 if failures else 0
