"""Class-balanced memory selection."""

from __future__ import annotations

import itertools

import pytest
import torch

from cl_bayes.memory import (
    class_quotas,
    herding_order,
    herding_orders,
    herding_selection,
    random_selection,
    select_memory,
    softmax_hessian_trace,
    top_score_selection,
)


def _labels(counts: dict[int, int], seed: int = 0) -> torch.Tensor:
    labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in counts.items()])
    return labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))]


def test_quotas_even_split_with_leftover_to_larger_classes():
    labels = _labels({0: 10, 1: 30, 2: 20})
    assert class_quotas(labels, memory_size=9) == {0: 3, 1: 3, 2: 3}
    assert class_quotas(labels, memory_size=11) == {0: 3, 1: 4, 2: 4}
    assert class_quotas(labels, memory_size=10) == {0: 3, 1: 4, 2: 3}


def test_quotas_small_class_gives_its_leftover_to_others():
    labels = _labels({0: 2, 1: 30, 2: 5, 3: 40})
    quotas = class_quotas(labels, memory_size=40)
    assert quotas == {0: 2, 1: 16, 2: 5, 3: 17}
    assert sum(quotas.values()) == 40


def test_quotas_cap_at_dataset_size_and_zero():
    labels = _labels({0: 2, 1: 3})
    assert class_quotas(labels, memory_size=100) == {0: 2, 1: 3}
    assert class_quotas(labels, memory_size=0) == {0: 0, 1: 0}
    assert class_quotas(labels, memory_size=1) == {0: 0, 1: 1}


def test_quotas_brute_force_properties():
    """Sum, caps, and balance: no quota can move a slot to make the split more even."""
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        k = int(torch.randint(1, 6, (1,), generator=g))
        counts = {c: int(torch.randint(1, 15, (1,), generator=g)) for c in range(k)}
        size = int(torch.randint(0, 60, (1,), generator=g))
        q = class_quotas(_labels(counts), memory_size=size)
        assert sum(q.values()) == min(size, sum(counts.values()))
        assert all(0 <= q[c] <= counts[c] for c in counts)
        for a, b in itertools.permutations(counts, 2):
            # a class below its cap is never more than one slot behind another
            if q[a] < counts[a]:
                assert q[b] <= q[a] + 1


def test_top_score_selection_is_exactly_the_top_per_class():
    g = torch.Generator().manual_seed(2)
    labels = _labels({0: 12, 1: 7, 2: 20}, seed=3)
    scores = torch.rand(labels.numel(), generator=g)
    chosen = top_score_selection(scores, labels, memory_size=10)
    assert chosen.unique().numel() == chosen.numel() == 10
    quotas = class_quotas(labels, memory_size=10)
    for c, quota in quotas.items():
        members = torch.nonzero(labels == c).squeeze(-1)
        expected = members[scores[members].argsort(descending=True)[:quota]]
        got = chosen[labels[chosen] == c]
        assert got.tolist() == expected.tolist()  # top scores, best first


def test_lambda_mode_uses_softmax_hessian_trace():
    g = torch.Generator().manual_seed(4)
    probs = torch.softmax(3 * torch.randn(30, 5, generator=g), dim=-1)
    labels = _labels({0: 10, 1: 10, 2: 10})
    trace = softmax_hessian_trace(probs)
    hessian = torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)
    torch.testing.assert_close(trace, torch.diagonal(hessian, dim1=-2, dim2=-1).sum(-1))
    chosen = select_memory(labels=labels, memory_size=6, mode="lambda", probs=probs)
    assert chosen.tolist() == top_score_selection(trace, labels, memory_size=6).tolist()
    scores = torch.rand(30, generator=g)
    chosen = select_memory(labels=labels, memory_size=6, mode="sensitivity", scores=scores)
    assert chosen.tolist() == top_score_selection(scores, labels, memory_size=6).tolist()


def test_random_selection_is_seeded_and_balanced():
    labels = _labels({0: 50, 1: 50, 2: 3})
    a = random_selection(labels, memory_size=21, seed=7)
    b = select_memory(labels=labels, memory_size=21, mode="random", seed=7)
    c = random_selection(labels, memory_size=21, seed=8)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()
    assert a.unique().numel() == 21
    counts = torch.bincount(labels[a], minlength=3).tolist()
    assert counts == [9, 9, 3]


def _herding_brute_force(features: torch.Tensor, k: int) -> list[int]:
    mu = features.mean(0)
    chosen: list[int] = []
    for step in range(1, k + 1):
        best, best_dist = None, float("inf")
        for i in range(features.shape[0]):
            if i in chosen:
                continue
            dist = float(torch.linalg.norm(mu - (features[chosen].sum(0) + features[i]) / step))
            if dist < best_dist:
                best, best_dist = i, dist
        chosen.append(best)
    return chosen


def test_herding_matches_brute_force():
    g = torch.Generator().manual_seed(5)
    features = torch.randn(15, 4, generator=g, dtype=torch.float64)
    for k in (1, 4, 15):
        assert herding_order(features, k=k).tolist() == _herding_brute_force(features, k)


def test_herding_of_groups_side_by_side_equals_each_group_alone():
    """Groups of different sizes and quotas (one taken whole, one of a single row), herded at once."""
    g = torch.Generator().manual_seed(8)
    groups = [torch.randn(n, 4, generator=g, dtype=torch.float64) for n in (5, 12, 1, 7)]
    ks = [5, 3, 1, 0]
    orders = herding_orders(groups, ks)
    assert [o.tolist() for o in orders] == [_herding_brute_force(f, k) for f, k in zip(groups, ks, strict=True)]
    with pytest.raises(ValueError, match="k must be"):
        herding_orders(groups, [6, 3, 1, 0])
    with pytest.raises(ValueError, match="quotas"):
        herding_orders(groups, ks[:2])


def test_herding_selection_per_class_on_normalised_features():
    g = torch.Generator().manual_seed(6)
    labels = _labels({0: 9, 1: 11})
    features = torch.randn(20, 3, generator=g, dtype=torch.float64)
    chosen = herding_selection(features, labels, memory_size=6)
    normalised = torch.nn.functional.normalize(features, dim=-1)
    for c in (0, 1):
        members = torch.nonzero(labels == c).squeeze(-1)
        expected = members[_herding_brute_force(normalised[members], 3)]
        assert chosen[labels[chosen] == c].tolist() == expected.tolist()
    assert select_memory(labels=labels, memory_size=6, mode="herding", features=features).tolist() == (chosen.tolist())


def test_herding_mean_gets_closer_than_random():
    g = torch.Generator().manual_seed(7)
    features = torch.randn(200, 8, generator=g)
    mu = features.mean(0)
    herd = herding_order(features, k=10)
    rand = torch.randperm(200, generator=g)[:10]
    assert (features[herd].mean(0) - mu).norm() < (features[rand].mean(0) - mu).norm()


def test_invalid_arguments():
    labels = _labels({0: 3, 1: 3})
    with pytest.raises(ValueError, match="mode"):
        select_memory(labels=labels, memory_size=2, mode="best")
    with pytest.raises(ValueError, match="needs scores"):
        select_memory(labels=labels, memory_size=2, mode="sensitivity")
    with pytest.raises(ValueError, match="memory_size"):
        class_quotas(labels, memory_size=-1)
    with pytest.raises(ValueError, match="scores"):
        top_score_selection(torch.rand(5), labels, memory_size=2)
    with pytest.raises(ValueError, match="labels"):
        class_quotas(labels.float(), memory_size=2)
