"""Benchmark builders: decoded tensors in, Avalanche benchmarks out.

The protocol of every benchmark (class splits, permutations, models, epochs)
is documented in ``cl_bayes.protocols``. ``build_benchmark`` returns the
Avalanche benchmark that strategies train on, plus the same evaluation data as
plain tensors, so the runner can score every experience with one batched
forward pass instead of per-sample data loading.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.benchmarks.utils.classification_dataset import (
    _make_taskaware_tensor_classification_dataset as tensor_dataset,
)
from torch import Tensor

from cl_bayes import data
from cl_bayes.config import ConfigError, RunConfig
from cl_bayes.protocols import BENCHMARKS


@dataclass
class ExperienceTensors:
    x: Tensor  # float inputs in [0, 1], (N, C, H, W)
    y: Tensor  # int64 labels
    task: int  # task label (always 0 outside task-incremental benchmarks)
    classes: list[int]


@dataclass
class BenchmarkBundle:
    name: str
    scenario: str  # "task", "class" or "domain"
    benchmark: object  # the Avalanche benchmark (train_stream, test_stream)
    train: list[ExperienceTensors]
    eval: list[ExperienceTensors]  # test data, or validation data when evaluate_on="validation"
    num_classes: int
    input_shape: tuple[int, ...]
    class_masks: Tensor | None  # (tasks, classes) bool, task-incremental only
    data_source: str

    @property
    def n_experiences(self) -> int:
        return len(self.train)


def _subset(idx: np.ndarray, n: int | None, rng: np.random.Generator) -> np.ndarray:
    if n is None or n >= len(idx):
        return idx
    return np.sort(rng.choice(idx, size=n, replace=False))


def _split_holdout(idx: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    perm = rng.permutation(idx)
    n_val = max(1, int(round(fraction * len(idx))))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def pixel_permutations(n_experiences: int, n_pixels: int, seed: int, first_unpermuted: bool) -> list[np.ndarray]:
    """One permutation of the pixel indices per experience, drawn from ``seed``."""
    rng = np.random.default_rng([seed, 1])
    perms = [rng.permutation(n_pixels) for _ in range(n_experiences)]
    if first_unpermuted:
        perms[0] = np.arange(n_pixels)
    return perms


def build_benchmark(config: RunConfig, *, data_root=None) -> BenchmarkBundle:
    """Build the benchmark ``config.benchmark`` for ``config.seed`` (see cl_bayes.protocols)."""
    spec = BENCHMARKS[config.benchmark]
    ds = data.load(spec.dataset, None if data_root is None else str(data_root))
    rng = np.random.default_rng([config.seed, 0])
    train_x = ds.train_x.float().div_(255)
    test_x = ds.test_x.float().div_(255)
    train_y, test_y = ds.train_y, ds.test_y
    num_classes = int(train_y.max()) + 1
    input_shape = tuple(train_x.shape[1:])

    if spec.scenario == "domain":
        groups = [list(range(num_classes))] * spec.n_experiences
    else:
        per = num_classes // spec.n_experiences
        groups = [list(range(i * per, (i + 1) * per)) for i in range(spec.n_experiences)]

    train, evaluation = [], []
    perms = None
    if spec.scenario == "domain":
        perms = pixel_permutations(spec.n_experiences, int(np.prod(input_shape)), config.seed, config.first_unpermuted)
    for i, classes in enumerate(groups):
        tr_idx = np.flatnonzero(np.isin(train_y.numpy(), classes))
        te_idx = np.flatnonzero(np.isin(test_y.numpy(), classes))
        if config.evaluate_on == "validation":
            tr_idx, va_idx = _split_holdout(tr_idx, config.validation_fraction, rng)
            ev_x, ev_y, ev_idx = train_x, train_y, va_idx
        else:
            ev_x, ev_y, ev_idx = test_x, test_y, te_idx
        tr_idx = _subset(tr_idx, config.train_per_experience, rng)
        ev_idx = _subset(ev_idx, config.test_per_experience, rng)
        for what, labels in (("train_per_experience", train_y[tr_idx]), ("test_per_experience", ev_y[ev_idx])):
            missing = sorted(set(classes) - set(labels.tolist()))
            if missing:
                raise ConfigError(f"{what} is too small: experience {i} has no example of class {missing[0]}")
        xs = [train_x[tr_idx], ev_x[ev_idx]]
        if perms is not None:
            p = torch.from_numpy(perms[i])
            xs = [x.flatten(1)[:, p].reshape(x.shape) for x in xs]
        task = i if spec.scenario == "task" else 0
        train.append(ExperienceTensors(xs[0], train_y[tr_idx], task, classes))
        evaluation.append(ExperienceTensors(xs[1], ev_y[ev_idx], task, classes))

    class_masks = None
    if spec.scenario == "task":
        class_masks = torch.zeros(spec.n_experiences, num_classes, dtype=torch.bool)
        for i, classes in enumerate(groups):
            class_masks[i, classes] = True

    def avalanche_dataset(e: ExperienceTensors):
        return tensor_dataset(e.x, e.y, task_labels=e.task)

    benchmark = nc_benchmark(
        [avalanche_dataset(e) for e in train],
        [avalanche_dataset(e) for e in evaluation],
        n_experiences=spec.n_experiences,
        task_labels=spec.scenario == "task",
        shuffle=False,
        one_dataset_per_exp=True,
        class_ids_from_zero_in_each_exp=spec.scenario == "domain",  # keep labels 0..9 everywhere
        class_ids_from_zero_from_first_exp=False,
    )
    return BenchmarkBundle(
        name=config.benchmark,
        scenario=spec.scenario,
        benchmark=benchmark,
        train=train,
        eval=evaluation,
        num_classes=num_classes,
        input_shape=input_shape,
        class_masks=class_masks,
        data_source=ds.source,
    )
