"""The files `lenet-dist predict` is given in tests/test_predict.py, made here: a drawn 7, photographs of pages,
sheets on desks and product shots, other modes and bit depths, and the hostile ones (cut, animated, huge, blank,
not an image at all). Each returns pixels, a file's bytes or the path of the file it wrote.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def seven(size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """A thick white 7 on black, uint8 with soft edges like MNIST's: asymmetric, so a rotated frame would not match."""
    image = Image.new("L", size)
    ImageDraw.Draw(image).line([(8, 10), (size[0] - 8, 10), (size[0] // 3, size[1] - 8)], fill=255, width=7)
    return np.asarray(image.filter(ImageFilter.GaussianBlur(1.5)))


def flat_png(path: Path, width: int, height: int) -> Path:
    """A valid black 1-bit PNG of any size, written row by row: a 20000×20000 one is ~50 kB and takes ~0.3 s."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    deflate, row = zlib.compressobj(), bytes(1 + (width + 7) // 8)  # filter byte + packed pixels
    pixels = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return path


def truncated(path: Path, kind: str) -> Path:
    """Cut in the pixel data, as a download cut short leaves it: the header reads, decoding fails."""
    noise = np.random.default_rng(0).integers(0, 64, (256, 192, 3), dtype=np.uint8)  # data to outweigh the header
    Image.fromarray(noise + seven((192, 256))[..., None] // 2).save(path, kind)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with Image.open(path) as image:
        assert image.size == (192, 256)
    return path


def animated(path: Path, kind: str) -> Path:
    first = Image.fromarray(seven())
    first.save(path, kind, save_all=True, append_images=[first.rotate(90), first.rotate(180)])
    return path


def text_file(path: Path) -> Path:
    path.write_text("this is not an image")
    return path


def empty(path: Path) -> Path:
    path.touch()
    return path


def folder(path: Path) -> Path:
    path.mkdir()
    return path


def blank_page(path: Path) -> Path:
    """A photo of a page with nothing on it: grey paper, sensor noise, JPEG."""
    noise = np.random.default_rng(0).normal(150, 3, (300, 400))
    Image.fromarray(noise.clip(0, 255).astype(np.uint8)).save(path, quality=60)
    return path


def specks(path: Path) -> Path:
    """Two specks far apart on a black page, no digit: scaled into 20×20 together, each fades to nothing."""
    page = np.zeros((600, 900), np.uint8)
    page[100:102, 100:102] = page[500:502, 800:802] = 255
    Image.fromarray(page).save(path)
    return path


def sixteen_bit(digit: np.ndarray, levels: int) -> Image.Image:
    image = Image.fromarray((digit.astype(np.uint32) * (levels - 1) // 255).astype(np.uint16))
    assert image.mode.startswith("I;16")
    return image


def with_transparent_background(digit: np.ndarray, hidden: int) -> Image.Image:
    """Black ink drawn by its alpha alone (as drawing apps export it), over `hidden`, a colour no viewer shows."""
    rgba = np.zeros((*digit.shape, 4), dtype=np.uint8)
    rgba[..., :3] = np.where(digit[..., None] > 0, 0, hidden)
    rgba[..., 3] = digit
    return Image.fromarray(rgba)


def palette_with_transparency(digit: np.ndarray) -> Image.Image:
    image = Image.fromarray(np.where(digit > 127, 1, 0).astype(np.uint8), "P")
    image.putpalette([255, 255, 255, 0, 0, 0])  # index 0 white, index 1 black ink
    image.info["transparency"] = 0
    return image


def photographed(digit: np.ndarray, rng: np.random.Generator, paper: float, ink: float, size=(400, 300),
                 height: int = 120, corner=(230, 40), shadow: float = 0.4, desk: float | None = None,
                 shadow_edge: int | None = None) -> bytes:
    """A 28×28 MNIST digit photographed on a page: scaled up and off-centre in a larger frame, the paper grey and
    blotchy, darkening across the page (a shadow darkens paper and ink alike), sensor noise, saved as JPEG 60;
    with `desk`, the page lies on a desk of that brightness, which fills a margin around it; with `shadow_edge`,
    a hard-edged shadow halves the light right of that column, across the digit."""
    width, page_height = size
    coverage = np.zeros((page_height, width), np.float32)
    scaled = Image.fromarray(digit).resize((height, height), Image.Resampling.BICUBIC)
    coverage[corner[1] : corner[1] + height, corner[0] : corner[0] + height] = np.asarray(scaled) / 255
    coarse = Image.fromarray(rng.normal(0, 10, (4, 5)).astype(np.float32))  # ±10 grey levels, a blotch per 100 px
    blotches = np.asarray(coarse.resize(size, Image.Resampling.BICUBIC))
    reflected = (paper + blotches) * (1 - coverage) + ink * coverage
    light = np.linspace(1, 1 - shadow, width)[None, :] * np.linspace(1, 1 - shadow / 2, page_height)[:, None]
    if shadow_edge is not None:
        light[:, shadow_edge:] /= 2
    if desk is not None:  # the sheet a little askew of the photo's middle, the desk all round
        margins = ((70, 50), (40, 90))
        reflected = np.pad(reflected, margins, constant_values=desk)
        light = np.pad(light, margins, mode="edge")
        page_height, width = reflected.shape
    pixels = reflected * light + rng.normal(0, 3, (page_height, width))
    photo = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(photo, "JPEG", quality=60)
    return photo.getvalue()


def sheet_on_a_desk(digit: np.ndarray, path: Path, share: tuple[float, float]) -> Path:
    """A 1200×900 JPEG of a light sheet with a dark digit on a brown desk; the sheet spans `share` of the photo's
    width and height, a little off its middle."""
    rng = np.random.default_rng(0)
    grain = np.asarray(Image.fromarray(rng.normal(0, 1, (9, 12)).astype(np.float32)).resize((1200, 900)))
    photo = np.array([120, 80, 50], np.float32) * (1 + 0.08 * grain[..., None])  # brown wood, unevenly lit
    width, height = int(1200 * share[0]), int(900 * share[1])
    side = int(min(width, height) * 0.6)
    ink = np.asarray(Image.fromarray(digit).resize((side, side), Image.Resampling.BICUBIC), np.float32)[..., None] / 255
    sheet = np.full((height, width, 3), [235, 230, 220], np.float32)
    top, left = (height - side) // 2, (width - side) // 2
    sheet[top : top + side, left : left + side] = sheet[top : top + side, left : left + side] * (1 - ink) + 35 * ink
    top, left = (900 - height) // 2 + 20, (1200 - width) // 2 - 30
    photo[top : top + height, left : left + width] = sheet
    photo += rng.normal(0, 3, photo.shape)
    Image.fromarray(photo.clip(0, 255).astype(np.uint8)).save(path, quality=85)
    return path


def product_photo(item: np.ndarray, path: Path) -> Path:
    """A Fashion-MNIST item as the product photo it was made from: dark on white (Fashion-MNIST negated it), larger,
    off-centre in a bigger frame, as JPEG."""
    page = Image.new("L", (400, 300), 245)
    page.paste(Image.fromarray(255 - item).resize((140, 140), Image.Resampling.BICUBIC), (220, 60))
    page.save(path, quality=85)
    return path
