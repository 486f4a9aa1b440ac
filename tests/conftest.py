"""Shared set-up for the test suite.

* ``CL_BAYES_DATA`` defaults to ``../shared/data`` next to the checkout (the
  Makefile's convention); tests that need a dataset ask for the ``mnist_root``
  (or ``fmnist_root``) fixture, which skips with a clear reason when the files
  are absent.
* ``CL_BAYES_CACHE`` points at a per-session temporary folder, so decoded
  tensors are never written into the repository or the user's cache.
* torch runs on one thread: the machines running ``make test`` are small and shared.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SPECS = REPO / "strategies"
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

os.environ.setdefault("CL_BAYES_DATA", str((REPO.parent / "shared" / "data").resolve()))
torch.set_num_threads(1)

# A run small enough for seconds on one core, still real MNIST and real Avalanche templates.
TINY = {
    "train_per_experience": 200,
    "test_per_experience": 100,
    "hidden": [32],
    "batch_size": 64,
    "eval_batch_size": 500,
}


def tiny_set_args(**extra) -> list[str]:
    """``--set`` arguments for the CLI with the TINY settings (plus ``extra``)."""
    out = []
    for key, value in {**TINY, **extra}.items():
        text = str(value).replace(" ", "") if isinstance(value, list) else str(value)
        out += ["--set", f"{key}={text}"]
    return out


@pytest.fixture(scope="session", autouse=True)
def _tensor_cache(tmp_path_factory):
    """Decoded tensors go to a session temporary folder, never into the repo or ~/.cache."""
    previous = os.environ.get("CL_BAYES_CACHE")
    os.environ["CL_BAYES_CACHE"] = str(tmp_path_factory.mktemp("tensor-cache"))
    yield
    if previous is None:
        os.environ.pop("CL_BAYES_CACHE", None)
    else:
        os.environ["CL_BAYES_CACHE"] = previous


@pytest.fixture(autouse=True)
def _one_thread():
    """Code under test may change torch's thread count (suite.execute does); put it back."""
    yield
    torch.set_num_threads(1)


def _has_idx_files(folder: Path) -> bool:
    return all((folder / name).is_file() or (folder / f"{name}.gz").is_file() for name in MNIST_FILES)


@pytest.fixture(scope="session")
def data_root() -> Path:
    return Path(os.environ["CL_BAYES_DATA"])


@pytest.fixture(scope="session")
def mnist_root(data_root) -> Path:
    if not _has_idx_files(data_root / "MNIST" / "raw"):
        pytest.skip(f"MNIST not found under {data_root / 'MNIST' / 'raw'} (set CL_BAYES_DATA to a data root)")
    return data_root


@pytest.fixture(scope="session")
def fmnist_root(data_root) -> Path:
    if not _has_idx_files(data_root / "FashionMNIST" / "raw"):
        pytest.skip(f"Fashion-MNIST not found under {data_root / 'FashionMNIST' / 'raw'}")
    return data_root


@pytest.fixture
def results_root(tmp_path) -> Path:
    """An empty results root in a temporary folder."""
    root = tmp_path / "results"
    root.mkdir()
    return root


@pytest.fixture
def make_config():
    """``make_config(strategy, benchmark="split-mnist", seed=0, protocol="quick", **overrides)``:
    a RunConfig resolved exactly as the CLI does (the strategy's spec, then TINY, then ``overrides``)."""
    from cl_bayes import config as C
    from cl_bayes.avalanche import strategies

    def make(strategy="naive", benchmark="split-mnist", seed=0, protocol="quick", **overrides):
        definition = strategies.get(strategy)
        spec, path = C.load_spec(strategy, SPECS)
        return C.resolve(benchmark=benchmark, strategy=strategy, seed=seed, protocol=protocol,
                         params_cls=definition.params_cls, spec=spec, spec_path=path,
                         overrides={**TINY, **overrides})

    return make


@pytest.fixture
def tiny_config(make_config, mnist_root):
    """Naive fine-tuning on a small slice of split MNIST."""
    return make_config("naive")


def class_colour(label: int) -> tuple[int, int, int]:
    """A distinct solid colour per class for generated image folders."""
    return (20 * label + 10, 255 - 20 * label, (70 * label) % 256)


def write_image_folder(folder: Path, *, n_classes=10, n_train=3, n_test=2, size=32, class_names=None) -> Path:
    """An ImageFolder tree ``folder/{train,test}/<class>/*.png|jpg`` of solid-colour images.

    Class ``k`` (sorted folder order) is filled with ``class_colour(k)`` plus a per-image
    offset in the top-left pixel, so images differ; PNGs are lossless, JPEGs nearly so.
    """
    from PIL import Image

    names = class_names or [f"class{k:02d}" for k in range(n_classes)]
    for split, n in (("train", n_train), ("test", n_test)):
        for k, name in enumerate(sorted(names)):
            d = folder / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.empty((size, size, 3), dtype=np.uint8)
                img[:] = class_colour(k)
                img[0, 0] = (i, i, i)
                ext = "png" if i % 2 == 0 else "jpg"
                Image.fromarray(img).save(d / f"img{i}.{ext}")
    return folder
