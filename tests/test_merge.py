"""The merging maths (cl_bayes.merge): exact Bayes on linear regression, identities, errors."""

from __future__ import annotations

import pytest
import torch

from cl_bayes.merge import fisher_weighted_average, merge_gaussians, task_arithmetic, weight_average

NOISE_VAR = 0.3**2


def blr_posterior(x: torch.Tensor, y: torch.Tensor, prior_mean: torch.Tensor, prior_precision: torch.Tensor):
    """Exact posterior of y = x w + noise (known variance), w ~ N(prior_mean, diag(1 / prior_precision)).

    Full-matrix linear algebra: the precision matrix and the mean from a linear solve.
    """
    precision = torch.diag(prior_precision) + x.T @ x / NOISE_VAR
    mean = torch.linalg.solve(precision, prior_precision * prior_mean + x.T @ y / NOISE_VAR)
    return mean, precision


def orthogonal_chunk(n: int, p: int, generator: torch.Generator) -> torch.Tensor:
    """An (n, p) design with orthogonal columns of random lengths: x^T x is diagonal."""
    q, _ = torch.linalg.qr(torch.randn(n, p, generator=generator, dtype=torch.float64))
    return q * (0.5 + 3 * torch.rand(p, generator=generator, dtype=torch.float64))


def test_merged_chunk_posteriors_equal_the_joint_posterior():
    g = torch.Generator().manual_seed(0)
    p = 6
    w_true = torch.randn(p, generator=g, dtype=torch.float64)
    prior_mean = torch.randn(p, generator=g, dtype=torch.float64)
    prior_precision = 0.5 + torch.rand(p, generator=g, dtype=torch.float64)
    chunks = []
    for n in (20, 35, 50):
        x = orthogonal_chunk(n, p, g)
        chunks.append((x, x @ w_true + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)))
    posteriors = [blr_posterior(x, y, prior_mean, prior_precision) for x, y in chunks]
    for _, precision in posteriors:  # each chunk's exact posterior is diagonal: nothing is lost by the diagonal
        assert torch.allclose(precision, torch.diag(torch.diagonal(precision)), atol=1e-12)
    mean, precision = merge_gaussians(
        means=[m for m, _ in posteriors], precisions=[torch.diagonal(s) for _, s in posteriors],
        prior_mean=prior_mean, prior_precision=prior_precision,
    )
    joint_mean, joint_precision = blr_posterior(
        torch.cat([x for x, _ in chunks]), torch.cat([y for _, y in chunks]), prior_mean, prior_precision
    )
    assert torch.allclose(precision, torch.diagonal(joint_precision), rtol=1e-10, atol=1e-10)
    assert torch.allclose(joint_precision, torch.diag(torch.diagonal(joint_precision)), atol=1e-10)
    assert torch.allclose(mean, joint_mean, rtol=1e-10, atol=1e-10)
    # ... and it is not the plain average of the chunk means, nor their product without dividing by the prior.
    assert not torch.allclose(mean, torch.stack([m for m, _ in posteriors]).mean(0), atol=1e-3)
    product_precision = sum(torch.diagonal(s) for _, s in posteriors)
    assert not torch.allclose(precision, product_precision, atol=1e-3)


def test_merge_of_one_posterior_is_itself_and_of_priors_is_the_prior():
    g = torch.Generator().manual_seed(1)
    m, s = torch.randn(5, generator=g), 1 + torch.rand(5, generator=g)
    m0, s0 = torch.randn(5, generator=g), 0.5 * torch.ones(5)
    mean, precision = merge_gaussians(means=[m], precisions=[s], prior_mean=m0, prior_precision=s0)
    assert torch.allclose(mean, m) and torch.allclose(precision, s)
    mean, precision = merge_gaussians(means=[m0, m0, m0], precisions=[s0, s0, s0], prior_mean=m0, prior_precision=s0)
    assert torch.allclose(mean, m0) and torch.allclose(precision, s0)


def test_merge_with_a_zero_prior_is_the_precision_weighted_average():
    g = torch.Generator().manual_seed(2)
    means = [torch.randn(7, generator=g) for _ in range(3)]
    precisions = [0.1 + torch.rand(7, generator=g) for _ in range(3)]
    mean, precision = merge_gaussians(means=means, precisions=precisions, prior_mean=0.0, prior_precision=0.0)
    assert torch.allclose(precision, sum(precisions))
    assert torch.allclose(mean, fisher_weighted_average(weights=means, fishers=precisions))


def test_merge_is_order_free_and_scalar_priors_broadcast():
    g = torch.Generator().manual_seed(3)
    means = [torch.randn(4, generator=g) for _ in range(4)]
    precisions = [2 + torch.rand(4, generator=g) for _ in range(4)]
    a = merge_gaussians(means=means, precisions=precisions, prior_mean=0.1, prior_precision=1.0)
    b = merge_gaussians(means=means[::-1], precisions=precisions[::-1], prior_mean=torch.full((4,), 0.1),
                        prior_precision=torch.ones(4))
    assert torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])


def test_merge_errors():
    x = torch.ones(3)
    with pytest.raises(ValueError, match="shape"):
        merge_gaussians(means=[x, torch.ones(4)], precisions=[x, x], prior_mean=0.0, prior_precision=1.0)
    with pytest.raises(ValueError, match="shape"):
        merge_gaussians(means=[x], precisions=[torch.ones(2)], prior_mean=0.0, prior_precision=1.0)
    with pytest.raises(ValueError, match="shape"):
        merge_gaussians(means=[x], precisions=[x], prior_mean=torch.zeros(2), prior_precision=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        merge_gaussians(means=[x], precisions=[-x], prior_mean=0.0, prior_precision=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        merge_gaussians(means=[x], precisions=[x], prior_mean=0.0, prior_precision=-1.0)
    with pytest.raises(ValueError, match="not positive"):  # below the prior: the merge would lose precision
        merge_gaussians(means=[x, x], precisions=[0.1 * x, 0.1 * x], prior_mean=0.0, prior_precision=1.0)
    with pytest.raises(ValueError, match="non-empty"):
        merge_gaussians(means=[], precisions=[], prior_mean=0.0, prior_precision=1.0)
    with pytest.raises(ValueError, match="2 means and 1 precisions"):
        merge_gaussians(means=[x, x], precisions=[x], prior_mean=0.0, prior_precision=1.0)


def test_weight_average_of_identical_models_is_the_model():
    w = torch.randn(10)
    assert torch.allclose(weight_average(weights=[w, w.clone(), w.clone()]), w)
    assert torch.allclose(weight_average(weights=[w, w.clone()], coefficients=[0.2, 5.0]), w)


def test_weight_average_is_the_mean_and_coefficients_weight_it():
    a, b = torch.tensor([0.0, 2.0]), torch.tensor([4.0, -2.0])
    assert torch.allclose(weight_average(weights=[a, b]), torch.tensor([2.0, 0.0]))
    assert torch.allclose(weight_average(weights=[a, b], coefficients=[3.0, 1.0]), torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="coefficients"):
        weight_average(weights=[a, b], coefficients=[1.0, -1.0])
    with pytest.raises(ValueError, match="2 weights and 1 coefficients"):
        weight_average(weights=[a, b], coefficients=[1.0])
    with pytest.raises(ValueError, match="shape"):
        weight_average(weights=[a, torch.ones(3)])


def test_task_arithmetic():
    base, a, b = torch.tensor([1.0, 1.0]), torch.tensor([2.0, 1.0]), torch.tensor([1.0, 3.0])
    assert torch.allclose(task_arithmetic(base=base, weights=[a, b], alpha=1.0), torch.tensor([2.0, 3.0]))
    assert torch.allclose(task_arithmetic(base=base, weights=[a, b], alpha=0.5), torch.tensor([1.5, 2.0]))
    assert torch.allclose(task_arithmetic(base=base, weights=[a, b], alpha=0.0), base)
    # alpha = 1 / T is the plain weight average
    assert torch.allclose(task_arithmetic(base=base, weights=[a, b], alpha=0.5), weight_average(weights=[a, b]))
    with pytest.raises(ValueError, match="shape"):
        task_arithmetic(base=base, weights=[torch.ones(3)], alpha=1.0)


def test_fisher_average_with_equal_fishers_is_the_plain_average():
    g = torch.Generator().manual_seed(4)
    weights = [torch.randn(6, generator=g) for _ in range(3)]
    fisher = torch.rand(6, generator=g) + 0.1
    merged = fisher_weighted_average(weights=weights, fishers=[fisher] * 3)
    assert torch.allclose(merged, weight_average(weights=weights))
    # zero Fisher everywhere: the floor gives the plain average, not 0 / 0
    zeros = [torch.zeros(6)] * 3
    assert torch.allclose(fisher_weighted_average(weights=weights, fishers=zeros), weight_average(weights=weights))


def test_fisher_average_follows_the_larger_fisher():
    a, b = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0])
    out = fisher_weighted_average(weights=[a, b], fishers=[torch.tensor([3.0, 0.0]), torch.tensor([1.0, 2.0])])
    assert torch.allclose(out, torch.tensor([0.25, 1.0]), atol=1e-6)
    with pytest.raises(ValueError, match=">= 0"):
        fisher_weighted_average(weights=[a, b], fishers=[-b, b])
    with pytest.raises(ValueError, match="floor"):
        fisher_weighted_average(weights=[a, b], fishers=[b, b], floor=0.0)
    with pytest.raises(ValueError, match="2 weights and 1 fishers"):
        fisher_weighted_average(weights=[a, b], fishers=[b])
