"""Handwriting as scanners see it, made from MNIST *test* digits (which no model here trained on): each digit's pen
path redrawn with another pen (hairline to marker), slanted, narrowed or widened, scanned as dark ink on light or grey
paper at 200-1000 px, sometimes at a low resolution and upscaled blurry, sometimes cropped so the digit touches the
frame. `ideal_frame` is the same pen drawing as MNIST itself framed its digits: what predict's framing should match.
Deterministic: one numpy Generator decides everything.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

UPSCALE = 4  # the pen path is traced on the MNIST digit at 4× (a 112-pixel frame)
# the pen's width as a share of the digit's height: MNIST's strokes are ~2.5 of 20 px, 0.12
PENS = {"hairline": 0.012, "fine": 0.04, "mnist": None, "felt-tip": 0.16, "marker": 0.24}


@dataclass(frozen=True)
class Style:
    """How one digit is written and scanned."""

    pen: str  # a key of PENS
    slant: float  # horizontal shear, x += slant · (distance above the middle)
    aspect: float  # width / height, against the MNIST writer's
    side: int  # the scan's longer side, in pixels
    paper: int  # paper and ink brightness, 0..255
    ink: int
    low_resolution: bool  # scanned at a quarter of `side`, then upscaled smoothly
    touching: bool  # cropped to the digit: its strokes touch the frame
    jpeg: bool


def random_style(rng: np.random.Generator) -> Style:
    return Style(pen=str(rng.choice(list(PENS))), slant=float(rng.uniform(-0.35, 0.35)),
                 aspect=float(rng.choice([0.6, 0.8, 1.0, 1.0, 1.25])), side=int(rng.integers(200, 1001)),
                 paper=int(rng.choice([235, 200, 150])), ink=int(rng.integers(10, 70)),
                 low_resolution=bool(rng.random() < 0.3), touching=bool(rng.random() < 0.25),
                 jpeg=bool(rng.random() < 0.5))


def _thin(mask: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning: the binary shape's one-pixel-wide centre line (its topology kept)."""
    skeleton = np.pad(mask.astype(bool), 1)
    while True:
        changed = False
        for step in (0, 1):
            p = [np.roll(skeleton, shift, axis=(0, 1)) for shift in
                 [(1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1)]]  # P2..P9, clockwise from N
            neighbours = sum(q.astype(np.uint8) for q in p)
            transitions = sum((~p[i] & p[(i + 1) % 8]).astype(np.uint8) for i in range(8))
            if step == 0:
                gone = ~(p[0] & p[2] & p[4]) & ~(p[2] & p[4] & p[6])
            else:
                gone = ~(p[0] & p[2] & p[6]) & ~(p[0] & p[4] & p[6])
            remove = skeleton & (neighbours >= 2) & (neighbours <= 6) & (transitions == 1) & gone
            if remove.any():
                skeleton &= ~remove
                changed = True
        if not changed:
            return skeleton[1:-1, 1:-1]


def _dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    reach = int(np.ceil(radius))
    padded, out = np.pad(mask, reach), np.zeros_like(mask)
    for dr in range(-reach, reach + 1):
        for dc in range(-reach, reach + 1):
            if dr * dr + dc * dc <= radius * radius + 0.25:
                out |= padded[reach + dr : reach + dr + mask.shape[0], reach + dc : reach + dc + mask.shape[1]]
    return out


def pen_drawing(digit: np.ndarray, style: Style) -> np.ndarray:
    """The digit redrawn with `style`'s pen, slant and aspect: ink coverage 0..1 at 4× MNIST's scale."""
    size = digit.shape[0] * UPSCALE
    shape = np.asarray(Image.fromarray(digit).resize((size, size), Image.Resampling.BICUBIC)) > 127
    width = PENS[style.pen]
    if width is not None:
        rows = np.flatnonzero(shape.any(axis=1))
        shape = _dilate(_thin(shape), max(0.0, width * (rows[-1] - rows[0] + 1) / 2 - 0.5))
    canvas = Image.fromarray(shape.astype(np.uint8) * 255)
    # slant and aspect about the middle, inside a canvas wide enough to hold the result
    wide = int(size * max(1.0, style.aspect) + abs(style.slant) * size)
    shift = size / 2 - (wide / 2 + style.slant * size / 2) / style.aspect
    inverse = (1 / style.aspect, style.slant / style.aspect, shift, 0, 1, 0)
    warped = canvas.transform((wide, size), Image.Transform.AFFINE, inverse, Image.Resampling.BILINEAR)
    return np.asarray(warped, dtype=np.float32) / 255


def ideal_frame(drawing: np.ndarray) -> np.ndarray:
    """MNIST's own framing of a drawing: its bounding box anti-aliased into 20×20, ink stretched to 255, centred by
    mass in 28×28, uint8."""
    rows = np.flatnonzero((drawing > 0.5).any(axis=1))
    cols = np.flatnonzero((drawing > 0.5).any(axis=0))
    item = drawing[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    scale = 20 / max(item.shape)
    size = (max(1, round(item.shape[1] * scale)), max(1, round(item.shape[0] * scale)))
    small = np.asarray(Image.fromarray(item.astype(np.float32)).resize(size, Image.Resampling.BOX))
    small = small / small.max()
    frame = np.zeros((28, 28), np.float32)
    top, left = (28 - size[1]) // 2, (28 - size[0]) // 2
    frame[top : top + size[1], left : left + size[0]] = small
    r, c = np.indices(frame.shape)
    shift = (round(14 - (r * frame).sum() / frame.sum()), round(14 - (c * frame).sum() / frame.sum()))
    return (np.roll(frame, shift, axis=(0, 1)) * 255).round().astype(np.uint8)


def scan(drawing: np.ndarray, style: Style, rng: np.random.Generator) -> bytes:
    """The drawing as a scanner saves it: dark ink on paper, the digit ~70 % of the page's height (or cropped to it),
    sensor noise, maybe a low-resolution scan upscaled and a JPEG's loss."""
    rows, cols = np.flatnonzero((drawing > 0.5).any(axis=1)), np.flatnonzero((drawing > 0.5).any(axis=0))
    item = drawing[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height = style.side if style.touching else int(style.side * 0.7)
    width = max(1, round(item.shape[1] * height / item.shape[0]))
    ink = np.asarray(Image.fromarray(item).resize((width, height), Image.Resampling.BILINEAR)).clip(0, 1)
    if style.touching:
        coverage = ink
    else:
        coverage = np.zeros((style.side, max(style.side * 3 // 4, width + 20)), np.float32)
        top, left = (style.side - height) // 2, (coverage.shape[1] - width) // 2 + int(rng.integers(-10, 11))
        coverage[top : top + height, left : left + width] = ink
    pixels = style.paper * (1 - coverage) + style.ink * coverage
    image = Image.fromarray(pixels.round().astype(np.uint8))
    if style.low_resolution:
        small = (max(8, image.width // 4), max(8, image.height // 4))
        image = image.resize(small, Image.Resampling.BOX).resize(image.size, Image.Resampling.BICUBIC)
    image = image.filter(ImageFilter.GaussianBlur(0.7))
    noisy = np.asarray(image) + rng.normal(0, 3, (image.height, image.width))
    out = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(out, "JPEG" if style.jpeg else "PNG", quality=75)
    return out.getvalue()


def handwritten(digits: np.ndarray, seed: int = 0) -> list[tuple[bytes, np.ndarray, Style]]:
    """Each MNIST digit written and scanned in a random style: (the scan's file bytes, its ideal frame, the style)."""
    rng = np.random.default_rng(seed)
    out = []
    for digit in digits:
        style = random_style(rng)
        drawing = pen_drawing(digit, style)
        out.append((scan(drawing, style, rng), ideal_frame(drawing), style))
    return out
