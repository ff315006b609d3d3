"""MNIST-format data sets from IDX files into memory, and the two pipelines that feed training.

Our own IDX reader also reads a flat folder of gzipped files and makes each malformed file a one-line error
naming it; torchvision is imported only to download and for its per-image pipeline.
"""

from __future__ import annotations

import hashlib
import io
import shutil
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from torch.utils.data import DataLoader, Dataset

from lenet_dist.augment import augment
from lenet_dist.config import DownloadConfig
from lenet_dist.errors import UsageError, UserError, on_every_rank
from lenet_dist.files import read_maybe_gzipped


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    torchvision_class: str  # also the folder torchvision keeps its raw files in: <data-dir>/<class>/raw/
    mean: float  # of the training images scaled to [0, 1], for Normalize
    std: float
    classes: tuple[str, ...]


DATASETS = {
    "mnist": DatasetInfo("mnist", "MNIST", 0.1307, 0.3081, tuple("0123456789")),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", "FashionMNIST", 0.2860, 0.3530,
        ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"),
    ),
    "kmnist": DatasetInfo(
        "kmnist", "KMNIST", 0.1918, 0.3483, ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")
    ),
}
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_UBYTE = 0x08
# md5 of the published test labels (the IDX payload after its header): catches a data set passed under another's name
KNOWN_TEST_LABELS = {"073c3904dfbd3e141ff8aa01cfde6b15": "mnist", "8dea97a4e78c1bd1b5a6e8efbb870b6e": "fashion-mnist"}


@dataclass
class Split:
    """One split of a data set, as read from its IDX files."""

    images: torch.Tensor  # uint8, N × 28 × 28
    labels: torch.Tensor  # int64, N
    info: DatasetInfo


def read_idx(path: Path) -> torch.Tensor:
    """Read an unsigned-byte IDX file (optionally gzipped) into a uint8 tensor."""
    raw = read_maybe_gzipped(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or not 1 <= raw[3] <= 3:
        raise UserError(f"{path} is not an unsigned-byte IDX file (bad magic number); re-download it")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path} is truncated (incomplete header); re-download it")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise UserError(f"{path} holds {len(raw)} bytes but its header promises {expected}; re-download it")
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy())


def _find_file(folder: Path, name: str, dataset: str) -> Path | None:
    """IDX file `name`, gzipped or not, in torchvision's layout (<folder>/MNIST/raw/), <folder>/raw/ or <folder>."""
    own = DATASETS[dataset].torchvision_class
    for candidate in (folder / own / "raw" / name, folder / "raw" / name, folder / name):
        for path in (candidate, candidate.with_name(candidate.name + ".gz")):
            if path.is_file():
                return path
    return None


def _missing_files(data_dir: Path, dataset: str) -> list[str]:
    return [name for pair in SPLIT_FILES.values() for name in pair if _find_file(data_dir, name, dataset) is None]


def ensure_dataset(data_dir: Path, dataset: str) -> None:
    """Download the data set with torchvision when its files are absent; fail in one line when offline."""
    missing = _missing_files(data_dir, dataset)
    if not missing:
        return
    import torchvision.datasets

    folder = DATASETS[dataset].torchvision_class
    # what a failed download would leave behind: folders that did not exist before it
    leftover = next((path for path in (data_dir, data_dir / folder) if not path.exists()), None)
    narration = io.StringIO()
    try:
        with redirect_stdout(narration):  # torchvision narrates every mirror it tries
            for train in (True, False):
                getattr(torchvision.datasets, folder)(root=str(data_dir), train=train, download=True)
    except Exception as error:  # any download failure means the same fix for the user
        if leftover is not None:
            shutil.rmtree(leftover, ignore_errors=True)
        failure = _download_failure(error, narration.getvalue())
        if len(missing) < len(SPLIT_FILES) * 2:  # a folder that is nearly there: name what it lacks
            raise UserError(
                f"{dataset} in {data_dir.resolve()} lacks {' and '.join(missing)} (the other IDX files are there), "
                f"and downloading it failed ({failure}); put {'it' if len(missing) == 1 else 'them'} beside the others "
                "(gzipped or not)"
            ) from None
        raise UserError(
            f"{dataset} not found in {data_dir.resolve()} (looked for {folder}/raw/*-ubyte, raw/*-ubyte and IDX "
            f"files, gzipped or not), and downloading it failed ({failure}); "
            "put the IDX files there or pass --data-dir / set LENET_DATA_DIR"
        ) from None


def _download_failure(error: Exception, narration: str) -> str:
    """The cause, not torchvision's summary: the last mirror's `<urlopen error ...>`, else the error's first line."""
    lines = [line.strip() for line in f"{error}\n{narration}".splitlines() if line.strip()]
    reasons = [line for line in lines if line.startswith("<")]
    return reasons[-1] if reasons else f"{type(error).__name__}: {lines[0] if lines else ''}"


def remove_unreadable_downloads(data_dir: Path, dataset: str) -> list[tuple[Path, str]]:
    """Remove the unreadable IDX files (a killed download's) in torchvision's download folder, in both forms, so that
    they are fetched again; returns each with what was wrong. Files elsewhere are the user's own and left alone."""
    raw = data_dir / DATASETS[dataset].torchvision_class / "raw"
    removed = []
    for name in (name for pair in SPLIT_FILES.values() for name in pair):
        forms = (raw / name, raw / f"{name}.gz")
        for path in (form for form in forms if form.is_file()):
            try:
                read_idx(path)
            except UserError as error:
                for form in forms:
                    form.unlink(missing_ok=True)
                removed.append((path, str(error).split(";")[0].removeprefix(f"{path} ")))
                break
    return removed


def ensure_dataset_everywhere(state: PartialState, data_dir: Path, dataset: str) -> None:
    """`ensure_dataset` once per disk, never two ranks into one folder at once: rank 0 first (one download on a shared
    disk), then each other node's first rank. A rank that cannot get the data stops every rank with its one line."""
    def here() -> None:
        ensure_dataset(data_dir, dataset)

    for turn in (state.is_main_process, state.is_local_main_process and not state.is_main_process):
        on_every_rank(here if turn else lambda: None)


def download(config: DownloadConfig) -> None:
    """`lenet-dist download`: fetch a data set now (e.g. for an offline machine), refetching unreadable downloads."""
    data_dir = config.resolved_data_dir()
    for path, problem in remove_unreadable_downloads(data_dir, config.dataset):
        print(f"removed {path} to fetch it again: {problem}", flush=True)
    ensure_dataset(data_dir, config.dataset)
    print(f"{config.dataset}: {data_dir.resolve()}")


def load_split(data_dir: Path, split: str, dataset: str) -> Split:
    image_path, label_path = (_find_file(data_dir, name, dataset) for name in SPLIT_FILES[split])
    if image_path is None or label_path is None:
        raise UserError(f"{dataset} {split} files missing in {data_dir}; pass --data-dir or set LENET_DATA_DIR")
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or tuple(images.shape[1:]) != (28, 28):
        raise UserError(f"{image_path} holds images of shape {tuple(images.shape[1:])}, not 28×28; re-download it")
    if labels.ndim != 1:
        raise UserError(f"{label_path} must hold one label per image; re-download it")
    if len(images) != len(labels):
        raise UserError(
            f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels; re-download them"
        )
    known_as = KNOWN_TEST_LABELS.get(hashlib.md5(labels.numpy().tobytes()).hexdigest())
    if known_as not in (None, dataset):
        raise UsageError(f"{label_path} holds {known_as}'s test labels, not {dataset}'s: pass --dataset {known_as} "
                         "(or --data-dir a folder of the data set you meant)")
    classes = len(DATASETS[dataset].classes)
    outside = torch.nonzero(labels >= classes)
    if len(outside):
        first = int(outside[0])
        raise UserError(f"{label_path}: label {int(labels[first])} at index {first} is not one of {dataset}'s "
                        f"{classes} classes; re-download it")
    return Split(images=images, labels=labels.long(), info=DATASETS[dataset])


def normalize(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """uint8 N×28×28 → float N×1×28×28, the same arithmetic as ToTensor() then Normalize()."""
    return images.unsqueeze(1).float().div(255).sub(info.mean).div(info.std)


class InMemoryDataset(Dataset):
    """A whole split as one uint8 tensor on the training device; `__getitems__` gathers a batch in one op."""

    def __init__(self, split: Split, device: torch.device) -> None:
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.info = split.info

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return normalize(self.images[index : index + 1], self.info)[0], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        start, stop = indices[0], indices[0] + len(indices)
        if indices == list(range(start, stop)):  # an in-order loader's batch is a slice: no index list to copy over
            return normalize(self.images[start:stop], self.info), self.labels[start:stop]
        return self.batch(torch.as_tensor(indices, device=self.labels.device))

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return normalize(self.images[index], self.info), self.labels[index]


def epoch_order(size: int, seed: int, epoch: int) -> torch.Tensor:
    """Epoch `epoch`'s (0-based) shuffle of `size` images, from (seed, epoch) alone and always on the CPU: CUDA's
    randperm gives another order for the same seed, which would make the data order depend on the device."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(size, generator=generator)


class ShuffledBatches:
    """An in-memory training set's whole batches, gathered on the data's device.

    Epoch e's order is `epoch_order(seed, e)` for any process count, device or resume; each rank takes its slice of
    every global batch (as accelerate's split_batches). Whole batches: one shape for compiled kernels and CUDA graphs.
    `augment` redraws each batch (augment.py), also from (seed, epoch, step) alone.
    """

    def __init__(self, dataset: InMemoryDataset, global_batch: int, seed: int, rank: int, world_size: int,
                 augment: bool = False) -> None:
        self.dataset, self.global_batch, self.seed, self.augment = dataset, global_batch, seed, augment
        share = global_batch // world_size
        self.rank_slice = slice(rank * share, (rank + 1) * share)

    def __len__(self) -> int:
        return len(self.dataset) // self.global_batch

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches `start`, `start` + 1, … of `epoch` (0-based), for this rank."""
        order = epoch_order(len(self.dataset), self.seed, epoch).to(self.dataset.labels.device)
        batches = order[: len(self) * self.global_batch].view(len(self), self.global_batch)[:, self.rank_slice]
        for step in range(start, len(self)):
            images, labels = self.dataset.batch(batches[step])
            if self.augment:
                images = augment(images, -self.dataset.info.mean / self.dataset.info.std, self.seed, epoch, step,
                                 self.rank_slice, self.global_batch)
            yield images, labels


def _whole_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`__getitems__` already returns a collated batch."""
    return batch


def torchvision_dataset(data_dir: Path, dataset: str, *, train: bool) -> Dataset:
    """The original script's pipeline: torchvision's data set class decoding and normalizing one PIL image at a time."""
    from torchvision import datasets, transforms

    info = DATASETS[dataset]
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((info.mean,), (info.std,))])
    if not (data_dir / info.torchvision_class / "raw").is_dir():
        raise UsageError(
            f"--data-pipeline torchvision needs {data_dir}/{info.torchvision_class}/raw/; use --data-pipeline tensor"
        )
    return getattr(datasets, info.torchvision_class)(root=str(data_dir), train=train, transform=transform)


def make_loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool, workers: int, pin_memory: bool = False,
    persistent: bool = True, drop_last: bool = False,
) -> DataLoader:
    batched = isinstance(dataset, InMemoryDataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        pin_memory=pin_memory and not batched,
        persistent_workers=persistent and workers > 0,
        collate_fn=_whole_batch if batched else None,
        drop_last=drop_last,
    )
