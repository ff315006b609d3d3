"""The data sets, MNIST and Fashion-MNIST: every file layout, each bad file named in one line, another data set's
files refused, normalisation, the loaders, the batch order every process draws alike, and a run that learns Fashion."""

from __future__ import annotations

import gzip
from types import SimpleNamespace

import pytest
import torch

from conftest import TRAIN, assert_png, call, idx_bytes, one_line_error, read_metrics, write_split
from lenet_dist.config import TrainConfig
from lenet_dist.data import (
    DATASETS,
    InMemoryDataset,
    ShuffledBatches,
    Split,
    ensure_dataset,
    epoch_order,
    load_split,
    normalize,
    read_idx,
    torchvision_dataset,
)
from lenet_dist.errors import UserError
from lenet_dist.recipe.build import build_test_loader


@pytest.fixture
def tiny():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (5, 28, 28), generator=generator), torch.tensor([3, 1, 4, 1, 5])


def test_reads_torchvision_raw_layout(tmp_path, tiny):
    images, labels = tiny
    write_split(tmp_path / "MNIST" / "raw", "test", images, labels)
    split = load_split(tmp_path, "test", "mnist")
    assert torch.equal(split.images, images.to(torch.uint8))
    assert split.labels.tolist() == [3, 1, 4, 1, 5]
    assert split.labels.dtype == torch.int64


def test_reads_the_data_sets_own_folder_the_one_holding_raw(tmp_path, tiny):
    """--data-dir data/MNIST (the folder torchvision made) as well as --data-dir data."""
    images, labels = tiny
    write_split(tmp_path / "MNIST" / "raw", "test", images, labels)
    assert torch.equal(load_split(tmp_path / "MNIST", "test", "mnist").images, images.to(torch.uint8))


def test_reads_flat_gzipped_folder(tmp_path, tiny):
    images, labels = tiny
    write_split(tmp_path, "train", images, labels, compress=True)
    split = load_split(tmp_path, "train", "mnist")
    assert torch.equal(split.images, images.to(torch.uint8))


def test_a_folder_missing_one_file_names_it(tmp_path, tiny, monkeypatch):
    """Three of the four IDX files there, the download failing (offline): the line names the one missing."""
    import torchvision.datasets

    images, labels = tiny
    write_split(tmp_path, "train", images, labels)
    write_split(tmp_path, "test", images, labels)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading t10k-labels-idx1-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(UserError, match=r"lacks t10k-labels-idx1-ubyte \(the other IDX files are there\).*put it "
                                        r"beside the others"):
        ensure_dataset(tmp_path, "mnist")


def test_bad_magic_names_the_file(tmp_path, tiny):
    path = tmp_path / "bad-idx"
    path.write_bytes(b"\x12\x34" + idx_bytes(tiny[0])[2:])
    with pytest.raises(UserError, match="bad-idx.*magic"):
        read_idx(path)


def test_truncated_file_names_the_file(tmp_path, tiny):
    path = tmp_path / "short-idx"
    path.write_bytes(idx_bytes(tiny[0])[:-10])
    with pytest.raises(UserError, match="short-idx.*header promises"):
        read_idx(path)


def test_image_and_label_counts_must_agree(tmp_path, tiny):
    images, labels = tiny
    write_split(tmp_path, "test", images, labels[:4])
    with pytest.raises(UserError, match="5 images but .* 4 labels"):
        load_split(tmp_path, "test", "mnist")


def test_a_label_outside_the_classes_names_the_file_and_the_first_bad_index(tmp_path, tiny):
    images, labels = tiny
    labels = labels.clone()
    labels[2], labels[4] = 200, 10
    write_split(tmp_path, "test", images, labels)
    with pytest.raises(UserError, match=r"t10k-labels-idx1-ubyte: label 200 at index 2 is not one of mnist's 10 "):
        load_split(tmp_path, "test", "mnist")


def test_images_that_are_not_28_by_28_name_the_file(tmp_path):
    write_split(tmp_path, "test", torch.zeros(3, 32, 32, dtype=torch.uint8), torch.tensor([1, 2, 3]))
    with pytest.raises(UserError, match=r"t10k-images-idx3-ubyte holds images of shape \(32, 32\), not 28×28"):
        load_split(tmp_path, "test", "mnist")


def test_tensor_pipeline_matches_torchvision_pipeline_exactly(data_dir):
    """The fast path must feed the model the very tensors the original script's ToTensor+Normalize produced."""
    fast = InMemoryDataset(load_split(data_dir, "test", "mnist"), torch.device("cpu"))
    original = torchvision_dataset(data_dir, "mnist", train=False)
    indices = [0, 1, 7, 4242, 9999]
    fast_images, fast_labels = fast.__getitems__(indices)
    original_images = torch.stack([original[i][0] for i in indices])
    assert torch.equal(fast_images, original_images)
    assert fast_labels.tolist() == [original[i][1] for i in indices]
    assert torch.equal(fast[7][0], original[7][0])


def shuffled(world_size: int, rank: int, images: int = 100, batch: int = 8, seed: int = 0) -> ShuffledBatches:
    split = Split(torch.zeros(images, 28, 28, dtype=torch.uint8), torch.arange(images), DATASETS["mnist"])
    return ShuffledBatches(InMemoryDataset(split, torch.device("cpu")), batch, seed, rank, world_size)


def test_shuffled_batches_drop_the_partial_batch_and_keep_one_shape():
    batches = shuffled(1, 0)
    assert len(batches) == 12  # 100 images, batch 8: the last 4 wait for another epoch's shuffle
    epoch = list(batches.epoch(0))
    assert len(epoch) == 12 and {tuple(images.shape) for images, _ in epoch} == {(8, 1, 28, 28)}
    labels = torch.cat([labels for _, labels in epoch])
    assert len(set(labels.tolist())) == 96  # no image twice in an epoch


def test_shuffled_batches_are_one_order_for_any_number_of_processes_and_after_a_resume():
    whole = [labels for _, labels in shuffled(1, 0).epoch(3)]
    halves = [[labels for _, labels in shuffled(2, rank).epoch(3)] for rank in (0, 1)]
    assert all(torch.equal(torch.cat([a, b]), w) for a, b, w in zip(*halves, whole, strict=True))
    resumed = [labels for _, labels in shuffled(1, 0).epoch(3, start=5)]
    assert all(torch.equal(a, b) for a, b in zip(resumed, whole[5:], strict=True))
    other_epoch = [labels for _, labels in shuffled(1, 0).epoch(4)]
    assert not torch.equal(torch.cat(other_epoch), torch.cat(whole))


def test_the_order_is_drawn_on_the_cpu_whatever_the_data_device(monkeypatch):
    """CUDA's randperm differs from the CPU's for one seed: a device-drawn order would change a resumed run's
    remaining batches, and what each seed was tuned on, with the device."""
    generators = []
    real = torch.randperm

    def recording(*args, generator=None, **kwargs):
        generators.append((generator.device, kwargs.get("device")))
        return real(*args, generator=generator, **kwargs)

    monkeypatch.setattr(torch, "randperm", recording)
    data = shuffled(1, 0, images=100, batch=8, seed=5)
    data.dataset.labels = data.dataset.labels.to("meta")  # a device that is not the CPU; nothing is read from it
    data.dataset.images = data.dataset.images.to("meta")
    next(data.epoch(2))
    assert generators == [(torch.device("cpu"), None)]
    expected = epoch_order(100, 5, 2)[:96].view(12, 8)
    labels = [labels for _, labels in shuffled(1, 0, seed=5).epoch(2)]
    assert torch.equal(torch.stack(labels), expected)


def test_normalize_shape_and_scale():
    batch = normalize(torch.full((2, 28, 28), 255, dtype=torch.uint8), DATASETS["mnist"])
    assert batch.shape == (2, 1, 28, 28) and batch.dtype == torch.float32
    assert torch.allclose(batch, torch.full_like(batch, (1 - 0.1307) / 0.3081))


def test_each_disk_is_provisioned_by_one_rank_only(monkeypatch, tmp_path):
    """Rank 0 first, then the first rank of every other node: two ranks of a node never download into one folder."""
    from lenet_dist import data

    fetched = []
    monkeypatch.setattr(data, "ensure_dataset", lambda folder, name: fetched.append(rank))
    monkeypatch.setattr(data, "on_every_rank", lambda work: work())  # each turn without its agreement: one rank alone
    for rank, local_rank in [(0, 0), (1, 1), (2, 0), (3, 1)]:  # two nodes of two ranks
        state = SimpleNamespace(is_main_process=rank == 0, is_local_main_process=local_rank == 0)
        data.ensure_dataset_everywhere(state, tmp_path, "mnist")
    assert fetched == [0, 2]


def test_the_in_memory_test_set_is_read_without_worker_processes(mnist_sliver):
    test = load_split(mnist_sliver, "test", "mnist")
    loader = build_test_loader(TrainConfig(workers=2), test, mnist_sliver, torch.device("cpu"), 1)
    assert loader.num_workers == 0


def test_a_truncated_gzip_file_is_named_in_one_line(mnist_sliver, tmp_path):
    flat = tmp_path / "flat"
    for path in (mnist_sliver / "MNIST" / "raw").iterdir():
        (flat / f"{path.name}.gz").parent.mkdir(exist_ok=True)
        (flat / f"{path.name}.gz").write_bytes(gzip.compress(path.read_bytes()))
    broken = flat / "train-images-idx3-ubyte.gz"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    result = call([*TRAIN, "--data-dir", str(flat), "--output-dir", str(tmp_path / "out")], timeout=60)
    one_line_error(result, 1, str(broken), "not a whole gzip file", "lenet-dist download")
    assert not (tmp_path / "out").exists()


def test_another_data_sets_files_are_refused_under_this_ones_name(fashion_dir, tmp_path):
    result = call([*TRAIN, "--data-dir", str(fashion_dir / "FashionMNIST"), "--output-dir", str(tmp_path / "out")],
                  timeout=60)
    one_line_error(result, 2, "fashion-mnist's test labels, not mnist's", "--dataset fashion-mnist")
    assert not (tmp_path / "out").exists()


def test_a_slice_of_a_data_set_is_not_taken_for_another(tmp_path, mnist_sliver):
    split = load_split(mnist_sliver, "test", "mnist")  # the md5 is of the whole published file only
    write_split(tmp_path / "MNIST" / "raw", "test", split.images[:10], split.labels[:10])
    assert len(load_split(tmp_path, "test", "mnist").labels) == 10


@pytest.mark.slow
def test_fashion_mnist(tmp_path, fashion_dir):
    result = call([*TRAIN, "--dataset", "fashion-mnist", "--data-dir", str(fashion_dir),
                  "--output-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    metrics = read_metrics(tmp_path)
    assert metrics["final_test_accuracy"] > 0.85
    assert metrics["config"]["dataset"] == "fashion-mnist"
    assert_png(tmp_path / "confusion_matrix.png")
