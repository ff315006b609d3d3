"""`make data` on a fresh checkout, `lenet-dist download` after a cut download, and how the tests report a data set
they cannot find."""

from __future__ import annotations

import gzip
import os
import sys

import pytest

from conftest import BIN, call, copy_checkout, one_line_error, require_dataset
from lenet_dist.data import load_split

sys.path.insert(0, os.path.dirname(__file__))
import provision_data  # noqa: E402  (the script `make data` runs)


@pytest.mark.slow
def test_make_data_in_a_fresh_checkout_fetches_or_skips_with_a_reason(tmp_path, data_dir):
    checkout = copy_checkout(tmp_path / "checkout")
    fashion = tmp_path / "empty"
    venv = os.path.dirname(os.path.dirname(sys.executable))
    # -o: this venv is current; a fresh checkout's newer pyproject.toml must not re-install it
    result = call(["make", "-o", f"{venv}/.installed", "data", f"VENV={venv}"], cwd=checkout, timeout=600,
                 env={"LENET_DATA_DIR": str(data_dir), "LENET_FASHION_DIR": str(fashion)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"mnist: {data_dir}" in result.stdout
    (fashion_line,) = [line for line in result.stdout.splitlines() if line.startswith("fashion-mnist: ")]
    if "not available" in fashion_line:
        assert "its tests will be skipped: " in fashion_line
    else:
        test = load_split(fashion, "test", "fashion-mnist")
        assert test.images.shape == (10_000, 28, 28)


def test_a_data_set_that_cannot_be_had_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(provision_data, "DEBIAN_FOLDER", tmp_path / "no-debian-package")
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get, no sudo
    monkeypatch.setenv("LENET_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(provision_data, "ensure_dataset", failing_download)
    provision_data.main()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["mnist", "fashion-mnist"]
    assert all("not available, its tests will be skipped: " in line for line in lines)
    assert "apt-get is not usable here" in lines[1]


def failing_download(folder, dataset):
    from lenet_dist.errors import UserError

    raise UserError(f"{dataset} not found in {folder} and the download failed (URLError)")


def test_missing_data_is_a_skip_with_the_reason_or_a_ci_failure(tmp_path, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"MNIST not found in {tmp_path}.*make data"):
        require_dataset(tmp_path, "MNIST", "MNIST")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="make data"):
        require_dataset(tmp_path, "MNIST", "MNIST")


def test_download_fetches_again_what_a_cut_download_left(mnist_sliver, tmp_path):
    """A file of torchvision's download folder that is not whole is removed so that it is fetched again (here
    offline, the fetch fails in its one line); the whole files stay."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for path in (mnist_sliver / "MNIST" / "raw").iterdir():
        (raw / f"{path.name}.gz").write_bytes(gzip.compress(path.read_bytes()))
    broken = raw / "train-images-idx3-ubyte.gz"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    result = call([str(BIN / "lenet-dist"), "download", "--data-dir", str(tmp_path)], timeout=120)
    assert result.stdout.startswith(f"removed {broken} to fetch it again: is not a whole gzip file"), result.stdout
    one_line_error(result, 1, "downloading it failed")  # offline here; online, the file is fetched again
    assert sorted(path.name for path in raw.iterdir()) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
                                                           "train-labels-idx1-ubyte.gz"]
