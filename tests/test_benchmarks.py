"""Benchmark builders (cl_bayes.avalanche.benchmarks) on small slices of the real datasets.

Every example of a built benchmark is traced back to the raw dataset by its
pixels (MNIST has no two identical images, and no test image equals a training
image), which checks labels, subsets, permutations and validation splits
against the data itself rather than against the builder's own bookkeeping.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from conftest import TINY, class_colour, write_image_folder

from cl_bayes import config as C
from cl_bayes import data
from cl_bayes.avalanche.benchmarks import build_benchmark, pixel_permutations
from cl_bayes.avalanche.strategies import NoParams
from cl_bayes.protocols import BENCHMARKS

SPLIT_CLASSES = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


def config(benchmark, seed=0, **overrides):
    return C.resolve(benchmark=benchmark, strategy="naive", seed=seed, params_cls=NoParams,
                     overrides={**TINY, **overrides})


_BUILT: dict = {}


def bundle(benchmark, seed=0, **overrides):
    """Built once per module for each argument set (building is deterministic)."""
    key = (benchmark, seed, tuple(sorted(overrides.items())))
    if key not in _BUILT:
        _BUILT[key] = build_benchmark(config(benchmark, seed, **overrides))
    return _BUILT[key]


def as_uint8(x: torch.Tensor) -> np.ndarray:
    """Float inputs in [0, 1] back to the raw bytes, one row per example."""
    return (x * 255).round().to(torch.uint8).reshape(len(x), -1).numpy()


class RawIndex:
    """Raw MNIST images by their bytes: (split, index, label)."""

    def __init__(self, ds: data.TensorDataset):
        self.where = {}
        for split, xs, ys in (("train", ds.train_x, ds.train_y), ("test", ds.test_x, ds.test_y)):
            for i, (row, y) in enumerate(zip(xs.reshape(len(xs), -1).numpy(), ys.tolist(), strict=True)):
                assert row.tobytes() not in self.where, "duplicate image in MNIST"
                self.where[row.tobytes()] = (split, i, y)
        self.train_y, self.test_y = ds.train_y, ds.test_y

    def find(self, x: torch.Tensor, perm: np.ndarray | None = None) -> list[tuple[str, int, int] | None]:
        rows = as_uint8(x)
        if perm is not None:  # undo a pixel permutation: permuted[k] = original[perm[k]]
            original = np.empty_like(rows)
            original[:, perm] = rows
            rows = original
        return [self.where.get(r.tobytes()) for r in rows]


@pytest.fixture(scope="module")
def raw(mnist_root):
    return RawIndex(data.load("mnist", str(mnist_root)))


def traced(raw, exp, split, perm=None):
    """Raw indices of an experience's examples; asserts they exist in ``split`` with the same labels."""
    found = raw.find(exp.x, perm)
    assert all(f is not None for f in found), "an example is not in the raw data"
    assert {f[0] for f in found} == {split}
    assert [f[2] for f in found] == exp.y.tolist(), "label differs from the raw data's"
    return [f[1] for f in found]


def avalanche_items(dataset):
    xs, ys, ts = [], [], []
    for x, y, t in (dataset[i] for i in range(len(dataset))):
        xs.append(x)
        ys.append(int(y))
        ts.append(int(t))
    return torch.stack(xs), ys, ts


def assert_avalanche_matches(exp, tensors):
    """The Avalanche experience holds exactly the tensors' examples (any order), labels and task."""
    assert exp.task_label == tensors.task
    assert sorted(exp.classes_in_this_experience) == sorted(tensors.classes)
    ds = exp.dataset
    assert len(ds) == len(tensors.y)
    assert sorted(int(t) for t in ds.targets_task_labels) == [tensors.task] * len(tensors.y)
    assert Counter(int(y) for y in ds.targets) == Counter(tensors.y.tolist())
    xs, ys, ts = avalanche_items(ds)
    assert set(ts) == {tensors.task}
    ours = Counter(zip((r.tobytes() for r in as_uint8(tensors.x)), tensors.y.tolist(), strict=True))
    theirs = Counter(zip((r.tobytes() for r in as_uint8(xs)), ys, strict=True))
    assert ours == theirs


SPLITS = ["split-mnist", "split-mnist-ci", "split-fmnist", "split-fmnist-ci"]


@pytest.fixture
def dataset_for(request):
    def need(benchmark):
        request.getfixturevalue("fmnist_root" if BENCHMARKS[benchmark].dataset == "fmnist" else "mnist_root")

    return need


@pytest.mark.parametrize("name", SPLITS)  # not "benchmark": that is pytest-benchmark's fixture
def test_split_benchmarks(name, dataset_for):
    dataset_for(name)
    b = bundle(name)
    task_incremental = name in ("split-mnist", "split-fmnist")
    assert b.scenario == ("task" if task_incremental else "class")
    assert b.n_experiences == 5 and b.num_classes == 10 and b.input_shape == (1, 28, 28)
    assert b.data_source == ("torchvision:MNIST" if "fmnist" not in name else "torchvision:FashionMNIST")
    assert [e.classes for e in b.train] == SPLIT_CLASSES == [e.classes for e in b.eval]
    for i, (tr, ev) in enumerate(zip(b.train, b.eval, strict=True)):
        assert tr.task == ev.task == (i if task_incremental else 0)
        assert len(tr.y) == TINY["train_per_experience"] and len(ev.y) == TINY["test_per_experience"]
        for e in (tr, ev):
            assert set(e.y.tolist()) == set(SPLIT_CLASSES[i])  # both classes, nothing else
            assert e.x.dtype == torch.float32 and e.x.shape[1:] == (1, 28, 28)
            assert 0 <= float(e.x.min()) and float(e.x.max()) <= 1 and float(e.x.max()) > 0.5
            assert e.y.dtype == torch.long
    if task_incremental:
        expected = torch.zeros(5, 10, dtype=torch.bool)
        for t, (a, c) in enumerate(SPLIT_CLASSES):
            expected[t, [a, c]] = True
        assert torch.equal(b.class_masks, expected)
    else:
        assert b.class_masks is None
    bench = b.benchmark
    assert len(bench.train_stream) == len(bench.test_stream) == 5
    for exp, tr in zip(bench.train_stream, b.train, strict=True):
        assert_avalanche_matches(exp, tr)
    for exp, ev in zip(bench.test_stream, b.eval, strict=True):
        assert_avalanche_matches(exp, ev)


def test_split_mnist_examples_are_the_raw_ones(raw):
    b = bundle("split-mnist")
    for tr, ev in zip(b.train, b.eval, strict=True):
        train_idx = traced(raw, tr, "train")
        test_idx = traced(raw, ev, "test")
        assert len(set(train_idx)) == len(train_idx) and len(set(test_idx)) == len(test_idx)  # no repeats


def test_subsets_are_seeded(raw):
    a, again, other = bundle("split-mnist", seed=0), build_benchmark(config("split-mnist", seed=0)), bundle(
        "split-mnist", seed=1)
    for e1, e2, e3 in zip(a.train, again.train, other.train, strict=True):
        assert torch.equal(e1.x, e2.x) and torch.equal(e1.y, e2.y)
        assert set(traced(raw, e1, "train")) != set(traced(raw, e3, "train"))
    for e1, e3 in zip(a.eval, other.eval, strict=True):
        assert set(traced(raw, e1, "test")) != set(traced(raw, e3, "test"))


def test_no_subset_takes_all_examples_of_the_classes(raw):
    b = bundle("split-mnist-ci", test_per_experience=None)
    for ev in b.eval:
        expected = np.flatnonzero(np.isin(raw.test_y.numpy(), ev.classes))
        assert sorted(traced(raw, ev, "test")) == expected.tolist()


# --- permuted MNIST ------------------------------------------------------------------


def test_pixel_permutations():
    a = pixel_permutations(10, 784, seed=3, first_unpermuted=True)
    assert len(a) == 10
    for p in a:
        assert sorted(p.tolist()) == list(range(784))
    assert np.array_equal(a[0], np.arange(784))
    assert all(not np.array_equal(p, np.arange(784)) for p in a[1:])
    assert len({p.tobytes() for p in a}) == 10  # all different
    same = pixel_permutations(10, 784, seed=3, first_unpermuted=True)
    assert all(np.array_equal(p, q) for p, q in zip(a, same, strict=True))
    other = pixel_permutations(10, 784, seed=4, first_unpermuted=True)
    assert all(not np.array_equal(p, q) for p, q in zip(a[1:], other[1:], strict=True))
    b = pixel_permutations(10, 784, seed=3, first_unpermuted=False)
    assert not np.array_equal(b[0], np.arange(784))
    assert all(np.array_equal(p, q) for p, q in zip(a[1:], b[1:], strict=True))  # only the first changes


def test_permuted_mnist_structure(mnist_root):
    b = bundle("permuted-mnist")
    assert b.scenario == "domain" and b.n_experiences == 10 and b.class_masks is None
    for tr, ev in zip(b.train, b.eval, strict=True):
        assert tr.task == ev.task == 0
        assert tr.classes == list(range(10))
        assert set(tr.y.tolist()) == set(range(10))
        assert len(tr.y) == TINY["train_per_experience"] and len(ev.y) == TINY["test_per_experience"]
    assert len(b.benchmark.train_stream) == 10
    for exp, tr in zip(b.benchmark.train_stream, b.train, strict=True):
        assert_avalanche_matches(exp, tr)  # labels stay 0..9 in every experience
    for exp, ev in zip(b.benchmark.test_stream, b.eval, strict=True):
        assert_avalanche_matches(exp, ev)


def test_permuted_mnist_applies_the_seeds_permutations(raw):
    seed = 0
    b = bundle("permuted-mnist", seed=seed)
    perms = pixel_permutations(10, 784, seed, first_unpermuted=True)
    traced(raw, b.train[0], "train")  # experience 0 is the raw data, unpermuted
    traced(raw, b.eval[0], "test")
    for i in range(1, 10):
        assert all(f is None for f in raw.find(b.train[i].x)), "a permuted experience holds raw images"
        traced(raw, b.train[i], "train", perms[i])
        traced(raw, b.eval[i], "test", perms[i])


def test_permuted_mnist_first_experience_permuted_on_request(raw):
    b = bundle("permuted-mnist", first_unpermuted=False)
    perms = pixel_permutations(10, 784, 0, first_unpermuted=False)
    assert all(f is None for f in raw.find(b.train[0].x))
    traced(raw, b.train[0], "train", perms[0])
    traced(raw, b.eval[0], "test", perms[0])
    unpermuted = bundle("permuted-mnist")
    for i in range(1, 10):  # the other experiences are unchanged
        assert torch.equal(b.train[i].x, unpermuted.train[i].x)


def test_permutations_follow_the_seed(mnist_root):
    a, again, other = bundle("permuted-mnist", 0), build_benchmark(config("permuted-mnist", 0)), bundle(
        "permuted-mnist", 1)
    for e1, e2 in zip(a.train, again.train, strict=True):
        assert torch.equal(e1.x, e2.x)
    assert not torch.equal(a.train[1].x, other.train[1].x)


# --- validation split -----------------------------------------------------------------


def test_validation_split_is_held_out_from_the_training_data(raw):
    fraction = 0.1
    b = bundle("split-mnist-ci", evaluate_on="validation", validation_fraction=fraction,
               train_per_experience=None, test_per_experience=None)
    for tr, ev in zip(b.train, b.eval, strict=True):
        train_idx = set(traced(raw, tr, "train"))
        val_idx = set(traced(raw, ev, "train"))  # validation comes from the training set, not the test set
        assert not train_idx & val_idx
        everything = set(np.flatnonzero(np.isin(raw.train_y.numpy(), tr.classes)).tolist())
        assert train_idx | val_idx == everything
        assert len(val_idx) == round(fraction * len(everything))


def test_validation_split_with_subsets_is_seeded_and_disjoint(raw):
    a = bundle("split-mnist", evaluate_on="validation")
    other = bundle("split-mnist", seed=1, evaluate_on="validation")
    for tr, ev, ev1 in zip(a.train, a.eval, other.eval, strict=True):
        assert len(tr.y) == TINY["train_per_experience"] and len(ev.y) == TINY["test_per_experience"]
        assert not set(traced(raw, tr, "train")) & set(traced(raw, ev, "train"))
        assert set(traced(raw, ev, "train")) != set(traced(raw, ev1, "train"))
    assert [e.task for e in a.eval] == list(range(5))


# --- split CIFAR-10 through an image folder -----------------------------------------------


def test_split_cifar10_from_an_image_folder(tmp_path):
    root = tmp_path / "root"
    write_image_folder(root / "CIFAR10-jpeg", n_classes=10, n_train=4, n_test=2)
    b = build_benchmark(config("split-cifar10"), data_root=root)
    assert b.data_source.startswith("imagefolder:") and b.data_source.endswith("CIFAR10-jpeg")
    assert b.input_shape == (3, 32, 32) and b.num_classes == 10 and b.n_experiences == 5
    assert [e.classes for e in b.train] == SPLIT_CLASSES
    assert b.class_masks.sum(1).tolist() == [2] * 5
    for i, (tr, ev) in enumerate(zip(b.train, b.eval, strict=True)):
        assert tr.task == ev.task == i
        assert sorted(tr.y.tolist()) == [2 * i] * 4 + [2 * i + 1] * 4  # fewer than asked for: all of them
        assert sorted(ev.y.tolist()) == [2 * i] * 2 + [2 * i + 1] * 2
        for e in (tr, ev):
            for x, y in zip(e.x, e.y, strict=True):  # the label matches the image's class colour
                pixel = (x[:, 20, 20] * 255).round()
                assert (pixel - torch.tensor(class_colour(int(y)), dtype=torch.float32)).abs().max() <= 3
    for exp, tr in zip(b.benchmark.train_stream, b.train, strict=True):
        assert_avalanche_matches(exp, tr)
