"""--augment (augment.py): the redrawn digits stay the digits they were, the draws are a function of (seed, epoch,
step) alone and DDP ranks share one global batch's, the default recipe never augments, and an augmented run
resumes bit-identically."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import TRAIN, call, numbers, read_metrics, same_weights
from lenet_dist.augment import (
    affine_matrices,
    augment,
    distort,
    draws_generator,
    max_pool_3x3,
    random_distortions,
)
from lenet_dist.config import RECIPES, TRAJECTORY_FIELDS, TrainConfig
from lenet_dist.data import DATASETS, InMemoryDataset, ShuffledBatches, Split, load_split, normalize
from lenet_dist.errors import UsageError

INFO = DATASETS["mnist"]
PAPER = -INFO.mean / INFO.std  # a blank pixel, normalised


@pytest.fixture(scope="module")
def test_digits(data_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """The first 256 MNIST test digits, normalised as training sees them, and their labels."""
    test = load_split(data_dir, "test", "mnist")
    return normalize(test.images[:256], INFO), test.labels[:256]


def one(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float64)


def test_no_change_gives_the_image_back_and_a_full_dilation_is_a_max_pool(test_digits):
    images = test_digits[0][:16]
    still = affine_matrices(*(torch.zeros(16, dtype=torch.float64),) * 2, *(torch.ones(16, dtype=torch.float64),) * 2,
                            torch.zeros(16, 2, dtype=torch.float64))
    assert torch.allclose(distort(images, still, torch.zeros(16), PAPER), images, atol=1e-5)
    dilated = distort(images, still, torch.ones(16), PAPER)
    assert torch.allclose(dilated, F.max_pool2d(images, 3, stride=1, padding=1), atol=1e-5)
    thinned = distort(images, still, -torch.ones(16) / 2, PAPER)
    assert torch.all(thinned <= images + 1e-5) and thinned.sum() < images.sum()  # strokes only lose ink


def test_a_fixed_transform_of_a_known_digit_is_the_one_its_parameters_name(test_digits):
    """The 7 that opens MNIST's test set rotated 10°, narrowed to 0.7, slanted 0.2 and shifted (1, -1) pixels: the
    same as PIL's affine transform of the same map, built here in pixel coordinates."""
    images, labels = test_digits
    assert int(labels[0]) == 7
    angle, shear, scale_x, scale_y, shift = math.radians(10), 0.2, 0.7, 1.0, (1.0, -1.0)
    matrix = affine_matrices(one(angle), one(shear), one(scale_x), one(scale_y), torch.tensor([shift]).double())
    ours = (distort(images[:1], matrix, torch.zeros(1), PAPER) - PAPER)[0, 0].numpy()

    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    forward = rotation @ np.array([[1, shear], [0, 1]]) @ np.diag([scale_x, scale_y])
    inverse = np.linalg.inv(forward)  # PIL asks, as affine_grid does, where each output pixel comes from
    centre = np.array([14.0, 14.0])
    offset = centre - inverse @ (centre + np.array(shift))
    ink = Image.fromarray((images[0, 0] - PAPER).numpy())
    coefficients = (*inverse[0], offset[0], *inverse[1], offset[1])
    theirs = np.asarray(ink.transform((28, 28), Image.Transform.AFFINE, coefficients, Image.Resampling.BILINEAR))
    assert np.abs(ours - theirs).max() < 0.05 * theirs.max()
    assert np.corrcoef(ours.ravel(), (images[0, 0] - PAPER).numpy().ravel())[0, 1] < 0.9  # it did move


def test_random_redraws_keep_each_digit_in_the_frame_and_recoverable(test_digits):
    """Every digit's ink stays in the frame, and undoing its draw's affine map gives the digit back (the redraw
    moved and reshaped it; it erased nothing that made it that digit)."""
    images = test_digits[0]
    matrices, strokes = random_distortions(len(images), draws_generator(0, 0, 0))
    redrawn = distort(images, matrices, torch.zeros(len(images)), PAPER) - PAPER
    ink = redrawn.sum((1, 2, 3))
    inner = redrawn[:, :, 1:-1, 1:-1].sum((1, 2, 3))
    assert torch.all(inner > 0.9 * ink)  # at most a tenth of any digit's ink on the frame's outer pixels
    undo = torch.linalg.inv(torch.cat((matrices, torch.tensor([[[0.0, 0, 1]]]).expand(len(images), 1, 3)), 1))[:, :2]
    back = (distort(redrawn + PAPER, undo, torch.zeros(len(images)), PAPER) - PAPER).flatten(1)
    original = (images - PAPER).flatten(1)
    likeness = F.cosine_similarity(back - back.mean(1, keepdim=True), original - original.mean(1, keepdim=True))
    assert likeness.min() > 0.8, likeness.min()
    assert (strokes != 0).float().mean().item() == pytest.approx(0.5, abs=0.1) and strokes.min() >= -0.5


def test_the_shifted_views_max_pool_is_max_pool2d(test_digits):
    images = test_digits[0][:32]
    for sign in (1, -1):
        assert torch.equal(max_pool_3x3(sign * images), F.max_pool2d(sign * images, 3, stride=1, padding=1))


def test_draws_are_a_function_of_seed_epoch_and_step(test_digits):
    images = test_digits[0][:32]
    first = augment(images, PAPER, seed=3, epoch=1, step=7)
    assert torch.equal(first, augment(images, PAPER, seed=3, epoch=1, step=7))
    for other in ({"seed": 4, "epoch": 1, "step": 7}, {"seed": 3, "epoch": 2, "step": 7},
                  {"seed": 3, "epoch": 1, "step": 8}):
        assert not torch.allclose(first, augment(images, PAPER, **other))


def test_two_ranks_redraw_their_halves_of_the_one_process_batch(data_dir):
    """Each rank takes its rows of the global batch's draws: 2 processes train on the same images as 1."""
    test = load_split(data_dir, "test", "mnist")
    dataset = InMemoryDataset(Split(test.images[:640], test.labels[:640], test.info), torch.device("cpu"))
    whole = list(ShuffledBatches(dataset, 64, 5, 0, 1, augment=True).epoch(1, start=3))
    halves = [list(ShuffledBatches(dataset, 64, 5, rank, 2, augment=True).epoch(1, start=3)) for rank in (0, 1)]
    assert len(whole) == len(halves[0]) == 10 - 3
    for (images, labels), left, right in zip(whole, *halves, strict=True):
        assert torch.equal(images, torch.cat((left[0], right[0])))
        assert torch.equal(labels, torch.cat((left[1], right[1])))
    plain = next(ShuffledBatches(dataset, 64, 5, 0, 1).epoch(1, start=3))
    assert torch.equal(plain[1], whole[0][1]) and not torch.equal(plain[0], whole[0][0])  # same order, redrawn


def test_only_the_predict_recipe_augments():
    assert TrainConfig().augment is False and TrainConfig(recipe="fast-to-98").augment is False
    assert TrainConfig(recipe="predict").augment is True and TrainConfig(augment=True).augment is True
    assert RECIPES["default"] == {  # the original recipe, untouched
        "epochs": 2, "batch_size": 128, "lr": 6e-3, "warmup": 0.3, "anneal_images": None,
        "final_lr_factor": 1 / 25 / 1e4, "init": "pytorch", "target_accuracy": None, "optimizer": "adam",
        "muon_lr": 0.02, "augment": False,
    }
    assert "augment" in TRAJECTORY_FIELDS  # a checkpoint made with it is refused by a run without it, and back
    with pytest.raises(UsageError, match="--augment"):
        TrainConfig(augment=True, data_pipeline="torchvision")


AUGMENTED = ["--augment", "--epochs", "2", "--batch-size", "256", "--no-progress"]  # 16 steps an epoch on the sliver


@pytest.mark.slow
def test_an_augmented_run_resumed_mid_epoch_ends_bit_identical(mnist_sliver, tmp_path):
    """Resumed from step 10 (in epoch 1), it redraws the same batches the uninterrupted run drew."""
    env = {"LENET_DATA_DIR": str(mnist_sliver)}
    uninterrupted = tmp_path / "uninterrupted"
    result = call([*TRAIN, *AUGMENTED, "--checkpoint-every", "5", "--keep-checkpoints", "10",
                   "--output-dir", str(uninterrupted)], env=env)
    assert result.returncode == 0, result.stderr
    resumed = tmp_path / "resumed"
    shutil.copytree(uninterrupted / "checkpoints" / "step-00000010", resumed / "checkpoints" / "step-00000010")
    result = call([*TRAIN, *AUGMENTED, "--output-dir", str(resumed), "--resume",
                   str(resumed / "checkpoints" / "step-00000010")], env=env)
    assert result.returncode == 0, result.stderr
    assert "epoch 1, step 10" in result.stdout, result.stdout
    assert numbers(read_metrics(resumed)) == numbers(read_metrics(uninterrupted))
    assert same_weights(resumed, uninterrupted)
