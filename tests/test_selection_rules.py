"""Sensitivity-driven selection rules that keep coverage: stratified, proportional, trimmed (issue 13)."""

from __future__ import annotations

import math

import pytest
import torch

from cl_bayes.avalanche.memory import SELECTIONS, make_selector, parse_selection, sensitivity_selector
from cl_bayes.memory import (
    class_quotas,
    power_weights,
    proportional_selection,
    pruned_random_selection,
    random_selection,
    select_memory,
    stratified_bins,
    stratified_selection,
    trimmed_top_selection,
)


def _labels(counts: dict[int, int], seed: int = 0) -> torch.Tensor:
    labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in counts.items()])
    return labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))]


def _scores(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(100 + seed)) ** 3


RULES = {
    "stratified": lambda s, y, m, seed: stratified_selection(s, y, memory_size=m, seed=seed),
    "proportional": lambda s, y, m, seed: proportional_selection(s, y, memory_size=m, temperature=1.0, seed=seed),
    "proportional-t0": lambda s, y, m, seed: proportional_selection(s, y, memory_size=m, temperature=0.0, seed=seed),
    "proportional-t4": lambda s, y, m, seed: proportional_selection(s, y, memory_size=m, temperature=4.0, seed=seed),
    "trimmed": lambda s, y, m, seed: trimmed_top_selection(s, y, memory_size=m, discard=0.1),
    "trimmed-half": lambda s, y, m, seed: trimmed_top_selection(s, y, memory_size=m, discard=0.5),
    "pruned": lambda s, y, m, seed: pruned_random_selection(s, y, memory_size=m, discard=0.25, seed=seed),
    "pruned-all": lambda s, y, m, seed: pruned_random_selection(s, y, memory_size=m, discard=0.99, seed=seed),
}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("counts,size", [({0: 10, 1: 30, 2: 20}, 11), ({0: 2, 1: 30, 2: 5, 3: 40}, 40),
                                         ({0: 3, 1: 4}, 100), ({0: 50}, 7), ({0: 5, 1: 5}, 0)])
def test_valid_class_balanced_memory(rule, counts, size):
    labels = _labels(counts)
    scores = _scores(labels.numel())
    chosen = RULES[rule](scores, labels, size, 3)
    assert chosen.dtype == torch.long
    assert len(set(chosen.tolist())) == chosen.numel()  # distinct
    quotas = class_quotas(labels, memory_size=size)
    assert chosen.numel() == sum(quotas.values())
    got = torch.bincount(labels[chosen], minlength=len(counts)).tolist() if chosen.numel() else [0] * len(counts)
    assert got == [quotas[c] for c in sorted(counts)]  # right quotas, each index within its class
    # grouped by class, ascending class id
    assert labels[chosen].tolist() == sorted(labels[chosen].tolist())


@pytest.mark.parametrize("rule", ["stratified", "proportional", "proportional-t4", "pruned"])
def test_seeded_rules_are_deterministic_and_depend_on_the_seed(rule):
    labels = _labels({0: 200, 1: 300})
    scores = _scores(500)
    a, b = RULES[rule](scores, labels, 40, 7), RULES[rule](scores, labels, 40, 7)
    assert torch.equal(a, b)
    assert not torch.equal(a, RULES[rule](scores, labels, 40, 8))


def test_trimmed_is_deterministic_and_exact():
    labels = torch.zeros(20, dtype=torch.long)
    scores = torch.arange(20, dtype=torch.float32)  # example i has score i
    # discard ceil(0.1 * 20) = 2 (scores 19, 18), then the top 3 of the rest
    assert trimmed_top_selection(scores, labels, memory_size=3, discard=0.1).tolist() == [17, 16, 15]
    # discard 0 is top-k
    assert trimmed_top_selection(scores, labels, memory_size=3, discard=0.0).tolist() == [19, 18, 17]
    # never discard so many that fewer than the quota remain
    assert trimmed_top_selection(scores, labels, memory_size=18, discard=0.5).tolist() == list(range(17, -1, -1))
    # ceil(0.25 * 20) = 5 exactly, not 6 from rounding
    assert trimmed_top_selection(scores, labels, memory_size=1, discard=0.25).tolist() == [14]


def test_pruned_draws_uniformly_from_all_but_the_top():
    labels = torch.zeros(20, dtype=torch.long)
    scores = torch.arange(20, dtype=torch.float32).flip(0)  # example i has score 19 - i
    runs = 3000
    counts = torch.zeros(20)
    for seed in range(runs):
        counts[pruned_random_selection(scores, labels, memory_size=3, discard=0.25, seed=seed)] += 1
    freq = counts / runs
    assert bool((freq[:5] == 0).all())  # ceil(0.25 * 20) = 5 most sensitive never kept
    p = 3 / 15  # the rest: each with probability quota / 15
    assert bool(((freq[5:] - p).abs() < 4 * math.sqrt(p * (1 - p) / runs)).all()), freq
    # never so many discarded that the quota cannot be met
    assert sorted(pruned_random_selection(scores, labels, memory_size=18, discard=0.5, seed=0).tolist()) == \
        list(range(2, 20))


def test_pruned_without_discard_is_random():
    labels = _labels({0: 40, 1: 25, 2: 60})
    scores = _scores(125)
    for seed in range(5):
        assert torch.equal(pruned_random_selection(scores, labels, memory_size=20, discard=0.0, seed=seed),
                           random_selection(labels, memory_size=20, seed=seed))


def test_stratified_bins_are_equal_count_and_contiguous():
    for n in range(1, 40):
        for bins in range(1, n + 1):
            b = stratified_bins(n, bins=bins)
            sizes = torch.bincount(b, minlength=bins)
            assert sizes.numel() == bins and int(sizes.min()) >= 1
            assert int(sizes.max()) - int(sizes.min()) <= 1
            assert bool((b[1:] >= b[:-1]).all())
            # the definition: rank r is in bin b iff floor(b n / bins) <= r < floor((b + 1) n / bins)
            for r in range(n):
                k = int(b[r])
                assert (k * n) // bins <= r < ((k + 1) * n) // bins


def test_stratified_covers_every_quantile_bin():
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        n, quota = int(torch.randint(5, 200, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
        quota = min(quota * 3, n)
        labels = torch.zeros(n, dtype=torch.long)
        scores = torch.randn(n, generator=g)
        chosen = stratified_selection(scores, labels, memory_size=quota, seed=trial)
        rank = torch.empty(n, dtype=torch.long)
        rank[torch.sort(scores, descending=True, stable=True).indices] = torch.arange(n)
        bins = stratified_bins(n, bins=quota)[rank[chosen]]
        assert bins.tolist() == list(range(quota))  # one per bin, hardest bin first


def test_stratified_draws_uniformly_within_a_bin():
    labels = torch.zeros(12, dtype=torch.long)
    scores = torch.arange(12, dtype=torch.float32)
    counts = torch.zeros(12)
    runs = 3000
    for seed in range(runs):
        counts[stratified_selection(scores, labels, memory_size=3, seed=seed)] += 1
    # 3 bins of 4: each example is drawn with probability 1/4
    se = math.sqrt(0.25 * 0.75 / runs)
    assert bool(((counts / runs - 0.25).abs() < 4 * se).all()), counts / runs


@pytest.mark.parametrize("temperature", [0.0, 0.5, 1.0, 2.0])
def test_proportional_inclusion_frequencies_follow_the_scores(temperature):
    """Quota 1: P(i chosen) = s_i^T / sum_j s_j^T; frequencies over seeds within 4 Monte Carlo s.e."""
    scores = torch.tensor([0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 0.0, 3.0])
    labels = torch.zeros(len(scores), dtype=torch.long)
    w = power_weights(scores, temperature=temperature)
    p = w / w.sum()
    runs = 4000
    counts = torch.zeros(len(scores), dtype=torch.float64)
    for seed in range(runs):
        counts[proportional_selection(scores, labels, memory_size=1, temperature=temperature, seed=seed)] += 1
    freq = counts / runs
    se = (p * (1 - p) / runs).sqrt()
    assert bool(((freq - p).abs() <= 4 * se + 1e-12).all()), (freq, p)
    if temperature > 0:
        assert freq[6] == 0  # a zero score is never drawn while a positive one is left


def test_proportional_matches_successive_sampling_with_quota_two():
    """Quota 2: P(i in memory) = p_i + sum_{j != i} p_j p_i / (1 - p_j) (draw j first, then i)."""
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    labels = torch.zeros(4, dtype=torch.long)
    p = scores.double() / scores.sum()
    expected = torch.stack([p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(4) if j != i) for i in range(4)])
    runs = 4000
    counts = torch.zeros(4, dtype=torch.float64)
    for seed in range(runs):
        counts[proportional_selection(scores, labels, memory_size=2, temperature=1.0, seed=seed)] += 1
    freq = counts / runs
    se = (expected * (1 - expected) / runs).sqrt()
    assert bool(((freq - expected).abs() <= 4 * se).all()), (freq, expected)


def test_proportional_takes_zero_scores_only_when_needed():
    scores = torch.tensor([0.0, 1.0, 0.0, 2.0, 0.0])
    labels = torch.zeros(5, dtype=torch.long)
    for seed in range(20):
        chosen = proportional_selection(scores, labels, memory_size=3, temperature=1.0, seed=seed).tolist()
        assert sorted(chosen[:2]) == [1, 3] and chosen[2] in (0, 2, 4)


def test_high_temperature_tends_to_top_k():
    labels = _labels({0: 100, 1: 100})
    scores = 1 + torch.rand(200, generator=torch.Generator().manual_seed(0))
    top = select_memory(labels=labels, memory_size=10, mode="sensitivity", scores=scores)
    hot = proportional_selection(scores, labels, memory_size=10, temperature=300.0, seed=0)
    assert set(hot.tolist()) == set(top.tolist())


@pytest.mark.parametrize("call,match", [
    (lambda s, y: proportional_selection(s, y, memory_size=2, temperature=-1.0, seed=0), "temperature"),
    (lambda s, y: proportional_selection(s, y, memory_size=2, temperature=float("nan"), seed=0), "temperature"),
    (lambda s, y: proportional_selection(-s, y, memory_size=2, temperature=1.0, seed=0), "non-negative"),
    (lambda s, y: proportional_selection(s * 1e30, y, memory_size=2, temperature=20.0, seed=0), "overflows"),
    (lambda s, y: trimmed_top_selection(s, y, memory_size=2, discard=1.0), "discard"),
    (lambda s, y: trimmed_top_selection(s, y, memory_size=2, discard=-0.1), "discard"),
    (lambda s, y: trimmed_top_selection(s, y, memory_size=2, discard="0.1"), "discard"),
    (lambda s, y: pruned_random_selection(s, y, memory_size=2, discard=1.5, seed=0), "discard"),
    (lambda s, y: select_memory(labels=y, memory_size=2, mode="pruned", scores=s), "needs seed"),
    (lambda s, y: stratified_selection(s[:3], y, memory_size=2, seed=0), "shape"),
    (lambda s, y: stratified_selection(s.clone().fill_(float("inf")), y, memory_size=2, seed=0), "finite"),
    (lambda s, y: stratified_selection(s, y, memory_size=-1, seed=0), "memory_size"),
    (lambda s, y: select_memory(labels=y, memory_size=2, mode="stratified", scores=s), "needs seed"),
    (lambda s, y: select_memory(labels=y, memory_size=2, mode="proportional", seed=0), "needs scores"),
    (lambda s, y: stratified_bins(5, bins=6), "bins"),
])
def test_bad_parameters_raise(call, match):
    labels = _labels({0: 5, 1: 5})
    with pytest.raises(ValueError, match=match):
        call(_scores(10), labels)


def test_select_memory_dispatches_the_new_modes():
    labels = _labels({0: 30, 1: 30})
    scores = _scores(60)
    assert torch.equal(select_memory(labels=labels, memory_size=8, mode="stratified", scores=scores, seed=2),
                       stratified_selection(scores, labels, memory_size=8, seed=2))
    assert torch.equal(select_memory(labels=labels, memory_size=8, mode="proportional", scores=scores, seed=2,
                                     temperature=0.5),
                       proportional_selection(scores, labels, memory_size=8, temperature=0.5, seed=2))
    assert torch.equal(select_memory(labels=labels, memory_size=8, mode="trimmed", scores=scores, discard=0.3),
                       trimmed_top_selection(scores, labels, memory_size=8, discard=0.3))
    assert torch.equal(select_memory(labels=labels, memory_size=8, mode="pruned", scores=scores, discard=0.3,
                                     seed=4),
                       pruned_random_selection(scores, labels, memory_size=8, discard=0.3, seed=4))


def test_selection_names_and_parameters():
    assert parse_selection("proportional") == ("proportional", {"temperature": 0.5})
    assert parse_selection("trimmed") == ("trimmed", {"discard": 0.5})
    assert parse_selection("pruned") == ("pruned", {"discard": 0.1})
    assert parse_selection("stratified") == ("stratified", {})
    assert parse_selection("proportional:0.5") == ("proportional", {"temperature": 0.5})
    assert parse_selection("trimmed:0.25") == ("trimmed", {"discard": 0.25})
    assert parse_selection("pruned:0.5") == ("pruned", {"discard": 0.5})
    for good in ("stratified", "trimmed", "proportional:2", "pruned", "pruned:0", "random", "sensitivity",
                 "herding", "lambda"):
        assert good in SELECTIONS
        make_selector(good, seed=0)
    for bad, match in [("stratified:2", "takes no parameter"), ("proportional:x", "number"),
                       ("proportional:-1", "temperature"), ("trimmed:1", "discard"), ("pruned:-0.5", "discard"),
                       ("random:0.5", "takes no parameter"), ("best", "one of")]:
        assert bad not in SELECTIONS
        with pytest.raises(ValueError, match=match):
            make_selector(bad, seed=0)
    with pytest.raises(ValueError, match="rule"):
        sensitivity_selector(rule="lambda")
    with pytest.raises(ValueError, match="temperature"):
        sensitivity_selector(rule="proportional", temperature=-2.0)
