"""Reading an image file's brightness, treating every file as hostile until read.

A missing file, a folder, an empty, truncated or animated file, or one too large to decode safely is a
UserError that names it and says what to do.
"""

from __future__ import annotations

import stat
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lenet_dist.errors import UserError

if TYPE_CHECKING:
    from PIL import Image

# checked from the header, before decoding: over 3× a 12-megapixel phone photo, yet one adds under 1 GB at the
# peak (measured: ~0.6 GB for RGB, ~0.85 GB with alpha); PIL's own error starts at ~179
MAX_MEGAPIXELS = 40
# How PIL opens 16-bit grayscale (and 32-bit integer) files: convert("L") would clip them to white.
WIDE_GRAY_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


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
