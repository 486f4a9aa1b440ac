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

Three rules use the sensitivity S_i but keep the memory covering the class
(issue 13: the top-S examples are the atypical, often mislabelled, ones, and a
memory of them stops covering the class). Within a class of n_c examples and
quota m_c:

* ``stratified`` (``stratified_selection``): sort the class by S and cut it
  into m_c contiguous bins of (as near as possible) equal count, bin b holding
  ranks ``[floor(b n_c / m_c), floor((b + 1) n_c / m_c))``; draw one example
  uniformly from each bin (seeded). Every sensitivity quantile is represented
  once: the memory has the class's distribution of S (low-variance random
  sampling stratified on S), so coverage is that of a random memory while the
  hardest 1/m_c of the class always gets one slot.
* ``proportional`` (``proportional_selection``): m_c draws without
  replacement, draw probability proportional to the weight ``w_i = S_i^T``
  (temperature T >= 0: T = 0 is uniform, T -> inf tends to top-k). Drawn by
  Gumbel-top-k (Efraimidis & Spirakis 2006): keys ``log w_i + G_i`` with
  G_i ~ Gumbel(0, 1) i.i.d., keep the m_c largest; this is exactly successive
  sampling without replacement, so with m_c = 1 the inclusion probability of
  i is ``w_i / sum_j w_j``. Examples with w_i = 0 are taken (uniformly) only
  when fewer than m_c weights are positive.
* ``trimmed`` (``trimmed_top_selection``): discard the top ``ceil(q n_c)`` of
  the class by S (likely mislabelled or ambiguous), but never so many that
  fewer than m_c remain, then take the top m_c of the rest.
* ``pruned`` (``pruned_random_selection``): discard the same top
  ``ceil(q n_c)`` (never leaving fewer than m_c), then draw m_c uniformly
  without replacement from the rest (seeded): a random memory of the class
  without its most sensitive (atypical, ambiguous or mislabelled) examples.
  q = 0 is ``random``.

All functions are pure and return int64 indices into the experience, grouped
by class (ascending class id) and, within a class, in selection order (best
score first; herding order). Cost: top-score and random selection O(N log N);
herding O(N_c m_c D) per class for m_c exemplars of D-dimensional features;
stratified, proportional, trimmed and pruned O(N log N).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Mode = Literal["sensitivity", "lambda", "random", "herding", "stratified", "proportional", "trimmed", "pruned"]


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
    _check_scores(scores, labels)

    def pick(members: Tensor, quota: int) -> Tensor:
        return torch.sort(scores[members], descending=True, stable=True).indices[:quota]

    return _per_class(labels, memory_size, pick)


def _check_scores(scores: Tensor, labels: Tensor, *, nonnegative: bool = False) -> None:
    if scores.shape != labels.shape:
        raise ValueError(f"scores must have shape {tuple(labels.shape)}, got {tuple(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores must be finite")
    if nonnegative and bool((scores < 0).any()):
        raise ValueError("scores must be non-negative")


def _check_real(name: str, value, *, low: float, high: float = math.inf, high_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value < low or value > high or (high_open and value == high):
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value!r}")
    return float(value)


def stratified_bins(n: int, *, bins: int) -> Tensor:
    """Bin of each rank 0..n-1 when n sorted items are cut into ``bins`` equal-count bins.

    Rank r is in bin b iff floor(b n / bins) <= r < floor((b + 1) n / bins); every bin is
    non-empty when 1 <= bins <= n.
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= max(n, 1):
        raise ValueError(f"bins must be an int in [1, {max(n, 1)}], got {bins!r}")
    ranks = torch.arange(n, dtype=torch.long)
    # largest b with floor(b n / bins) <= r, i.e. b = floor(((r + 1) bins - 1) / n)
    return ((ranks + 1) * bins - 1) // n


def stratified_selection(scores: Tensor, labels: Tensor, *, memory_size: int, seed: int) -> Tensor:
    """Per class, one uniform draw from each of ``quota`` equal-count bins of the score ranking.

    Order within a class: bin of the highest scores first. Deterministic given ``seed``.
    """
    labels = _check_labels(labels)
    _check_scores(scores, labels)
    generator = torch.Generator().manual_seed(int(seed))

    def pick(members: Tensor, quota: int) -> Tensor:
        n = members.numel()
        order = torch.sort(scores[members], descending=True, stable=True).indices
        bins = stratified_bins(n, bins=quota)
        starts = torch.searchsorted(bins, torch.arange(quota))
        sizes = torch.bincount(bins, minlength=quota)
        offset = (torch.rand(quota, generator=generator, dtype=torch.float64) * sizes).long().clamp(max=sizes - 1)
        return order[starts + offset]

    return _per_class(labels, memory_size, pick)


def power_weights(scores: Tensor, *, temperature: float) -> Tensor:
    """w = scores^temperature (float64), with 0^0 = 1 so that temperature 0 is uniform."""
    temperature = _check_real("temperature", temperature, low=0.0)
    s = scores.double()
    if temperature == 0.0:
        return torch.ones_like(s)
    return s.pow(temperature)


def proportional_selection(
    scores: Tensor, labels: Tensor, *, memory_size: int, temperature: float, seed: int
) -> Tensor:
    """Per class, ``quota`` draws without replacement, probability proportional to scores^temperature.

    Gumbel-top-k (module docstring): in draw order. Deterministic given ``seed``.
    """
    labels = _check_labels(labels)
    _check_scores(scores, labels, nonnegative=True)
    weights = power_weights(scores, temperature=temperature)
    if not bool(torch.isfinite(weights).all()):
        raise ValueError(f"scores^temperature overflows at temperature {temperature}")
    generator = torch.Generator().manual_seed(int(seed))

    def pick(members: Tensor, quota: int) -> Tensor:
        w = weights[members]
        u = torch.rand(members.numel(), generator=generator, dtype=torch.float64)
        gumbel = -torch.log(-torch.log(u.clamp(min=1e-300)))
        positive = w > 0
        keys = torch.where(positive, torch.log(w.clamp(min=1e-300)) + gumbel, gumbel)
        # positive weights first (by key), then the zero weights in a uniformly random order
        order = torch.argsort(keys, descending=True, stable=True)
        order = torch.cat([order[positive[order]], order[~positive[order]]])
        return order[:quota]

    return _per_class(labels, memory_size, pick)


def trimmed_top_selection(scores: Tensor, labels: Tensor, *, memory_size: int, discard: float) -> Tensor:
    """Per class, drop the top ``ceil(discard * n_c)`` scores (keeping >= quota), then the top ``quota``."""
    labels = _check_labels(labels)
    _check_scores(scores, labels)
    discard = _check_real("discard", discard, low=0.0, high=1.0)

    def pick(members: Tensor, quota: int) -> Tensor:
        drop = _discarded(members.numel(), quota, discard)
        order = torch.sort(scores[members], descending=True, stable=True).indices
        return order[drop : drop + quota]

    return _per_class(labels, memory_size, pick)


def _discarded(n: int, quota: int, discard: float) -> int:
    """How many of a class's n examples are discarded: ceil(discard n), but leave >= quota."""
    return min(math.ceil(discard * n - 1e-9), n - quota)


def pruned_random_selection(
    scores: Tensor, labels: Tensor, *, memory_size: int, discard: float, seed: int
) -> Tensor:
    """Per class, drop the top ``ceil(discard * n_c)`` scores (keeping >= quota), then ``quota`` at random.

    Deterministic given ``seed``; ``discard = 0`` draws exactly as ``random_selection``.
    """
    labels = _check_labels(labels)
    _check_scores(scores, labels)
    discard = _check_real("discard", discard, low=0.0, high=1.0)
    generator = torch.Generator().manual_seed(int(seed))

    def pick(members: Tensor, quota: int) -> Tensor:
        n = members.numel()
        drop = _discarded(n, quota, discard)
        kept = torch.sort(torch.sort(scores[members], descending=True, stable=True).indices[drop:]).values
        return kept[torch.randperm(n - drop, generator=generator)[:quota]]

    return _per_class(labels, memory_size, pick)


def random_selection(labels: Tensor, *, memory_size: int, seed: int) -> Tensor:
    """Per class, ``quota`` examples uniformly without replacement; deterministic given seed."""
    labels = _check_labels(labels)
    generator = torch.Generator().manual_seed(int(seed))

    def pick(members: Tensor, quota: int) -> Tensor:
        return torch.randperm(members.numel(), generator=generator)[:quota]

    return _per_class(labels, memory_size, pick)


def herding_order(features: Tensor, *, k: int) -> Tensor:
    """iCaRL herding of k rows of ``features`` (n, D) towards their mean; indices in order.

    Step t (1-based) takes the unchosen row i minimising ``||mu - (r + x_i) / t||^2`` (r: the
    sum of the rows chosen so far). Expanding the square, that is the row minimising
    ``||x_i||^2 / t - 2 x_i . (mu - r / t)``: one matrix-vector product per step.
    """
    return herding_orders([features], [k])[0]


def herding_orders(groups: list[Tensor], ks: list[int]) -> list[Tensor]:
    """``herding_order`` of several independent groups (n_g, D) at once, k_g rows each.

    The groups are padded to the largest and herded side by side: one batched product per step
    for all of them instead of one small product per group and step (per class, herding is
    independent), so a memory of C classes costs max k_g steps of Python, not sum k_g.
    """
    if len(groups) != len(ks):
        raise ValueError(f"{len(ks)} quotas for {len(groups)} groups")
    for features, k in zip(groups, ks, strict=True):
        if features.ndim != 2:
            raise ValueError(f"features must be (n, D), got {tuple(features.shape)}")
        if not 0 <= k <= features.shape[0]:
            raise ValueError(f"k must be in [0, {features.shape[0]}], got {k}")
    if not groups:
        return []
    if len({f.shape[1] for f in groups}) != 1:
        raise ValueError("every group must have the same feature dimension")
    n = max(f.shape[0] for f in groups)
    feats = groups[0].new_zeros((len(groups), n, groups[0].shape[1]))
    taken = torch.ones((len(groups), n), dtype=torch.bool, device=feats.device)  # padding is never chosen
    for g, features in enumerate(groups):
        feats[g, : features.shape[0]] = features
        taken[g, : features.shape[0]] = False
    mu = torch.stack([f.mean(dim=0) if f.shape[0] else f.new_zeros(f.shape[1]) for f in groups])
    sq_norms = feats.square().sum(dim=-1)
    running = torch.zeros_like(mu)
    rows = torch.arange(len(groups), device=feats.device)
    steps = max(ks)
    order = torch.zeros((len(groups), steps), dtype=torch.long, device=feats.device)
    for step in range(1, steps + 1):
        # a broadcast multiply-and-sum: bmm of (G, n, D) by (G, D, 1) is ~4x slower on CPU (measured)
        dist = sq_norms / step - 2.0 * (feats * (mu - running / step).unsqueeze(1)).sum(dim=-1)
        i = dist.masked_fill(taken, float("inf")).argmin(dim=1)
        order[:, step - 1] = i
        taken[rows, i] = True  # a group past its quota goes on choosing; those picks are dropped
        running = running + feats[rows, i]
    return [order[g, :k].cpu() for g, k in enumerate(ks)]


def herding_selection(features: Tensor, labels: Tensor, *, memory_size: int, normalize: bool = True) -> Tensor:
    """Per class, iCaRL herding on (L2-normalised, by default) features (N, D); all classes herded at once."""
    labels = _check_labels(labels)
    if features.ndim != 2 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"features must be ({labels.shape[0]}, D), got {tuple(features.shape)}")
    feats = features.detach()
    if normalize:
        feats = torch.nn.functional.normalize(feats, dim=-1)
    quotas = [(c, quota) for c, quota in class_quotas(labels, memory_size=memory_size).items() if quota > 0]
    members = [torch.nonzero(labels == c).squeeze(-1) for c, _ in quotas]
    orders = herding_orders([feats[m] for m in members], [quota for _, quota in quotas])
    out = [m[o] for m, o in zip(members, orders, strict=True)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def select_memory(
    *,
    labels: Tensor,
    memory_size: int,
    mode: Mode,
    scores: Tensor | None = None,
    probs: Tensor | None = None,
    features: Tensor | None = None,
    seed: int | None = None,
    temperature: float = 1.0,
    discard: float = 0.1,
) -> Tensor:
    """Class-balanced memory indices by ``mode``; each mode needs exactly its inputs.

    sensitivity, trimmed (``discard``): ``scores`` (N,); stratified, proportional
    (``temperature``), pruned (``discard``): ``scores`` and ``seed``; lambda: ``probs`` (N, C); random: ``seed``;
    herding: ``features`` (N, D).
    """
    needed = {"sensitivity": ("scores",), "lambda": ("probs",), "random": ("seed",), "herding": ("features",),
              "stratified": ("scores", "seed"), "proportional": ("scores", "seed"), "trimmed": ("scores",),
              "pruned": ("scores", "seed")}
    if mode not in needed:
        raise ValueError(f"mode must be one of {sorted(needed)}, got {mode!r}")
    given = {"scores": scores, "probs": probs, "features": features, "seed": seed}
    for name in needed[mode]:
        if given[name] is None:
            raise ValueError(f"mode {mode!r} needs {name}")
    if mode == "sensitivity":
        return top_score_selection(scores, labels, memory_size=memory_size)
    if mode == "lambda":
        return top_score_selection(softmax_hessian_trace(probs), labels, memory_size=memory_size)
    if mode == "random":
        return random_selection(labels, memory_size=memory_size, seed=seed)
    if mode == "stratified":
        return stratified_selection(scores, labels, memory_size=memory_size, seed=seed)
    if mode == "proportional":
        return proportional_selection(scores, labels, memory_size=memory_size, temperature=temperature, seed=seed)
    if mode == "trimmed":
        return trimmed_top_selection(scores, labels, memory_size=memory_size, discard=discard)
    if mode == "pruned":
        return pruned_random_selection(scores, labels, memory_size=memory_size, discard=discard, seed=seed)
    return herding_selection(features, labels, memory_size=memory_size)
