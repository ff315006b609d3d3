"""`make data`: put MNIST and Fashion-MNIST where the tests look for them, by whatever way works here.

MNIST goes to $LENET_DATA_DIR and Fashion-MNIST to $LENET_FASHION_DIR (both default ./data), through
torchvision's download when online. Offline, Fashion-MNIST comes from Debian's dataset-fashion-mnist
package where apt-get works, linked into the folder. A data set that cannot be had is reported in
one line; the tests that need it are then skipped with that reason (and fail under CI=true).
Always exits 0: what is missing is the tests' to report.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from lenet_dist.data import DATASETS, SPLIT_FILES, ensure_dataset
from lenet_dist.errors import UserError

DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_FOLDER = Path("/usr/share/datasets/fashion-mnist")


def fetch(dataset: str, folder: Path) -> str:
    """Where the data set now is, or raise UserError saying why it is not."""
    try:
        ensure_dataset(folder, dataset)
        return f"{folder}"
    except UserError as download_failure:
        if dataset != "fashion-mnist":
            raise
        try:
            return link_debian_copy(folder)
        except UserError as apt_failure:
            raise UserError(f"{download_failure}; {apt_failure}") from None


def link_debian_copy(folder: Path) -> str:
    """Install Debian's package if needed, then link its gzipped IDX files into torchvision's layout."""
    names = [f"{name}.gz" for pair in SPLIT_FILES.values() for name in pair]
    if not all((DEBIAN_FOLDER / name).is_file() for name in names):
        sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]  # -n: fail rather than wait for a password
        install = [*sudo, "apt-get", "install", "-y", "-q", DEBIAN_PACKAGE]
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        try:
            if subprocess.run(install, **quiet).returncode != 0:  # the package lists may be stale
                subprocess.run([*sudo, "apt-get", "update", "-q"], **quiet)
                subprocess.run(install, **quiet)
        except OSError as error:
            raise UserError(f"apt-get is not usable here ({error.strerror})") from None
        if not all((DEBIAN_FOLDER / name).is_file() for name in names):
            raise UserError(f"apt-get install {DEBIAN_PACKAGE} did not work here")
    raw = folder / DATASETS["fashion-mnist"].torchvision_class / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in names:
        link = raw / name
        if not link.exists():
            link.unlink(missing_ok=True)  # a dangling link from an earlier copy
            link.symlink_to(DEBIAN_FOLDER / name)
    return f"{folder} (linked from Debian's {DEBIAN_PACKAGE})"


def main() -> None:
    data_dir = Path(os.environ.get("LENET_DATA_DIR") or "data")
    wanted = {"mnist": data_dir, "fashion-mnist": Path(os.environ.get("LENET_FASHION_DIR") or data_dir)}
    for dataset, folder in wanted.items():
        try:
            print(f"{dataset}: {fetch(dataset, folder)}", flush=True)
        except UserError as error:
            print(f"{dataset}: not available, its tests will be skipped: {error}", flush=True)


if __name__ == "__main__":
    main()
