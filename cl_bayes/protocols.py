"""Benchmarks and their training protocols, in one place.

| benchmark        | data          | scenario                    | experiences           | model           |
|------------------|---------------|-----------------------------|-----------------------|-----------------|
| split-mnist      | MNIST         | task-incremental (masked)   | 5 x 2 classes         | MLP 256-256     |
| split-mnist-ci   | MNIST         | class-incremental, one head | 5 x 2 classes         | MLP 256-256     |
| permuted-mnist   | MNIST         | domain-incremental          | 10 pixel permutations | MLP 100-100     |
| split-fmnist     | Fashion-MNIST | task-incremental (masked)   | 5 x 2 classes         | MLP 256-256     |
| split-fmnist-ci  | Fashion-MNIST | class-incremental, one head | 5 x 2 classes         | MLP 256-256     |
| split-cifar10    | CIFAR-10      | task-incremental (masked)   | 5 x 2 classes         | small CNN       |

Class splits are fixed: experience i holds classes 2i and 2i+1. Permuted MNIST's
first experience is the unpermuted data unless ``first_unpermuted = false``
(VCL's released code permutes every task; an MLP's first layer is indifferent
to a fixed permutation of its inputs); the permutations are drawn from the run's seed,
so the same seed gives the same permutations. Task-incremental benchmarks keep
one 10-way output layer and mask, per example, the classes outside its task:
the same as one 2-way head per task, without growing heads. Inputs are scaled
to [0, 1]; there is no augmentation.

Two protocols:

- ``paper``: the published setting. FROMP and VCL's ``split-mnist`` (MLP
  256-256, 15 epochs, batch 128) and ``permuted-mnist`` (MLP 100-100, 10
  epochs, batch 128), on all training data and all test data.
- ``quick``: the default suite's setting, small enough that every baseline on
  ``split-mnist`` and ``permuted-mnist`` with 3 seeds fits in the suite's time
  budget on 2 CPU cores: one epoch, and for permuted MNIST a seeded subset of
  each experience's training and test data.

Strategy specs (``strategies/*.toml``) may override any training field per
benchmark and protocol; the results file records the fully resolved values.
"""

from __future__ import annotations

from dataclasses import dataclass

PROTOCOLS = ("quick", "paper")


@dataclass(frozen=True)
class BenchmarkDef:
    dataset: str  # cl_bayes.data name: mnist, fmnist, cifar10
    scenario: str  # "task", "class" or "domain" incremental
    n_experiences: int
    description: str


BENCHMARKS: dict[str, BenchmarkDef] = {
    "split-mnist": BenchmarkDef("mnist", "task", 5, "Split MNIST, task-incremental (masked multi-head)"),
    "split-mnist-ci": BenchmarkDef("mnist", "class", 5, "Split MNIST, class-incremental (single head)"),
    "permuted-mnist": BenchmarkDef("mnist", "domain", 10, "Permuted MNIST, domain-incremental"),
    "split-fmnist": BenchmarkDef("fmnist", "task", 5, "Split Fashion-MNIST, task-incremental"),
    "split-fmnist-ci": BenchmarkDef("fmnist", "class", 5, "Split Fashion-MNIST, class-incremental"),
    "split-cifar10": BenchmarkDef("cifar10", "task", 5, "Split CIFAR-10, task-incremental"),
}

_MLP_SPLIT = {"model": "mlp", "hidden": [256, 256]}
_MLP_PERM = {"model": "mlp", "hidden": [100, 100]}
_CNN = {"model": "cnn", "hidden": []}

# Training fields per (benchmark, protocol); everything not listed takes the
# RunConfig default (cl_bayes.config).
TRAINING: dict[tuple[str, str], dict] = {}
for _name in ("split-mnist", "split-mnist-ci", "split-fmnist", "split-fmnist-ci"):
    TRAINING[(_name, "quick")] = {**_MLP_SPLIT, "epochs": 1, "batch_size": 128}
    TRAINING[(_name, "paper")] = {**_MLP_SPLIT, "epochs": 15, "batch_size": 128}
TRAINING[("permuted-mnist", "quick")] = {
    **_MLP_PERM, "epochs": 1, "batch_size": 128, "train_per_experience": 10000, "test_per_experience": 2000,
}
TRAINING[("permuted-mnist", "paper")] = {**_MLP_PERM, "epochs": 10, "batch_size": 128}
TRAINING[("split-cifar10", "quick")] = {
    **_CNN, "epochs": 1, "batch_size": 64, "train_per_experience": 2000, "test_per_experience": 1000,
}
TRAINING[("split-cifar10", "paper")] = {**_CNN, "epochs": 20, "batch_size": 64}
