"""`lenet-dist predict` on users' files, in-process: a random LeNet-5 is enough to show that each hostile file is
one line on stderr while the others are classified, and the frames are compared directly. Whether a model reads
photographed digits as it reads MNIST's own takes a trained one: a module fixture trains LeNet-5 for a few seconds.
One slow test runs the command itself on a trained run. The files are made by tests/images.py and tests/handwriting.py.
"""

from __future__ import annotations

import json
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from handwriting import Style, handwritten
from images import (
    animated,
    blank_page,
    empty,
    flat_png,
    folder,
    palette_with_transparency,
    photographed,
    product_photo,
    seven,
    sheet_on_a_desk,
    sixteen_bit,
    specks,
    text_file,
    truncated,
    with_transparent_background,
)
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from conftest import BIN, ROOT, call, run_cli
from lenet_dist import cli
from lenet_dist.cadence import RunState
from lenet_dist.checkpoint import PROGRESS_FILE, WEIGHTS_FILE, export_weights
from lenet_dist.config import PredictConfig, TrainConfig
from lenet_dist.data import DATASETS, load_split, normalize
from lenet_dist.errors import SIGPIPE_STATUS
from lenet_dist.model import LeNet5
from lenet_dist.predict.classify import load_trained, run
from lenet_dist.predict.frames import FRAME, MNIST_CENTRE, to_frame
from lenet_dist.predict.photos import MAX_MEGAPIXELS


def export_run(folder: Path, dataset: str = "mnist", model: torch.nn.Module | None = None) -> Path:
    """A finished run's output dir as `lenet-dist train` leaves it for predict: the weights, the config beside them."""
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    export_weights(model or LeNet5(), folder, {"config": {"dataset": dataset}, "num_classes": 10})
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return export_run(tmp_path_factory.mktemp("run"))


def reference_frame(tmp_path: Path) -> np.ndarray:
    path = tmp_path / "reference.png"
    Image.fromarray(seven()).save(path)
    return to_frame(path).numpy().astype(np.float32)


def centre_of_mass(frame: np.ndarray) -> tuple[float, float]:
    rows, cols = np.indices(frame.shape)
    return float((rows * frame).sum() / frame.sum()), float((cols * frame).sum() / frame.sum())


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
    "blank-page": (lambda tmp: blank_page(tmp / "blank.jpg"), "the image is blank (only paper, no ink stands out)"),
    "only-specks": (lambda tmp: specks(tmp / "specks.png"), "no digit stands out, only specks or noise"),
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


@pytest.mark.parametrize("levels", [65536, 4096], ids=["16-bit", "12-bit-in-16"])
def test_sixteen_bit_png_gives_the_8_bit_frame(levels, model_dir, tmp_path, capsys):
    digit = seven()
    eight, sixteen = tmp_path / "eight.png", tmp_path / "sixteen.png"
    Image.fromarray(digit).save(eight)
    sixteen_bit(digit, levels).save(sixteen)
    with Image.open(sixteen) as saved:
        assert saved.mode in ("I;16", "I")  # PIL reads it back as 16-bit, which convert("L") would clip to white
    expected, got = to_frame(eight).int(), to_frame(sixteen).int()
    assert (expected - got).abs().max() <= 2  # 12 bits quantise the soft edges a little
    status, out, _, _ = predict(model_dir, [eight, sixteen], capsys)
    assert status == 0 and out[0].split(":", 1)[1] == out[1].split(":", 1)[1]  # same class and probabilities


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
    frame = to_frame(path).numpy().astype(np.float32)
    assert np.abs(frame - reference_frame(tmp_path)).mean() < 8, mode  # 1-bit and a palette threshold the soft edges


def assert_mnist_like(frame: np.ndarray, reference: np.ndarray) -> None:
    """White ink on black, centred by its centre of mass, and the same digit as the reference."""
    assert frame.shape == (FRAME, FRAME)
    assert frame.max() >= 250 and np.median(frame) <= 5  # white ink on a black background
    assert (frame > 127).mean() < 0.25  # the ink is a stroke, not the page
    rows, cols = centre_of_mass(frame)  # where MNIST's are: (14.0, 14.0) on average, up to rounding to whole pixels
    assert abs(rows - MNIST_CENTRE) <= 0.5 and abs(cols - MNIST_CENTRE) <= 0.5, (rows, cols)
    assert np.abs(frame - reference).mean() < 12


def test_frame_of_an_inverted_digit(tmp_path):
    path = tmp_path / "paper.png"
    Image.fromarray(255 - seven()).save(path)  # dark ink on white paper
    assert_mnist_like(to_frame(path).numpy().astype(np.float32), reference_frame(tmp_path))


def test_frame_of_an_off_centre_digit_on_a_big_canvas(tmp_path):
    canvas = Image.new("L", (400, 300))
    canvas.paste(Image.fromarray(seven()), (320, 20))  # top right corner
    path = tmp_path / "corner.png"
    canvas.save(path)
    assert_mnist_like(to_frame(path).numpy().astype(np.float32), reference_frame(tmp_path))


def test_a_lopsided_digit_is_centred_without_wrapping_round_the_frame(tmp_path):
    """A long stroke with a heavy blob at one end: its centre of mass is further from the middle than the frame's
    margin, so centring it fully would push the stroke's far end out of one side (and np.roll back in at the other)."""
    image = Image.new("L", (200, 60))
    draw = ImageDraw.Draw(image)
    draw.line([(0, 30), (199, 30)], fill=255, width=3)
    draw.rectangle([140, 0, 199, 59], fill=255)
    path = tmp_path / "lopsided.png"
    image.save(path)
    ink_columns = np.nonzero(to_frame(path).numpy().any(axis=0))[0]
    assert (np.diff(ink_columns) == 1).all(), ink_columns  # one unbroken run of columns: nothing wrapped round


def test_frame_of_an_rgb_digit(tmp_path):
    rgb = np.zeros((*seven().shape, 3), dtype=np.uint8)
    rgb[..., 2] = seven()  # blue ink on black
    rgb[..., 0] = seven() // 2
    path = tmp_path / "blue.png"
    Image.fromarray(rgb).resize((96, 128), Image.Resampling.BILINEAR).save(path)
    assert_mnist_like(to_frame(path).numpy().astype(np.float32), reference_frame(tmp_path))


def test_exif_rotation_is_applied(tmp_path):
    stored = Image.fromarray(seven()).transpose(Image.Transpose.ROTATE_90)  # what a camera held sideways writes
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    path = tmp_path / "phone.png"
    stored.save(path, exif=exif)
    assert_mnist_like(to_frame(path).numpy().astype(np.float32), reference_frame(tmp_path))


# --- photographed digits: real MNIST test digits as a phone photographs them on a page --------------------------

PHOTOGRAPHED_DIGITS = 30
# case: what the page looks like (paper and ink brightness 0..255, the page's size, the digit's height and corner)
PAGES: dict[str, dict] = {
    "dark-ink-on-grey-paper": {"paper": 110, "ink": 30},  # under-exposed: the paper is darker than mid-grey
    "dark-ink-in-a-shadow": {"paper": 225, "ink": 40, "shadow": 0.55},  # white paper, its far side at 45 % of the light
    "chalk-on-a-blackboard": {"paper": 45, "ink": 200, "shadow": 0.3},  # light ink on dark
    "cropped-close": {"paper": 180, "ink": 50, "size": (140, 150), "height": 112, "corner": (14, 20)},
    "a-white-sheet-on-a-dark-desk": {"paper": 225, "ink": 40, "desk": 45},  # the desk, not the sheet, at the border
    "a-hard-edged-shadow-across-the-digit": {"paper": 225, "ink": 40, "shadow": 0.1, "shadow_edge": 290},
}


@pytest.fixture(scope="module")
def digits(data_dir) -> tuple[np.ndarray, list[str]]:
    test = load_split(data_dir, "test", "mnist")
    return test.images[:PHOTOGRAPHED_DIGITS].numpy(), [str(int(label)) for label in test.labels[:PHOTOGRAPHED_DIGITS]]


@pytest.fixture(scope="module")
def photos(digits, tmp_path_factory) -> dict[str, list[Path]]:
    """Each page of PAGES with each digit on it, as JPEG files; "clean": the digits themselves, as PNG files."""
    folder, rng = tmp_path_factory.mktemp("photos"), np.random.default_rng(0)
    files = {"clean": []}
    for i, digit in enumerate(digits[0]):
        files["clean"].append(folder / f"clean-{i}.png")
        Image.fromarray(digit).save(files["clean"][-1])
    for page, looks in PAGES.items():
        files[page] = [folder / f"{page}-{i}.jpg" for i in range(len(digits[0]))]
        for path, digit in zip(files[page], digits[0], strict=True):
            path.write_bytes(photographed(digit, rng, **looks))
    return files


def likeness(frame: np.ndarray, original: np.ndarray) -> float:
    """The correlation of two frames, the better of the 3×3 one-pixel shifts: MNIST's centring rounds its shift to
    whole pixels, and a photographed digit's centre of mass lands a fraction of a pixel from the original's."""
    frame, original = frame.astype(np.float64), original.astype(np.float64)
    return max(np.corrcoef(np.roll(frame, shift, axis=(0, 1)).ravel(), original.ravel())[0, 1]
               for shift in [(rows, cols) for rows in (-1, 0, 1) for cols in (-1, 0, 1)])


@pytest.mark.parametrize("page", ["clean", *PAGES])
def test_photographed_digits_give_mnist_s_frames(page, photos, digits):
    scores = [likeness(to_frame(path).numpy(), original) for path, original in zip(photos[page], digits[0],
                                                                                  strict=True)]
    assert min(scores) > 0.8 and np.mean(scores) > 0.93, (page, np.round(scores, 2))
    if page == "clean":  # a 28×28 MNIST digit comes back as it was, give or take a resampled grey level
        differences = [np.abs(to_frame(path).numpy().astype(np.float32) - original).mean()
                       for path, original in zip(photos[page], digits[0], strict=True)]
        assert max(differences) < 1, np.round(differences, 1)


@pytest.fixture(scope="module")
def trained_model_dir(data_dir, tmp_path_factory) -> Path:
    """LeNet-5 after one pass of the recipe over 16,384 MNIST digits (~96 % on the test set; a few seconds on one
    core), exported as a run is."""
    from lenet_dist.recipe.build import build_model, build_optimizer
    from lenet_dist.recipe.lr_schedule import build_lr_scheduler

    train, images, batch = load_split(data_dir, "train", "mnist"), 16_384, 64
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: the small batches would only wait for each other on more
    try:
        torch.manual_seed(0)
        config = TrainConfig()
        model = build_model(config, num_classes=10)
        optimizer = build_optimizer(config, model)
        schedule = build_lr_scheduler(config, optimizer, steps_per_epoch=images // batch)
        inputs, labels = normalize(train.images[:images], train.info), train.labels[:images]
        for start in range(0, images, batch):
            batch_slice = slice(start, start + batch)
            loss = torch.nn.functional.cross_entropy(model(inputs[batch_slice]), labels[batch_slice])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    finally:
        torch.set_num_threads(threads)
    return export_run(tmp_path_factory.mktemp("trained"), model=model.eval())


def test_a_trained_model_reads_photographed_digits_as_it_reads_clean_ones(trained_model_dir, photos, digits, capsys):
    correct = {}
    for page, files in photos.items():
        status = run(PredictConfig(model=str(trained_model_dir), images=list(map(str, files)), json=True))
        answers = [json.loads(line)["prediction"] for line in capsys.readouterr().out.splitlines()]
        assert status == 0 and len(answers) == len(files)
        correct[page] = sum(answer == label for answer, label in zip(answers, digits[1], strict=True))
    assert correct["clean"] >= PHOTOGRAPHED_DIGITS - 3, correct
    assert all(count >= correct["clean"] - 2 for count in correct.values()), correct


def test_dark_ink_on_grey_paper_is_inverted(tmp_path):
    """Not decided by the median: this paper (110 of 255) is darker than mid-grey, and its ink darker still."""
    page = np.where(seven() > 127, 30, 110).astype(np.uint8)
    path = tmp_path / "grey.png"
    Image.fromarray(page).save(path)
    assert_mnist_like(to_frame(path).numpy().astype(np.float32), reference_frame(tmp_path))


# --- handwriting as scanned: other pens, slants and scanners than MNIST's (tests/handwriting.py) -------------------

HANDWRITTEN_DIGITS = 40


@pytest.fixture(scope="module")
def scans(data_dir, tmp_path_factory) -> tuple[list[Path], np.ndarray, list[str], list[Style]]:
    """The last HANDWRITTEN_DIGITS MNIST test digits, each rewritten and scanned in a random style: the files, the
    frames MNIST itself would have made of the drawings, the labels, the styles."""
    test = load_split(data_dir, "test", "mnist")
    folder, files = tmp_path_factory.mktemp("scans"), []
    written = handwritten(test.images[-HANDWRITTEN_DIGITS:].numpy())
    for i, (data, _, style) in enumerate(written):
        files.append(folder / f"scan-{i}.{'jpg' if style.jpeg else 'png'}")
        files[-1].write_bytes(data)
    labels = [str(int(label)) for label in test.labels[-HANDWRITTEN_DIGITS:]]
    return files, np.stack([ideal for _, ideal, _ in written]), labels, [style for _, _, style in written]


def test_scanned_handwriting_gives_mnist_s_frames(scans):
    """Whatever the pen (a hairline shrunk 40 times is a grey trace; a marker fills the loops), the frame's strokes
    are as wide as MNIST's: close to the frame MNIST made of the same pen drawn mid-width."""
    files, ideal, _, styles = scans
    frames = [to_frame(path).numpy() for path in files]
    assert all(frame.max() == 255 for frame in frames)  # a faint hairline is stretched as MNIST's ink is
    widths = [(frame > 127).sum() / max(1, skeleton_length(frame)) for frame in frames]
    assert 0.8 < min(widths) and max(widths) < 4, [(s.pen, round(w, 1)) for s, w in zip(styles, widths, strict=True)]
    scores = [likeness(frame, original) for frame, original in zip(frames, ideal, strict=True)]
    assert np.mean(scores) > 0.8, np.round(scores, 2)


def skeleton_length(frame: np.ndarray) -> int:
    """About the strokes' length in pixels: the inked pixels' outline, halved."""
    ink = np.pad(frame > 127, 1)
    return int(((ink[1:] != ink[:-1]).sum() + (ink[:, 1:] != ink[:, :-1]).sum()) // 2)


def test_a_trained_model_reads_scanned_handwriting_as_mnist_framed_it(trained_model_dir, scans, capsys):
    """predict's frames lose no more digits than MNIST's own framing of the same drawings does."""
    files, ideal, labels, _ = scans
    status = run(PredictConfig(model=str(trained_model_dir), images=list(map(str, files)), json=True))
    answers = [json.loads(line)["prediction"] for line in capsys.readouterr().out.splitlines()]
    model, _ = load_trained(trained_model_dir)
    with torch.no_grad():
        expected = model(normalize(torch.from_numpy(ideal), DATASETS["mnist"])).argmax(dim=1).tolist()
    ours = sum(answer == label for answer, label in zip(answers, labels, strict=True))
    mnist_s = sum(str(answer) == label for answer, label in zip(expected, labels, strict=True))
    assert status == 0 and ours >= mnist_s - 1 and ours >= 0.85 * HANDWRITTEN_DIGITS, (ours, mnist_s)


def test_a_digit_touching_the_frame_is_not_taken_for_a_shadow(tmp_path):
    """Ink that reaches the border is two levels there, as a hard-edged shadow is; it is still ink, not paper."""
    digit = np.asarray(Image.fromarray(seven()).resize((240, 320), Image.Resampling.BICUBIC))
    rows, cols = np.flatnonzero((digit > 127).any(axis=1)), np.flatnonzero((digit > 127).any(axis=0))
    path = tmp_path / "touching.png"
    Image.fromarray(255 - digit[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]).save(path)  # dark on white, cropped
    assert likeness(to_frame(path).numpy(), reference_frame(tmp_path)) > 0.9


@pytest.mark.parametrize("share", [(0.3, 0.4), (0.45, 0.8), (0.5, 0.78), (0.55, 0.6), (0.8, 0.8)],
                         ids=lambda share: f"{share[0]:.0%}x{share[1]:.0%}")
def test_a_sheet_on_a_desk_is_cut_out_however_little_of_the_photo_it_fills(share, digits, tmp_path):
    """A sheet narrower than half the photo has no row or column over half light: it is found all the same."""
    four = digits[0][digits[1].index("4")]
    frame = to_frame(sheet_on_a_desk(four, tmp_path / "desk.jpg", share)).numpy()
    assert likeness(frame, four) > 0.9 and (frame > 127).mean() < 0.25  # the digit, not the sheet as a blob of ink


# --- the data set a model was trained on decides the frame ----------------------------------------------------------

def ink_box(frame: np.ndarray) -> tuple[int, int]:
    rows, cols = np.flatnonzero((frame > 50).any(axis=1)), np.flatnonzero((frame > 50).any(axis=0))
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def test_fashion_items_fill_the_frame_as_fashion_mnist_s_do(fashion_dir, tmp_path):
    items = load_split(fashion_dir, "test", "fashion-mnist").images[:20].numpy()
    frames = [to_frame(product_photo(item, tmp_path / f"item-{i}.jpg"), "fashion-mnist").numpy()
              for i, item in enumerate(items)]
    scores = [likeness(frame, item) for frame, item in zip(frames, items, strict=True)]
    assert np.mean(scores) > 0.9, np.round(scores, 2)
    assert all(max(ink_box(frame)) >= 27 for frame in frames)  # the longer side fills the frame, as in the data set
    assert max(ink_box(to_frame(tmp_path / "item-0.jpg", "mnist").numpy())) <= 21  # MNIST's 20×20 box: not these


def test_the_model_s_data_set_decides_the_frame(tmp_path, capsys):
    fashion = export_run(tmp_path / "fashion-run", "fashion-mnist")
    image = tmp_path / "seven.png"
    Image.fromarray(seven()).save(image)
    status = run(PredictConfig(model=str(fashion), images=[str(image)], json=True, save_inputs=str(tmp_path / "in")))
    answer = json.loads(capsys.readouterr().out)
    assert status == 0 and answer["prediction"] in DATASETS["fashion-mnist"].classes
    saved = np.asarray(Image.open(answer["saved_input"]))
    assert np.array_equal(saved, to_frame(image, "fashion-mnist").numpy()) and max(ink_box(saved)) >= 27


# --- --model: a run's output dir or one of its checkpoints ----------------------------------------------------------

def checkpoint_folder(folder: Path, dataset: str, progress: str | None = None) -> Path:
    """What checkpoint.py writes into checkpoints/step-N/ that predict reads: weights with their class count only,
    and progress.json with the run's trajectory (its data set among it)."""
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    save_file(LeNet5().state_dict(), str(folder / WEIGHTS_FILE), metadata={"num_classes": "10"})
    state = RunState(global_step=8, trajectory=TrainConfig(dataset=dataset).trajectory())
    (folder / PROGRESS_FILE).write_text(progress if progress is not None else json.dumps(state.__dict__))
    return folder


def test_a_checkpoint_folder_is_read_with_its_run_s_data_set(tmp_path, capsys):
    checkpoint = checkpoint_folder(tmp_path / "run" / "checkpoints" / "step-00000008", "fashion-mnist")
    image = tmp_path / "seven.png"
    Image.fromarray(seven()).save(image)
    for model in (checkpoint, checkpoint / WEIGHTS_FILE):
        status = run(PredictConfig(model=str(model), images=[str(image)], json=True))
        assert status == 0 and json.loads(capsys.readouterr().out)["prediction"] in DATASETS["fashion-mnist"].classes


def test_an_unfinished_run_as_the_model_names_its_newest_checkpoint(tmp_path, capsys):
    for step in (8, 16):
        checkpoint_folder(tmp_path / "run" / "checkpoints" / f"step-{step:08d}", "mnist")
    image = tmp_path / "seven.png"
    Image.fromarray(seven()).save(image)
    status, _, stderr = run_cli(["predict", "--model", str(tmp_path / "run"), str(image)], capsys)
    err = stderr.splitlines()
    assert status == 2 and len(err) == 1 and "its run has not finished" in err[0], err
    assert err[0].endswith(f"the newest: {tmp_path / 'run' / 'checkpoints' / 'step-00000016'}")


def test_a_checkpoint_with_a_corrupt_progress_file_is_one_line(tmp_path, capsys):
    checkpoint = checkpoint_folder(tmp_path / "step-00000008", "mnist", progress="{not json")
    image = tmp_path / "seven.png"
    Image.fromarray(seven()).save(image)
    status, _, stderr = run_cli(["predict", "--model", str(checkpoint), str(image)], capsys)
    err = stderr.splitlines()
    assert status == 1 and len(err) == 1 and err[0].startswith(f"error: {checkpoint / PROGRESS_FILE}: unreadable")
    assert "pass the run's output dir" in err[0]


def test_a_misspelt_model_flag_suggests_model(tmp_path, capsys):
    status, _, stderr = run_cli(["predict", "--modle", str(tmp_path), "seven.png"], capsys)
    err = stderr.splitlines()
    assert status == 2 and err == ["error: unrecognized arguments: --modle; did you mean --model? "
                                   "(see lenet-dist predict --help)"]


def test_a_model_that_does_not_exist_is_one_line(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    status, _, stderr = run_cli(["predict", "--model", str(missing), "seven.png"], capsys)
    err = stderr.splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith(f"error: --model {missing}: does not exist; "), err


# --- what reaches stdout --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [[], ["--json"]], ids=["text", "json"])
def test_a_reader_that_stops_early_ends_the_run_quietly(flags, model_dir, tmp_path):
    """`| head -1`: the rest of the output, over the pipe's 64 kB, meets a closed pipe, as a Unix tool's would."""
    image = tmp_path / "seven.png"
    Image.fromarray(seven()).save(image)
    command = [str(BIN / "lenet-dist"), "predict", "--model", str(model_dir), *flags, *[str(image)] * 800]
    pipeline = " ".join(command) + ' | head -1; exit "${PIPESTATUS[0]}"'
    result = subprocess.run(["bash", "-c", pipeline], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.stderr == "" and len(result.stdout.splitlines()) == 1, result.stderr[-2000:]
    assert result.returncode == SIGPIPE_STATUS  # 141, what `set -o pipefail` sees of any tool stopped so


def test_json_reports_a_failed_file_on_stdout_too(model_dir, tmp_path, capsys):
    good, missing = tmp_path / "good.png", tmp_path / "gone.png"
    Image.fromarray(seven()).save(good)
    status = run(PredictConfig(model=str(model_dir), images=[str(good), str(missing), str(good)], json=True))
    out, err = capsys.readouterr()
    answers = [json.loads(line) for line in out.splitlines()]
    assert status == 1 and [answer["file"] for answer in answers] == [str(good), str(missing), str(good)]
    assert answers[1] == {"file": str(missing), "error": f"{missing}: no such file; check the path"}
    assert "prediction" in answers[0] and "error" not in answers[2]
    assert err == f"error: {missing}: no such file; check the path\n"


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_explain_shows_the_frame_the_model_saw(as_json, model_dir, tmp_path, capsys):
    image = tmp_path / "seven.png"
    Image.fromarray(255 - seven()).save(image)
    status = run(PredictConfig(model=str(model_dir), images=[str(image)], json=as_json, explain=True))
    out, frame = capsys.readouterr().out, to_frame(image).numpy()
    assert status == 0
    if as_json:
        assert np.array_equal(np.array(json.loads(out)["frame"]), frame)
        return
    art = out.splitlines()[2:-1]  # the answer, the top edge, 28 rows, the bottom edge
    assert len(art) == FRAME and all(len(row) == 2 * FRAME + 2 for row in art)
    inked = np.array([[row[1 + 2 * col] != " " for col in range(FRAME)] for row in art])
    assert np.array_equal(inked, frame >= 26)  # the brightest tenth of the shades and up print a character


# --- --save-inputs ----------------------------------------------------------------------------------------------------

def test_save_inputs_writes_each_frame_the_model_saw(model_dir, tmp_path, capsys):
    images = [tmp_path / "a" / "seven.png", tmp_path / "b" / "seven.png", tmp_path / "a" / "seven.jpg"]
    for path in images:
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(255 - seven()).save(path)
    folder = tmp_path / "seen" / "inputs"  # made, parents too
    status = run(PredictConfig(model=str(model_dir), images=list(map(str, images)), json=True, save_inputs=str(folder)))
    saved = [Path(json.loads(line)["saved_input"]) for line in capsys.readouterr().out.splitlines()]
    assert status == 0
    assert [path.name for path in saved] == ["seven.png.28x28.png", "seven.png-2.28x28.png", "seven.jpg.28x28.png"]
    for path, image in zip(saved, images, strict=True):
        assert path.parent == folder and np.array_equal(np.asarray(Image.open(path)), to_frame(image).numpy())


def test_save_inputs_never_overwrites_an_input(model_dir, tmp_path):
    first, second = tmp_path / "seven.png", tmp_path / "seven.png.28x28.png"  # the second: named as a saved input is
    Image.fromarray(seven()).save(first)
    Image.fromarray(255 - seven()).save(second)
    before = second.read_bytes()
    status = run(PredictConfig(model=str(model_dir), images=[str(first), str(second)], save_inputs=str(tmp_path)))
    assert status == 0 and second.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "seven.png", "seven.png-2.28x28.png", "seven.png.28x28.png", "seven.png.28x28.png.28x28.png"]


@pytest.mark.parametrize("where", ["a-file", "under-a-file"])
def test_save_inputs_into_a_folder_that_cannot_be_made_is_one_line(where, model_dir, tmp_path, capsys):
    image, blocker = tmp_path / "seven.png", tmp_path / "notes.txt"
    Image.fromarray(seven()).save(image)
    blocker.write_text("a file, not a folder")
    folder = blocker if where == "a-file" else blocker / "inputs"
    status, _, stderr = run_cli(["predict", "--model", str(model_dir), "--save-inputs", str(folder), str(image)],
                                capsys)
    err = stderr.splitlines()
    assert status == 1 and err == [f"error: --save-inputs {folder}: cannot make the folder (a file is in the way); "
                                   "choose another folder"]


def test_help_says_model_is_required_and_takes_a_checkpoint(capsys):
    assert cli.command_status(["predict", "--help"]) == 0
    out = capsys.readouterr().out
    text = " ".join(out.partition("options:")[2].split())  # argparse wraps the lines
    model = text[text.index("--model RUN_DIR") : text.index("--top TOP")]
    assert "checkpoints" in model and "default" not in model, model
    assert "--model RUN_DIR" in out.partition("options:")[0]  # required: not in [brackets] in the usage line
    assert "[--model" not in out and "--save-inputs DIR" in text


@pytest.mark.slow
def test_predict_reads_users_images(logged_run, tmp_path, data_dir):
    output, _ = logged_run
    test = load_split(data_dir, "test", "mnist")
    files, truth = [], []
    for i in range(100):
        digit = test.images[i].numpy()
        if i % 4 == 1:  # dark ink on white paper
            image = Image.fromarray(255 - digit)
        elif i % 4 == 2:  # RGB and larger than 28×28
            image = Image.fromarray(digit).convert("RGB").resize((112, 112), Image.Resampling.BILINEAR)
        elif i % 4 == 3:  # off-centre on a big dark canvas
            image = Image.new("L", (90, 60))
            image.paste(Image.fromarray(digit), (50, 5))
        else:
            image = Image.fromarray(digit)
        path = tmp_path / f"digit{i:03d}.{'jpg' if i % 8 == 6 else 'png'}"
        image.save(path)
        files.append(path)
        truth.append(str(int(test.labels[i])))
    # a trained run classifies photo-like copies of test digits as it classifies the digits themselves
    # (what each odd or hostile file gets is tested above, in-process)
    result = call([str(BIN / "lenet-dist"), "predict", "--model", str(output), "--json", *map(str, files)], timeout=300)
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["file"] for a in answers] == list(map(str, files))
    correct = sum(a["prediction"] == t for a, t in zip(answers, truth, strict=True))
    clean_files = []
    for i in range(100):
        clean_files.append(tmp_path / f"clean{i:03d}.png")
        Image.fromarray(test.images[i].numpy()).save(clean_files[-1])
    clean = call([str(BIN / "lenet-dist"), "predict", "--model", str(output), "--json", *map(str, clean_files)],
                timeout=300)
    clean_correct = sum(json.loads(line)["prediction"] == t for line, t in zip(clean.stdout.splitlines(), truth,
                                                                               strict=True))
    assert correct >= clean_correct - 2, (correct, clean_correct)
    assert all(len(a["top"]) == 3 and a["top"][0]["probability"] >= a["top"][1]["probability"] for a in answers)
    text = call([str(BIN / "lenet-dist"), "predict", "--model", str(output), str(files[0])], timeout=120)
    assert text.returncode == 0 and text.stdout.startswith(f"{files[0]}: {truth[0]}   top-3:")
