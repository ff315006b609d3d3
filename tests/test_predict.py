"""`lenet-dist predict` on users' files, in-process and without training: a random LeNet-5 is enough to show
that each hostile file is one line on stderr while the others are classified, and the frames are compared directly.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from lenet_dist.checkpoint import export_weights
from lenet_dist.config import PredictConfig
from lenet_dist.model import LeNet5
from lenet_dist.predict import FRAME, MAX_MEGAPIXELS, run, to_mnist_frame

MIDDLE = FRAME / 2 - 0.5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("run")
    export_weights(LeNet5(), folder, {"config": {"dataset": "mnist"}, "num_classes": 10})
    return folder


def seven(size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """A thick white 7 on black, uint8 with soft edges like MNIST's: asymmetric, so a rotated frame would not match."""
    image = Image.new("L", size)
    ImageDraw.Draw(image).line([(8, 10), (size[0] - 8, 10), (size[0] // 3, size[1] - 8)], fill=255, width=7)
    return np.asarray(image.filter(ImageFilter.GaussianBlur(1.5)))


def reference_frame(tmp_path: Path) -> np.ndarray:
    path = tmp_path / "reference.png"
    Image.fromarray(seven()).save(path)
    return to_mnist_frame(path).numpy().astype(np.float32)


def centre_of_mass(frame: np.ndarray) -> tuple[float, float]:
    rows, cols = np.indices(frame.shape)
    return float((rows * frame).sum() / frame.sum()), float((cols * frame).sum() / frame.sum())


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


# kind: (how to make the file in tmp_path, the words its error line must hold)
HOSTILE: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing": (lambda tmp: tmp / "gone.png", "no such file"),
    "directory": (lambda tmp: folder(tmp / "digits"), "is a directory"),
    "empty": (lambda tmp: empty(tmp / "empty.png"), "empty file (0 bytes)"),
    "device": (lambda tmp: Path("/dev/null"), "not a regular file"),
    "text": (lambda tmp: text_file(tmp / "notes.png"), "not a readable image"),
    "truncated-png": (lambda tmp: truncated(tmp / "cut.png", "PNG"), "truncated or corrupt image"),
    "truncated-jpeg": (lambda tmp: truncated(tmp / "cut.jpg", "JPEG"), "truncated or corrupt image"),
    "animated-gif": (lambda tmp: animated(tmp / "spin.gif", "GIF"), "animated image with 3 frames; pass a single"),
    "animated-png": (lambda tmp: animated(tmp / "spin.png", "PNG"), "animated image with 3 frames; pass a single"),
    "just-over-limit": (lambda tmp: flat_png(tmp / "big.png", 8000, 5001),
                        f"8000×5001 pixels, over the {MAX_MEGAPIXELS}-megapixel limit"),
    "over-pil-warning": (lambda tmp: flat_png(tmp / "huge.png", 10000, 10000),
                         f"10000×10000 pixels, over the {MAX_MEGAPIXELS}-megapixel limit"),
    "decompression-bomb": (lambda tmp: flat_png(tmp / "bomb.png", 20000, 20000), "too large to decode safely"),
}


def predict(model_dir: Path, files: list[Path], capsys) -> tuple[int, list[str], list[str], list]:
    """run() in-process: its status, stdout and stderr lines, and every warning it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = run(PredictConfig(model=str(model_dir), images=[str(f) for f in files]))
    out, err = capsys.readouterr()
    return status, out.splitlines(), err.splitlines(), caught


@pytest.mark.parametrize("kind", HOSTILE)
def test_a_hostile_file_is_one_line_and_the_others_are_classified(kind, model_dir, tmp_path, capsys):
    make, words = HOSTILE[kind]
    bad = make(tmp_path)
    before, after = tmp_path / "before.png", tmp_path / "after.jpg"
    Image.fromarray(seven()).save(before)
    Image.fromarray(255 - seven()).save(after)
    status, out, err, caught = predict(model_dir, [before, bad, after], capsys)
    assert status == 1
    assert [line.split(":")[0] for line in out] == [str(before), str(after)]  # in order, the bad one skipped
    assert len(err) == 1 and err[0].startswith(f"error: {bad}: ") and words in err[0], err
    assert "; " in err[0].removeprefix(f"error: {bad}: ")  # what is wrong; what to do
    assert not caught, [str(w.message) for w in caught]  # no DecompressionBombWarning (nor any other) on stderr


def test_several_hostile_files_each_get_a_line(model_dir, tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.fromarray(seven()).save(good)
    bad = [HOSTILE[kind][0](tmp_path) for kind in ("missing", "truncated-jpeg", "animated-gif", "decompression-bomb")]
    status, out, err, _ = predict(model_dir, [bad[0], good, *bad[1:], good], capsys)
    assert status == 1 and [line.split(":")[0] for line in out] == [str(good), str(good)]
    assert [line.split(": ")[1] for line in err] == list(map(str, bad))


def test_good_files_exit_zero(model_dir, tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.fromarray(seven()).save(good)
    status, out, err, _ = predict(model_dir, [good], capsys)
    assert status == 0 and len(out) == 1 and out[0].startswith(f"{good}: ") and not err


def sixteen_bit(digit: np.ndarray, levels: int) -> Image.Image:
    image = Image.fromarray((digit.astype(np.uint32) * (levels - 1) // 255).astype(np.uint16))
    assert image.mode.startswith("I;16")
    return image


@pytest.mark.parametrize("levels", [65536, 4096], ids=["16-bit", "12-bit-in-16"])
def test_sixteen_bit_png_gives_the_8_bit_frame(levels, model_dir, tmp_path, capsys):
    digit = seven()
    eight, sixteen = tmp_path / "eight.png", tmp_path / "sixteen.png"
    Image.fromarray(digit).save(eight)
    sixteen_bit(digit, levels).save(sixteen)
    with Image.open(sixteen) as saved:
        assert saved.mode in ("I;16", "I")  # PIL reads it back as 16-bit, which convert("L") would clip to white
    expected, got = to_mnist_frame(eight).int(), to_mnist_frame(sixteen).int()
    assert (expected - got).abs().max() <= 2  # 12 bits quantise the soft edges a little
    status, out, _, _ = predict(model_dir, [eight, sixteen], capsys)
    assert status == 0 and out[0].split(":", 1)[1] == out[1].split(":", 1)[1]  # same class and probabilities


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


MODES: dict[str, tuple[Callable[[np.ndarray], Image.Image], str]] = {
    "rgba-over-black": (lambda d: with_transparent_background(d, 0), "png"),
    "rgba-over-white": (lambda d: with_transparent_background(d, 255), "png"),
    "la": (lambda d: Image.fromarray(d).convert("LA"), "png"),
    "palette": (lambda d: Image.fromarray(d).convert("P"), "png"),
    "palette-transparent": (palette_with_transparency, "png"),
    "palette-gif": (lambda d: Image.fromarray(255 - d).convert("P"), "gif"),
    "cmyk-jpeg": (lambda d: Image.fromarray(d).convert("CMYK"), "jpg"),
    "1-bit": (lambda d: Image.fromarray(d).convert("1"), "png"),
}


@pytest.mark.parametrize("mode", MODES)
def test_other_modes_give_the_same_frame(mode, tmp_path):
    make, suffix = MODES[mode]
    path = tmp_path / f"digit.{suffix}"
    make(seven()).save(path)
    frame = to_mnist_frame(path).numpy().astype(np.float32)
    assert np.abs(frame - reference_frame(tmp_path)).mean() < 8, mode  # 1-bit and a palette threshold the soft edges


def assert_mnist_like(frame: np.ndarray, reference: np.ndarray) -> None:
    """White ink on black, centred by its centre of mass, and the same digit as the reference."""
    assert frame.shape == (FRAME, FRAME)
    assert frame.max() >= 250 and np.median(frame) <= 5  # white ink on a black background
    assert (frame > 127).mean() < 0.25  # the ink is a stroke, not the page
    rows, cols = centre_of_mass(frame)
    assert abs(rows - MIDDLE) <= 1 and abs(cols - MIDDLE) <= 1, (rows, cols)
    assert np.abs(frame - reference).mean() < 12


def test_frame_of_an_inverted_digit(tmp_path):
    path = tmp_path / "paper.png"
    Image.fromarray(255 - seven()).save(path)  # dark ink on white paper
    assert_mnist_like(to_mnist_frame(path).numpy().astype(np.float32), reference_frame(tmp_path))


def test_frame_of_an_off_centre_digit_on_a_big_canvas(tmp_path):
    canvas = Image.new("L", (400, 300))
    canvas.paste(Image.fromarray(seven()), (320, 20))  # top right corner
    path = tmp_path / "corner.png"
    canvas.save(path)
    assert_mnist_like(to_mnist_frame(path).numpy().astype(np.float32), reference_frame(tmp_path))


def test_a_lopsided_digit_is_centred_without_wrapping_round_the_frame(tmp_path):
    """A long stroke with a heavy blob at one end: its centre of mass is further from the middle than the frame's
    margin, so centring it fully would push the stroke's far end out of one side (and np.roll back in at the other)."""
    image = Image.new("L", (200, 60))
    draw = ImageDraw.Draw(image)
    draw.line([(0, 30), (199, 30)], fill=255, width=3)
    draw.rectangle([140, 0, 199, 59], fill=255)
    path = tmp_path / "lopsided.png"
    image.save(path)
    ink_columns = np.nonzero(to_mnist_frame(path).numpy().any(axis=0))[0]
    assert (np.diff(ink_columns) == 1).all(), ink_columns  # one unbroken run of columns: nothing wrapped round


def test_frame_of_an_rgb_digit(tmp_path):
    rgb = np.zeros((*seven().shape, 3), dtype=np.uint8)
    rgb[..., 2] = seven()  # blue ink on black
    rgb[..., 0] = seven() // 2
    path = tmp_path / "blue.png"
    Image.fromarray(rgb).resize((96, 128), Image.Resampling.BILINEAR).save(path)
    assert_mnist_like(to_mnist_frame(path).numpy().astype(np.float32), reference_frame(tmp_path))


def test_exif_rotation_is_applied(tmp_path):
    stored = Image.fromarray(seven()).transpose(Image.Transpose.ROTATE_90)  # what a camera held sideways writes
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    path = tmp_path / "phone.png"
    stored.save(path, exif=exif)
    assert_mnist_like(to_mnist_frame(path).numpy().astype(np.float32), reference_frame(tmp_path))
