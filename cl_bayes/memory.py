"""Class-balanced selection of a memory of examples from one experience.

A memory of ``memory_size`` examples is split over the classes present as
evenly as possible (``class_quotas``): every class gets
``memory_size // n_classes``; the remainder goes one slot each to the classes
with the most examples (ties: smaller class id); a class with fewer examples
than its share keeps all of them and its unused slots are shared out again
among the others (water-filling). Within a class the examples are chosen by:

* ``sensitivity``: top memory-perturbation sensitivity S_i (``sensitivity.py``;
  Nickl et al. 2023), the examples whose removal would move the model most;
* ``lambda``: top trace of the softmax Hessian, ``sum_c p_c - p_c^2`` (FROMP,
  Pan et al. 2020: points near the decision boundary are most "memorable");
* ``random``: uniformly without replacement, from a seeded generator;
* ``herding``: iCaRL herding (Rebuffi et al. 2017) on features phi (L2
  normalised by default): greedily add the example that keeps the mean of the
  chosen features closest to the class mean mu,
  ``p_k = argmin_x || mu - (phi(x) + sum_{j<k} phi(p_j)) / k ||`` without
  replacement.

All functions are pure and return int64 indices into the experience, grouped
by class (ascending class id) and, within a class, in selection order (best
score first; herding order). Cost: top-score and random selection O(N log N);
herding O(N_c m_c D) per class for m_c exemplars of D-dimensional features.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Mode = Literal["sensitivity", "lambda", "random", "herding"]


def _check_labels(labels: Tensor) -> Tensor:
    if labels.ndim != 1 or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
    return labels.long()


def _check_size(memory_size: int) -> int:
    if isinstance(memory_size, bool) or not isinstance(memory_size, int) or memory_size < 0:
        raise ValueError(f"memory_size must be a non-negative int, got {memory_size!r}")
    return memory_size


def class_quotas(labels: Tensor, *, memory_size: int) -> dict[int, int]:
    """Slots per class present in ``labels``; sums to min(memory_size, len(labels))."""
    labels = _check_labels(labels)
    remaining = min(_check_size(memory_size), labels.numel())
    classes, counts = torch.unique(labels, return_counts=True)
    active = [(int(c), int(n)) for c, n in zip(classes, counts, strict=True)]
    quotas: dict[int, int] = {}
    while active:
        share = remaining // len(active)
        small = [(c, n) for c, n in active if n <= share]
        if not small:
            break
        for c, n in small:
            quotas[c] = n
            remaining -= n
        active = [(c, n) for c, n in active if n > share]
    if active:
        share, extra = divmod(remaining, len(active))
        by_size = sorted(active, key=lambda cn: (-cn[1], cn[0]))
        for rank, (c, _) in enumerate(by_size):
            quotas[c] = share + (1 if rank < extra else 0)
    return dict(sorted(quotas.items()))


def softmax_hessian_trace(probs: Tensor) -> Tensor:
    """FROMP's lambda score per example: tr(diag(p) - p p^T) = sum_c p_c - p_c^2, (N,).

    ``probs`` (N, C) over the allowed classes (masked classes have p = 0).
    """
    if probs.ndim != 2:
        raise ValueError(f"probs must be (N, C), got {tuple(probs.shape)}")
    return (probs - probs.square()).sum(dim=-1)


def _per_class(labels: Tensor, memory_size: int, pick) -> Tensor:
    out = []
    for c, quota in class_quotas(labels, memory_size=memory_size).items():
        if quota > 0:
            members = torch.nonzero(labels == c).squeeze(-1)
            out.append(members[pick(members, quota)])
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def top_score_selection(scores: Tensor, labels: Tensor, *, memory_size: int) -> Tensor:
    """Per class, the ``quota`` examples with the highest score (ties: lower index)."""
    labels = _check_labels(labels)
    if scores.shape != labels.shape:
        raise ValueError(f"scores must have shape {tuple(labels.shape)}, got {tuple(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores must be finite")

    def pick(members: Tensor, quota: int) -> Tensor:
        return torch.sort(scores[members], descending=True, stable=True).indices[:quota]

    return _per_class(labels, memory_size, pick)


def random_selection(labels: Tensor, *, memory_size: int, seed: int) -> Tensor:
    """Per class, ``quota`` examples uniformly without replacement; deterministic given seed."""
    labels = _check_labels(labels)
    generator = torch.Generator().manual_seed(int(seed))

    def pick(members: Tensor, quota: int) -> Tensor:
        return torch.randperm(members.numel(), generator=generator)[:quota]

    return _per_class(labels, memory_size, pick)


def herding_order(features: Tensor, *, k: int) -> Tensor:
    """iCaRL herding of k rows of ``features`` (n, D) towards their mean; indices in order."""
    if features.ndim != 2:
        raise ValueError(f"features must be (n, D), got {tuple(features.shape)}")
    if not 0 <= k <= features.shape[0]:
        raise ValueError(f"k must be in [0, {features.shape[0]}], got {k}")
    mu = features.mean(dim=0)
    running = torch.zeros_like(mu)
    taken = torch.zeros(features.shape[0], dtype=torch.bool)
    order = []
    for step in range(1, k + 1):
        dist = (mu - (running + features) / step).square().sum(dim=-1)
        dist = dist.masked_fill(taken, float("inf"))
        i = int(torch.argmin(dist))
        order.append(i)
        taken[i] = True
        running = running + features[i]
    return torch.tensor(order, dtype=torch.long)


def herding_selection(features: Tensor, labels: Tensor, *, memory_size: int, normalize: bool = True) -> Tensor:
    """Per class, iCaRL herding on (L2-normalised, by default) features (N, D)."""
    labels = _check_labels(labels)
    if features.ndim != 2 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"features must be ({labels.shape[0]}, D), got {tuple(features.shape)}")
    feats = features.detach()
    if normalize:
        feats = torch.nn.functional.normalize(feats, dim=-1)

    def pick(members: Tensor, quota: int) -> Tensor:
        return herding_order(feats[members], k=quota)

    return _per_class(labels, memory_size, pick)


def select_memory(
    *,
    labels: Tensor,
    memory_size: int,
    mode: Mode,
    scores: Tensor | None = None,
    probs: Tensor | None = None,
    features: Tensor | None = None,
    seed: int | None = None,
) -> Tensor:
    """Class-balanced memory indices by ``mode``; each mode needs exactly its input.

    sensitivity: ``scores`` (N,); lambda: ``probs`` (N, C); random: ``seed``;
    herding: ``features`` (N, D).
    """
    needed = {"sensitivity": "scores", "lambda": "probs", "random": "seed", "herding": "features"}
    if mode not in needed:
        raise ValueError(f"mode must be one of {sorted(needed)}, got {mode!r}")
    given = {"scores": scores, "probs": probs, "features": features, "seed": seed}
    if given[needed[mode]] is None:
        raise ValueError(f"mode {mode!r} needs {needed[mode]}")
    if mode == "sensitivity":
        return top_score_selection(scores, labels, memory_size=memory_size)
    if mode == "lambda":
        return top_score_selection(softmax_hessian_trace(probs), labels, memory_size=memory_size)
    if mode == "random":
        return random_selection(labels, memory_size=memory_size, seed=seed)
    return herding_selection(features, labels, memory_size=memory_size)
