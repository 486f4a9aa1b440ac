"""Dataset loading (cl_bayes.data): data root, offline errors, the tensor cache, image folders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import class_colour, write_image_folder

from cl_bayes import data


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty tensor cache and an empty in-memory cache for this test (restored after)."""
    cache = tmp_path / "tensor-cache"
    monkeypatch.setenv(data.CACHE_ENV, str(cache))
    data.load.cache_clear()
    yield cache
    data.load.cache_clear()


@pytest.fixture
def offline(monkeypatch):
    """torchvision's downloads fail at once, as on a machine without network."""

    def no_network(self, *args, **kwargs):
        raise OSError("network is unreachable (test)")

    for cls in (torchvision.datasets.MNIST, torchvision.datasets.CIFAR10):
        monkeypatch.setattr(cls, "download", no_network)


# --- data root -------------------------------------------------------------------------


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "env"))
    assert data.data_root(tmp_path / "explicit") == tmp_path / "explicit"  # explicit beats env
    assert data.data_root(str(tmp_path / "explicit")) == tmp_path / "explicit"
    assert data.data_root() == tmp_path / "env"  # env beats the default
    monkeypatch.setenv(data.DATA_ENV, "")  # empty counts as unset
    assert data.data_root() == tmp_path / "xdg" / "cl_bayes" / "data"
    monkeypatch.delenv(data.DATA_ENV)
    assert data.data_root() == tmp_path / "xdg" / "cl_bayes" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.data_root() == tmp_path / "home" / ".cache" / "cl_bayes" / "data"
    assert data.data_root("~/mnist") == tmp_path / "home" / "mnist"  # ~ is expanded


def test_tensor_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "c"))
    assert data.tensor_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(data.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.tensor_cache_dir() == tmp_path / "xdg" / "cl_bayes" / "tensors"


# --- missing data --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, folder, expected_file",
    [
        ("mnist", "MNIST/raw", "train-images-idx3-ubyte"),
        ("fmnist", "FashionMNIST/raw", "idx files"),
        ("cifar10", "cifar-10-batches-py", "data_batch_1"),
    ],
)
def test_missing_data_names_the_root_and_the_files(name, folder, expected_file, tmp_path, fresh, offline):
    root = tmp_path / "empty-root"
    root.mkdir()
    with pytest.raises(data.DataError) as e:
        data.load(name, str(root))
    message = str(e.value)
    assert str(root) in message
    assert str(root / folder) in message
    assert expected_file in message
    assert "network is unreachable" in message  # why the download failed
    assert data.DATA_ENV in message  # how to fix it
    assert "\n" not in message  # one line for the CLI
    assert not list(fresh.glob("*.pt"))  # nothing cached on failure


def test_missing_data_through_the_environment(tmp_path, fresh, offline, monkeypatch):
    root = tmp_path / "env-root"
    root.mkdir()
    monkeypatch.setenv(data.DATA_ENV, str(root))
    with pytest.raises(data.DataError, match=str(root / "MNIST" / "raw")):
        data.load("mnist")


def test_unknown_dataset(fresh):
    with pytest.raises(data.DataError, match="unknown dataset 'cifar100'"):
        data.load("cifar100")


# --- tensor cache ------------------------------------------------------------------------


def test_mnist_is_decoded_once_then_read_from_the_cache(mnist_root, fresh, monkeypatch):
    calls = []
    real_decode = data._decode_torchvision

    def counting_decode(name, root):
        calls.append(name)
        if len(calls) > 1:
            raise AssertionError("decoded twice: the .pt cache was not used")
        return real_decode(name, root)

    monkeypatch.setattr(data, "_decode_torchvision", counting_decode)
    first = data.load("mnist", str(mnist_root))
    files = list(fresh.glob("mnist-*.pt"))
    assert len(files) == 1 and calls == ["MNIST"]
    stamp = files[0].stat().st_mtime_ns

    data.load.cache_clear()  # a new process: only the .pt file is left
    second = data.load("mnist", str(mnist_root))
    assert calls == ["MNIST"]
    assert files[0].stat().st_mtime_ns == stamp  # read, not rewritten
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(first, field), getattr(second, field))
    assert second.source == first.source == "torchvision:MNIST"

    # the real thing: shapes, dtypes, label range
    assert first.train_x.shape == (60000, 1, 28, 28) and first.train_x.dtype == torch.uint8
    assert first.test_x.shape == (10000, 1, 28, 28)
    assert first.train_y.dtype == torch.long and set(first.train_y.unique().tolist()) == set(range(10))
    assert data.load("mnist", str(mnist_root)) is second  # in-memory cache within a process


def test_a_corrupt_cache_file_is_rebuilt(tmp_path, fresh, monkeypatch):
    folder = write_image_folder(tmp_path / "imgs", n_classes=2, n_train=2, n_test=1)
    first = data.load("cifar10", image_folder=str(folder))
    (path,) = fresh.glob("cifar10-*.pt")
    path.write_bytes(b"not a torch file")
    data.load.cache_clear()
    calls = []
    real = data._decode_image_folder
    monkeypatch.setattr(data, "_decode_image_folder", lambda f: calls.append(f) or real(f))
    again = data.load("cifar10", image_folder=str(folder))
    assert len(calls) == 1  # decoded again rather than trusting the broken file
    assert torch.equal(again.train_x, first.train_x)
    assert torch.load(path, weights_only=True)["source"] == first.source  # and the file is valid now


def test_cache_keys_separate_sources(tmp_path, fresh):
    a = data.load("cifar10", image_folder=str(write_image_folder(tmp_path / "a", n_classes=2, n_train=1, n_test=1)))
    b = data.load("cifar10", image_folder=str(write_image_folder(tmp_path / "b", n_classes=3, n_train=1, n_test=1)))
    assert len(list(fresh.glob("cifar10-*.pt"))) == 2
    assert a.train_y.tolist() == [0, 1] and b.train_y.tolist() == [0, 1, 2]


def test_an_unwritable_cache_only_costs_speed(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv(data.CACHE_ENV, str(blocker / "tensors"))
    data.load.cache_clear()
    try:
        folder = write_image_folder(tmp_path / "i", n_classes=2, n_train=1, n_test=1)
        ds = data.load("cifar10", image_folder=str(folder))
    finally:
        data.load.cache_clear()
    assert ds.train_x.shape == (2, 3, 32, 32)


# --- image folders -------------------------------------------------------------------------


def test_image_folder_shapes_labels_and_pixels(tmp_path, fresh):
    names = ["truck", "airplane", "cat"]  # labels follow sorted folder names: airplane 0, cat 1, truck 2
    folder = write_image_folder(tmp_path / "tree", class_names=names, n_train=4, n_test=2, size=32)
    ds = data.load("cifar10", image_folder=str(folder))
    assert ds.source.startswith("imagefolder:")
    assert ds.source == f"imagefolder:{folder.resolve()}"
    assert ds.train_x.shape == (12, 3, 32, 32) and ds.train_x.dtype == torch.uint8
    assert ds.test_x.shape == (6, 3, 32, 32)
    assert ds.train_y.dtype == torch.long
    assert ds.train_y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert ds.test_y.tolist() == [0, 0, 1, 1, 2, 2]
    for x, y in zip(ds.train_x, ds.train_y, strict=True):
        colour = torch.tensor(class_colour(int(y)), dtype=torch.int16)
        body = x[:, 16:, 16:].to(torch.int16)  # away from the per-image mark (JPEG rings around it)
        assert (body - colour[:, None, None]).abs().max() <= 3  # PNG exact, JPEG nearly
    pngs = ds.train_x[0::2]  # img0, img2 of every class are PNGs (lossless)
    for x, y in zip(pngs, ds.train_y[0::2], strict=True):
        assert torch.equal(x[:, 5, 5], torch.tensor(class_colour(int(y)), dtype=torch.uint8))


def test_image_folder_found_under_the_root(tmp_path, fresh):
    root = tmp_path / "root"
    write_image_folder(root / "CIFAR10-jpeg", n_classes=2, n_train=1, n_test=1)
    ds = data.load("cifar10", str(root))
    assert ds.source == f"imagefolder:{(root / 'CIFAR10-jpeg').resolve()}"
    assert data.find_image_folder(root) == root / "CIFAR10-jpeg"
    assert data.find_image_folder(tmp_path) is None


def test_image_folder_without_test_split_is_an_error(tmp_path, fresh):
    folder = tmp_path / "half"
    write_image_folder(folder, n_classes=2, n_train=1, n_test=1)
    for p in sorted((folder / "test").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (folder / "test").rmdir()
    with pytest.raises(data.DataError, match="train/ and test/"):
        data.load("cifar10", image_folder=str(folder))


def test_image_folder_with_different_classes_is_an_error(tmp_path, fresh):
    folder = write_image_folder(tmp_path / "odd", n_classes=2, n_train=1, n_test=1)
    extra = folder / "test" / "zebra"
    extra.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(extra / "z.png")
    with pytest.raises(data.DataError, match="different class folders"):
        data.load("cifar10", image_folder=str(folder))


def test_grey_and_channel_last_arrays_become_nchw():
    grey = data._images_to_uint8(np.zeros((5, 28, 28), dtype=np.uint8))
    rgb = data._images_to_uint8(np.zeros((5, 32, 32, 3), dtype=np.uint8))
    assert grey.shape == (5, 1, 28, 28) and rgb.shape == (5, 3, 32, 32)
    x = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    assert torch.equal(data._images_to_uint8(x)[1, 2], torch.from_numpy(x[1, :, :, 2]))


def test_fashion_mnist_loads(fmnist_root, fresh):
    ds = data.load("fmnist", str(fmnist_root))
    assert ds.source == "torchvision:FashionMNIST"
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_y.shape == (10000,)
    assert Path(os.environ[data.CACHE_ENV]) == fresh and len(list(fresh.glob("fmnist-*.pt"))) == 1
