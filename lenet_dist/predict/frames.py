"""Photos and scans as the 28×28 frames a model trained on an MNIST-format data set takes: light ink on black,
the paper's shading divided out, the item scaled and placed as that data set's were (LAYOUTS; steps in `to_frame`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lenet_dist.errors import UserError
from lenet_dist.predict.photos import read_grayscale

FRAME = 28
# MNIST's mean centre of mass (measured on the test set): (14.0, 14.0), not the middle pixel (13.5)
MNIST_CENTRE = FRAME / 2
INK_THRESHOLD = 0.2  # of the strongest ink: fainter pixels are paper when finding the item's bounding box
STROKE_THRESHOLD = 0.5  # of the strongest ink: the item's bounding box grows from these strokes, which smudges are not
REACH = 0.1  # ink further from the item's box than this share of the box's longer side is not part of the item
# photos are box-averaged down to this side: a digit a fortieth of the width still spans 25 pixels (it is scaled
# to 20), and a 40-megapixel photo's float copies shrink from 160 MB to 4 MB
WORK_SIDE = 1024
# cells along the longer side of the grid the paper's shading is estimated on: fine enough to follow a shadow
SHADING_CELLS = 16
ROBUST_SIGMAS = 3  # paper pixels within this many (MAD-estimated) standard deviations of the paper's level are paper
MIN_CONTRAST = 0.05  # the least ink counted as ink: 5 % darker than the paper around it (or lighter, on dark paper)
# a hard-edged shadow (_shadow_step): two border levels this far apart (of 0..1), explaining this share of its
# variance (a linear gradient: 0.75), the lesser this share of the border at least; a pixel reaches a level within this
MIN_STEP, STEP_SEPARATION, STEP_SHARE, STEP_TOLERANCE = 0.15, 0.9, 0.05, 0.05
# a sheet on a desk (_sheet): its least share of the photo and of it light, its inset, its least contrast to the desk
SHEET_AREA, SHEET_FILL, SHEET_INSET, SHEET_CONTRAST = 0.05, 0.8, 0.03, 0.3
# MNIST's stroke widths (_stroke_width of 5,000 training digits): 1st and 99th percentile, median. A hairline pen
# shrunk into the 20-pixel box would fade to a grey trace, a marker's strokes fill a 6's loop
MNIST_STROKES = (1.1, 3.65, 1.95)
FINE = 4  # strokes are measured and redrawn at this many times the frame's resolution
MAD_TO_SIGMA = 1.4826  # the median absolute deviation of normally distributed noise, times this, is its σ


@dataclass(frozen=True)
class Layout:
    """How a data set's items were made into 28×28 frames."""

    box: int  # the longer side of the item's bounding box, in pixels
    by_mass: bool  # centred by its centre of mass (else by its bounding box)
    stretched: bool  # the ink scaled to full brightness (else kept relative to the paper, a dark item bright)
    # the data set's stroke widths in frame pixels (_stroke_width): its usual range, and its median, which a pen
    # outside that range is brought to
    strokes: tuple[float, float, float] | None = None


# MNIST: scaled into 20×20, centred by mass in 28×28 (LeCun et al.). Fashion-MNIST: the longer edge resized to 28,
# centred, not stretched (Xiao et al. 2017; measured: median longer side 28, a white shirt stays dim). KMNIST fills its
# frame too, judging by its samples and mean brightness (0.19 against MNIST's 0.13); its recipe is unpublished.
# the strongest pixel of an item shrunk into its box below this is no digit, only specks (a 1-pixel hairline in a
# 1,000-pixel scan still keeps 0.02)
FADED = 0.005
LAYOUTS = {
    "mnist": Layout(20, by_mass=True, stretched=True, strokes=MNIST_STROKES),
    "fashion-mnist": Layout(FRAME, by_mass=False, stretched=False),
    "kmnist": Layout(FRAME, by_mass=False, stretched=True),
}


def to_frame(path: Path, dataset: str = "mnist") -> torch.Tensor:
    """An image file as the uint8 28×28 tensor a model trained on `dataset` takes; a UserError says what is wrong.

    0. A light sheet on a darker desk is cut out (_sheet), so that the border is paper.
    1. Polarity: the border is paper; if the darkest pixels stand further out of its range than the brightest, the
       ink is dark and the image is inverted (where ink covers the border, the border's median decides).
    2. Shading: the paper's brightness is estimated on a coarse grid, capped by a plane fitted to the border, and
       divided out; a hard-edged shadow is followed pixel by pixel instead (_stepped_paper).
    3. Noise: within ROBUST_SIGMAS of the border's level is paper; if nothing stands out by MIN_CONTRAST, it is blank.
    4. The item's bounding box (_item_box) is scaled and placed as `dataset`'s items were (LAYOUTS).
    """
    ink = _ink(_working_size(read_grayscale(path)), path)
    frame = _lay_out(ink[_item_box(ink)], LAYOUTS[dataset])
    if not frame.any():  # specks far apart: scaled into the box together, each fades to nothing at 28×28
        raise UserError(f"{path}: no digit stands out, only specks or noise; crop the image closer to the digit")
    return torch.from_numpy(frame)


def _item_box(ink: np.ndarray) -> tuple[slice, slice]:
    """The strong strokes' box, grown by the ink within REACH of it until none is left: faint edges and strokes join
    the item, a smudge of paper apart from it does not."""
    strongest, around = float(ink.max()), _neighbourhood(ink, np.mean)

    def above(share: float) -> np.ndarray:
        # a pixel whose neighbours are not inked too is noise (a JPEG's or a sensor's), not part of a stroke
        return (ink > share * strongest) & (around > share * strongest / 2)

    strokes = above(STROKE_THRESHOLD)
    if not strokes.any():  # no two inked pixels side by side (a dot, a speckle): start from the strongest
        strokes = ink == strongest
    box, inked = _bounds(strokes), above(INK_THRESHOLD) | strokes
    while True:
        reach = math.ceil(REACH * max(box[0].stop - box[0].start, box[1].stop - box[1].start))
        window = tuple(slice(max(0, side.start - reach), side.stop + reach) for side in box)
        inner = _bounds(inked[window])
        grown = tuple(slice(outer.start + part.start, outer.start + part.stop)
                      for outer, part in zip(window, inner, strict=True))
        if grown == box:
            return box
        box = grown


def _bounds(mask: np.ndarray) -> tuple[slice, slice]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _working_size(gray: np.ndarray) -> np.ndarray:
    """Box-average a large image down to at most WORK_SIDE pixels a side (a few edge rows or columns dropped)."""
    factor = math.ceil(max(gray.shape) / WORK_SIDE)
    if factor == 1:
        return gray
    height, width = gray.shape[0] // factor, gray.shape[1] // factor
    rows = gray[: height * factor].reshape(height, factor, -1).mean(axis=1)  # a view of whole rows: no copy
    return rows[:, : width * factor].reshape(height, width, factor).mean(axis=2)


def _border(image: np.ndarray) -> np.ndarray:
    return np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])


def _ink(gray: np.ndarray, path: Path) -> np.ndarray:
    """Light ink on black, 0 for paper to 1 for ink as far from it as black from white (to_frame's steps 1 to 3)."""
    low, high = float(gray.min()), float(gray.max())
    if high - low < 1e-6:
        raise UserError(f"{path}: the image is blank (one flat colour); nothing to classify")
    gray = _sheet(gray)
    low, high = float(gray.min()), float(gray.max())
    if _dark_ink(_border(gray), low, high):
        gray = 1 - gray
    paper = _stepped_paper(gray) if _shadow_step(gray) else np.minimum(_shading(gray), _paper_plane(gray))
    # ink relative to the paper's brightness, boosted at most twice in deep shadow, or the sensor's noise outshines it
    lit = np.maximum(1 - paper, max(1 - float(np.median(_border(paper))), 1e-3) / 2)
    ink = (gray - paper) / lit
    level, spread = _level_and_spread(_border(ink))
    ink = np.clip(ink - (level + ROBUST_SIGMAS * spread), 0, 1)
    # beyond the paper's noise and visibly darker than it, or a blank page's noise would be taken for a digit
    if ink.max() < max(MIN_CONTRAST, ROBUST_SIGMAS * spread):
        raise UserError(f"{path}: the image is blank (only paper, no ink stands out); nothing to classify")
    return ink


def _sheet(gray: np.ndarray) -> np.ndarray:
    """A light sheet on a darker desk, cut a little inside its edges so that step 1's border is paper; else the whole
    image. A desk: three of four edges mostly below Otsu's threshold, SHEET_CONTRAST darker than the light part. The
    sheet: the rows and columns with over half as many light pixels as the lightest (however little of the photo
    the sheet fills), the box they span at least SHEET_FILL light and SHEET_AREA of the photo."""
    light = gray > _otsu_threshold(gray)
    sides = (light[0], light[-1], light[:, 0], light[:, -1])
    if sum(side.mean() < 0.5 for side in sides) < 3 or not light.any() or light.all():
        return gray
    if float(np.median(gray[light]) - np.median(gray[~light])) < SHEET_CONTRAST:  # a shadow's gradient, not a desk
        return gray
    across, down = light.sum(axis=1), light.sum(axis=0)
    rows, cols = np.flatnonzero(across > across.max() / 2), np.flatnonzero(down > down.max() / 2)
    inset = math.ceil(SHEET_INSET * max(rows[-1] - rows[0], cols[-1] - cols[0]))
    box = (slice(rows[0] + inset, rows[-1] + 1 - inset), slice(cols[0] + inset, cols[-1] + 1 - inset))
    sheet = light[box]
    if sheet.size < SHEET_AREA * gray.size or sheet.mean() < SHEET_FILL or min(sheet.shape) < max(sheet.shape) / 4:
        return gray  # too small, patchy or narrow for a sheet of paper: a bold light stroke on black is none
    return gray[box]


def _otsu_threshold(gray: np.ndarray) -> float:
    """The level that best splits the image's values into a dark and a light class (Otsu, on 256 bins)."""
    counts, edges = np.histogram(gray, bins=256)
    weights = np.cumsum(counts)
    means = np.cumsum(counts * edges[:-1])
    dark, total = weights[:-1], weights[-1]
    between = (means[-1] * dark / total - means[:-1]) ** 2 / np.maximum(dark * (total - dark), 1)
    return float(edges[1:-1][np.argmax(between)])


def _dark_ink(paper: np.ndarray, low: float, high: float) -> bool:
    """Whether the darkest pixels stand further out of the paper's 5th to 95th percentile than the brightest; where
    neither does (ink covers the border), whether the paper's median is nearer the brightest value."""
    lightest_paper, median, darkest_paper = np.percentile(paper, [95, 50, 5])
    below, above = darkest_paper - low, high - lightest_paper
    if max(below, above) > 0:
        return bool(below > above)
    return bool(median - low > high - median)


def _level_and_spread(values: np.ndarray) -> tuple[float, float]:
    """The median and the MAD-estimated standard deviation of `values`: not thrown by ink pixels on the border."""
    level = float(np.median(values))
    return level, MAD_TO_SIGMA * float(np.median(np.abs(values - level)))


def _paper_plane(gray: np.ndarray) -> np.ndarray:
    """The brightest the paper can be: a plane fitted to the border's paper, plus ROBUST_SIGMAS of its scatter. It
    caps the shading estimate, which cannot tell a thick blob of ink from a patch of paper."""
    rows, cols = np.indices(gray.shape, dtype=np.float32)
    values = _border(gray)
    level, spread = _level_and_spread(values)
    paper = np.abs(values - level) <= ROBUST_SIGMAS * spread + 1e-6  # not the ink that reaches the border
    design = np.stack([np.ones_like(values), _border(rows), _border(cols)], axis=1)[paper]
    (offset, per_row, per_col), *_ = np.linalg.lstsq(design, values[paper], rcond=None)
    scatter = _level_and_spread(values[paper] - design @ np.array([offset, per_row, per_col]))
    return offset + per_row * rows + per_col * cols + scatter[0] + ROBUST_SIGMAS * scatter[1]


def _shadow_step(gray: np.ndarray) -> bool:
    """Whether the border's paper falls into two tight levels (a hard-edged shadow), not a gradient's even spread:
    Otsu's split explains over STEP_SEPARATION of its variance, and the levels are MIN_STEP apart. The shadow's side
    is one or two long arcs of the border (a shadow's edge crosses it once or twice), STEP_SHARE of it at least; ink
    that touches the frame is short arcs, or more of them, and must not be taken for paper."""
    border = _border_loop(gray)
    threshold = _otsu_threshold(border)
    low, high = border[border <= threshold], border[border > threshold]
    if not low.size or not high.size or min(low.size, high.size) < STEP_SHARE * border.size:
        return False
    between = low.size * high.size / border.size**2 * (high.mean() - low.mean()) ** 2
    if not (high.mean() - low.mean() > MIN_STEP and between > STEP_SEPARATION * border.var()):
        return False
    shaded = border > threshold  # ink, light on dark by now, is on this side too
    starts = np.flatnonzero(shaded & ~np.roll(shaded, 1))
    if starts.size == 0:
        return False
    ends = np.flatnonzero(shaded & ~np.roll(shaded, -1))
    lengths = (ends - starts) % border.size + 1 if shaded[0] and shaded[-1] else ends - starts + 1
    return bool(starts.size <= 2 and lengths.max() >= STEP_SHARE * border.size)


def _border_loop(image: np.ndarray) -> np.ndarray:
    """The border's pixels once each, in order round the frame (clockwise from the top left corner)."""
    return np.concatenate([image[0], image[1:, -1], image[-1, -2::-1], image[-2:0:-1, 0]])


def _stepped_paper(gray: np.ndarray) -> np.ndarray:
    """The paper under a hard-edged shadow: per pixel, the brightest neighbouring grid level it reaches, so that the
    step stays sharp; ink, brighter than either level, is measured from the brighter."""
    opened, cell = _opened_cells(gray)
    rows, cols = (np.arange(n) // cell for n in gray.shape)
    padded = np.pad(opened, 1, mode="edge")
    paper = np.full(gray.shape, -np.inf, dtype=np.float32)
    for dr in range(3):
        for dc in range(3):
            level = padded[rows[:, None] + dr, cols[None, :] + dc]
            reached = level <= gray + STEP_TOLERANCE
            paper = np.where(reached & (level > paper), level, paper)
    return np.where(np.isfinite(paper), paper, opened[rows[:, None], cols[None, :]])


def _opened_cells(gray: np.ndarray) -> tuple[np.ndarray, int]:
    """The paper's level per grid cell, and the cell's side: each cell's median, opened over 3×3 cells (min, then
    max) to keep the paper's slow changes and drop the cells that strokes fill."""
    cell = math.ceil(max(gray.shape) / SHADING_CELLS)
    grid_shape = (math.ceil(gray.shape[0] / cell), math.ceil(gray.shape[1] / cell))
    padded = np.pad(gray, [(0, grid_shape[0] * cell - gray.shape[0]), (0, grid_shape[1] * cell - gray.shape[1])],
                    mode="edge")
    cells = padded.reshape(grid_shape[0], cell, grid_shape[1], cell).swapaxes(1, 2).reshape(*grid_shape, -1)
    return _neighbourhood(_neighbourhood(np.median(cells, axis=2), np.min), np.max), cell


def _shading(gray: np.ndarray) -> np.ndarray:
    """The paper's brightness under light ink: the opened cells (_opened_cells), smoothly upsampled."""
    from PIL import Image

    opened, cell = _opened_cells(gray)
    grid_size = (opened.shape[1] * cell, opened.shape[0] * cell)
    smooth = Image.fromarray(opened.astype(np.float32)).resize(grid_size, Image.Resampling.BILINEAR)
    return np.asarray(smooth)[: gray.shape[0], : gray.shape[1]]


def _neighbourhood(grid: np.ndarray, reduce: Callable[..., np.ndarray]) -> np.ndarray:
    """Each cell's min, max or mean over its 3×3 neighbourhood (the edges repeated outwards)."""
    padded = np.pad(grid, 1, mode="edge")
    rows, cols = grid.shape
    return reduce([padded[r : r + rows, c : c + cols] for r in range(3) for c in range(3)], axis=0)


def _lay_out(item: np.ndarray, layout: Layout) -> np.ndarray:
    """The cropped item (ink in 0..1) scaled to the layout's box and placed in a uint8 28×28 frame."""
    scale = layout.box / max(item.shape)
    size = (max(1, round(item.shape[1] * scale)), max(1, round(item.shape[0] * scale)))
    if layout.stretched:
        item = item / item.max()
    resized = _resize(item, size)
    if layout.stretched and resized.max() < FADED:  # specks far apart, scaled into the box together, fade away
        return np.zeros((FRAME, FRAME), dtype=np.uint8)
    if layout.strokes is not None:
        resized = _restroke(item, size, layout.strokes, resized)
    if layout.stretched:  # after shrinking, as MNIST's anti-aliased digits: a thin stroke's pixels reach 255 too
        resized = resized / float(resized.max())
    frame = np.zeros((FRAME, FRAME), dtype=np.float32)
    # an odd margin's extra pixel goes above and to the left, as in Fashion-MNIST (MNIST's is moved by mass anyway)
    top, left = (FRAME + 1 - resized.shape[0]) // 2, (FRAME + 1 - resized.shape[1]) // 2
    frame[top : top + resized.shape[0], left : left + resized.shape[1]] = resized * 255
    if layout.by_mass:
        frame = _centre_of_mass_shift(frame)
    return frame.clip(0, 255).round().astype(np.uint8)


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Anti-aliased (Lanczos) resampling to (width, height), in float (no 8-bit rounding of faint strokes), within the
    image's range (Lanczos rings past a sharp edge)."""
    from PIL import Image

    resized = Image.fromarray(image.astype(np.float32)).resize(size, Image.Resampling.LANCZOS)
    return np.asarray(resized).clip(0, float(image.max()))


def _stroke_width(fine: np.ndarray) -> float:
    """The strokes' mean width in pixels: twice the area over the outline's length (a stroke w wide and l long has
    area w·l and outline 2·l), the ink taken above half the strongest after a 3×3 mean (a dithered edge's specks
    would double the outline)."""
    smooth = _neighbourhood(fine, np.mean)
    ink = np.pad(smooth > smooth.max() / 2, 1)
    outline = (ink[1:] != ink[:-1]).sum() + (ink[:, 1:] != ink[:, :-1]).sum()
    return 2 * float(ink.sum()) / max(int(outline), 1)


def _restroke(item: np.ndarray, size: tuple[int, int], strokes: tuple[float, float, float],
              resized: np.ndarray) -> np.ndarray:
    """`resized`, unless its strokes would be thinner or thicker than the layout's range: then the item redrawn at
    FINE× the frame's resolution with its strokes grown or shrunk (a grey dilation or erosion by a disc) to the
    data set's median width."""
    fine = _resize(item, (size[0] * FINE, size[1] * FINE))
    width, (low, high, target) = _stroke_width(fine) / FINE, strokes
    if low <= width <= high:
        return resized
    radius = abs(target - width) * FINE / 2
    reach = math.ceil(radius)
    offsets = [(r, c) for r in range(-reach, reach + 1) for c in range(-reach, reach + 1) if r * r + c * c <= radius**2]
    padded = np.pad(fine, reach)
    shifted = [padded[reach + r : reach + r + fine.shape[0], reach + c : reach + c + fine.shape[1]] for r, c in offsets]
    fine = (np.max if target > width else np.min)(shifted, axis=0)
    return _resize(fine, size)


def _centre_of_mass_shift(frame: np.ndarray) -> np.ndarray:
    total = frame.sum()
    if total == 0:  # nothing to centre (to_frame refuses the frame)
        return frame
    rows, cols = np.indices(frame.shape)
    shift_rows = round(MNIST_CENTRE - (rows * frame).sum() / total)
    shift_cols = round(MNIST_CENTRE - (cols * frame).sum() / total)
    # no further than the ink's margins: np.roll would wrap a lopsided digit round to the other side
    ink_rows, ink_cols = np.nonzero(frame.any(axis=1))[0], np.nonzero(frame.any(axis=0))[0]
    shift_rows = min(max(shift_rows, -ink_rows[0]), FRAME - 1 - ink_rows[-1])
    shift_cols = min(max(shift_cols, -ink_cols[0]), FRAME - 1 - ink_cols[-1])
    return np.roll(frame, (shift_rows, shift_cols), axis=(0, 1))
