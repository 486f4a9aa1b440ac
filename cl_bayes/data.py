"""Datasets as in-memory tensors, loaded through torchvision and decoded once.

One data root holds the torchvision layouts (``MNIST/raw``, ``FashionMNIST/raw``,
``cifar-10-batches-py``) or an image-folder copy of CIFAR-10. It comes from
``--data-root``, else the ``CL_BAYES_DATA`` environment variable, else a user
cache folder (``$XDG_CACHE_HOME/cl_bayes/data``, by default
``~/.cache/cl_bayes/data``). Loading goes through torchvision exactly as on a
user's machine: files already under the root are used, otherwise torchvision
downloads them; offline with the files absent, ``DataError`` names the root and
the files it expected.

Decoding happens once: the decoded uint8 tensors are cached as ``.pt`` files in
``$CL_BAYES_CACHE`` (default ``~/.cache/cl_bayes/tensors``) and in memory, so
epochs never pay per-sample image decoding.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

DATA_ENV = "CL_BAYES_DATA"
CACHE_ENV = "CL_BAYES_CACHE"
CIFAR_FOLDER_NAMES = ("CIFAR10-jpeg", "cifar10-imagefolder", "CIFAR10")


class DataError(RuntimeError):
    """A dataset could not be found or downloaded."""


@dataclass(frozen=True)
class TensorDataset:
    """A decoded dataset: uint8 images (N, C, H, W), int64 labels, and where they came from."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    source: str  # e.g. "torchvision:MNIST" or "imagefolder:/path/to/CIFAR10-jpeg"


def _user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cl_bayes"


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """The data root: ``explicit``, else ``$CL_BAYES_DATA``, else the user cache folder."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return _user_cache() / "data"


def tensor_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or _user_cache() / "tensors").expanduser()


def _cached(name: str, source_key: str, decode) -> TensorDataset:
    """Decode with ``decode()`` once; later calls read the ``.pt`` cache file."""
    digest = hashlib.sha1(source_key.encode()).hexdigest()[:12]
    path = tensor_cache_dir() / f"{name}-{digest}.pt"
    if path.exists():
        try:
            return TensorDataset(**torch.load(path, weights_only=True))
        except Exception:  # a corrupt cache file is rebuilt, never trusted
            path.unlink(missing_ok=True)
    ds = decode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(ds.__dict__, tmp)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs speed
    return ds


_TORCHVISION_FILES = {
    "MNIST": ("MNIST/raw", "train-images-idx3-ubyte, train-labels-idx1-ubyte, "
              "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"),
    "FashionMNIST": ("FashionMNIST/raw", "the same four idx files as MNIST"),
    "CIFAR10": ("cifar-10-batches-py", "data_batch_1..5 and test_batch"),
}


def _torchvision(name: str, root: Path):
    """(train, test) torchvision datasets; download only when the files are absent."""
    import torchvision

    cls = getattr(torchvision.datasets, name)
    try:
        return cls(str(root), train=True, download=False), cls(str(root), train=False, download=False)
    except RuntimeError:
        pass  # not there (or damaged): try the download a user's machine would do
    try:
        return cls(str(root), train=True, download=True), cls(str(root), train=False, download=True)
    except Exception as e:  # offline: URLError, socket errors, md5 mismatch ...
        folder, files = _TORCHVISION_FILES[name]
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"{name} not found under data root {root} (expected {root / folder}/: {files}) "
            f"and the download failed ({reason}); set --data-root or {DATA_ENV}"
        ) from None


def _images_to_uint8(data) -> Tensor:
    x = torch.as_tensor(data)
    if x.ndim == 3:  # (N, H, W) grey images
        x = x.unsqueeze(1)
    elif x.ndim == 4 and x.shape[-1] in (1, 3):  # (N, H, W, C) numpy layout
        x = x.permute(0, 3, 1, 2)
    return x.contiguous().to(torch.uint8)


def _decode_torchvision(name: str, root: Path) -> TensorDataset:
    train, test = _torchvision(name, root)
    return TensorDataset(
        train_x=_images_to_uint8(train.data),
        train_y=torch.as_tensor(train.targets, dtype=torch.long),
        test_x=_images_to_uint8(test.data),
        test_y=torch.as_tensor(test.targets, dtype=torch.long),
        source=f"torchvision:{name}",
    )


def _decode_image_folder(folder: Path) -> TensorDataset:
    """Decode an ImageFolder tree with ``train/`` and ``test/``, one sub-folder per class."""
    import numpy as np
    from PIL import Image
    from torchvision.datasets import ImageFolder

    splits = []
    for split in ("train", "test"):
        ds = ImageFolder(str(folder / split))
        x = np.stack([np.asarray(Image.open(p).convert("RGB")) for p, _ in ds.samples])
        splits.append((_images_to_uint8(x), torch.tensor(ds.targets, dtype=torch.long), ds.classes))
    if splits[0][2] != splits[1][2]:
        raise DataError(f"{folder}: train/ and test/ have different class folders")
    return TensorDataset(splits[0][0], splits[0][1], splits[1][0], splits[1][1], f"imagefolder:{folder}")


def find_image_folder(root: Path) -> Path | None:
    """A CIFAR-10 image-folder copy under ``root`` (``train/`` and ``test/`` inside), if any."""
    for name in CIFAR_FOLDER_NAMES:
        candidate = root / name
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    return None


def load(name: str, root: str | os.PathLike | None = None, image_folder: str | None = None) -> TensorDataset:
    """Load ``mnist``, ``fmnist`` or ``cifar10`` as uint8 tensors.

    CIFAR-10 comes from torchvision's pickled batches when they are under the
    root, else from ``image_folder`` or an image-folder copy found under the
    root (see ``CIFAR_FOLDER_NAMES``), else from torchvision's download.
    """
    return _load(name, data_root(root).resolve(), image_folder)


@lru_cache(maxsize=4)
def _load(name: str, root: Path, image_folder: str | None) -> TensorDataset:
    """``load`` for a resolved root, memoised per process."""
    if name in ("mnist", "fmnist"):
        tv = {"mnist": "MNIST", "fmnist": "FashionMNIST"}[name]
        return _cached(name, f"{tv}:{root.resolve()}", lambda: _decode_torchvision(tv, root))
    if name == "cifar10":
        if image_folder is None and not (root / "cifar-10-batches-py").is_dir():
            found = find_image_folder(root)
            image_folder = str(found) if found else None
        if image_folder is not None:
            folder = Path(image_folder).expanduser().resolve()
            if not (folder / "train").is_dir() or not (folder / "test").is_dir():
                raise DataError(f"image folder {folder} must contain train/ and test/, one folder per class")
            return _cached(name, f"imagefolder:{folder}", lambda: _decode_image_folder(folder))
        return _cached(name, f"CIFAR10:{root.resolve()}", lambda: _decode_torchvision("CIFAR10", root))
    raise DataError(f"unknown dataset '{name}' (known: mnist, fmnist, cifar10)")


load.cache_clear = _load.cache_clear  # forget decoded datasets (tests, long-lived processes)
