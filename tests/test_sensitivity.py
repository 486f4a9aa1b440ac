"""Memory-perturbation estimates against brute-force retraining of logistic regression.

The posterior is a Laplace approximation computed with Newton's method in
float64 (full Hessian for the MAP, its diagonal as the DiagonalGaussian's
precision, as a mean-field posterior would have). Retraining without an
example (or a group) is a few warm-started Newton steps, so the truth is cheap.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from cl_bayes.jacobians import flat_parameters, model_outputs
from cl_bayes.posterior import DiagonalGaussian
from cl_bayes.sensitivity import (
    example_weight,
    memory_perturbation,
    prediction_variance,
    whatif_remove,
)

D_IN, N_TRAIN, N_HELDOUT, PRIOR_PRECISION = 3, 60, 200, 1.0


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(old)


def make_problem(*, classes: int, seed: int):
    """Gaussian inputs, labels drawn from a random softmax-linear teacher."""
    g = torch.Generator().manual_seed(seed)
    teacher = 1.5 * torch.randn(classes, D_IN, generator=g)
    x = torch.randn(N_TRAIN + N_HELDOUT, D_IN, generator=g)
    y = torch.multinomial(torch.softmax(x @ teacher.T, -1), 1, generator=g).squeeze(-1)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def fit_map(model: nn.Module, x, y, *, init=None):
    """MAP of sum CE + prior by Newton's method; returns (w, full Hessian)."""

    def loss(w):
        logits = model_outputs(model, x, params=w)
        ce = nn.functional.cross_entropy(logits, y, reduction="sum")
        return ce + 0.5 * PRIOR_PRECISION * w.square().sum()

    w = torch.zeros_like(flat_parameters(model)) if init is None else init.clone()
    for _ in range(100):
        hessian = torch.func.jacrev(torch.func.grad(loss))(w)
        step = torch.linalg.solve(hessian, torch.func.grad(loss)(w))
        w = w - step
        if step.abs().max() < 1e-12:
            break
    return w, torch.func.jacrev(torch.func.grad(loss))(w)


def laplace_problem(*, classes: int, seed: int):
    x, y, xh, yh = make_problem(classes=classes, seed=seed)
    model = nn.Linear(D_IN, classes)
    w, hessian = fit_map(model, x, y)
    posterior = DiagonalGaussian(w, torch.diagonal(hessian).clone())
    return model, posterior, x, y, xh, yh


def heldout_probs(model, w, xh):
    return torch.softmax(model_outputs(model, xh, params=w), -1)


def retrain_without(model, posterior, x, y, drop) -> torch.Tensor:
    keep = torch.ones(x.shape[0], dtype=torch.bool)
    keep[drop] = False
    return fit_map(model, x[keep], y[keep], init=posterior.mean)[0]


def loo_heldout_ranking(*, classes: int, seed: int) -> float:
    """Spearman(estimated, true) of sum |delta p| on held-out data, removing each of 50 examples."""
    model, posterior, x, y, xh, yh = laplace_problem(classes=classes, seed=seed)
    p0 = heldout_probs(model, posterior.mean, xh)
    true, estimated = [], []
    for i in range(50):
        w_i = retrain_without(model, posterior, x, y, [i])
        true.append(float((heldout_probs(model, w_i, xh) - p0).abs().sum()))
        r = whatif_remove(model, posterior, group_x=x[i : i + 1], group_y=y[i : i + 1], heldout_x=xh)
        estimated.append(float((r.probs_after - r.probs_before).abs().sum()))
    return spearmanr(true, estimated).statistic


def test_loo_heldout_change_ranks_like_retraining_binary():
    assert loo_heldout_ranking(classes=2, seed=0) >= 0.9


def test_loo_heldout_change_ranks_like_retraining_multiclass():
    # The diagonal posterior ignores the cross-class couplings of the softmax
    # Hessian; over seeds 0-19 this Spearman was 0.88-0.99 (binary: 0.95-0.99).
    assert loo_heldout_ranking(classes=3, seed=0) >= 0.85


def self_deviation_rankings(*, classes: int, seed: int) -> tuple[float, float]:
    """Spearman vs the true change of example i's own prediction when i is left out:
    (the MPE leave-one-out logits f + v e, the sensitivity S)."""
    model, posterior, x, y, _, _ = laplace_problem(classes=classes, seed=seed)
    mp = memory_perturbation(model, posterior, x=x, y=y)
    true, estimated = [], []
    for i in range(50):
        w_i = retrain_without(model, posterior, x, y, [i])
        p_loo = torch.softmax(model_outputs(model, x[i : i + 1], params=w_i)[0], -1)
        true.append(float((p_loo - mp.probs[i]).abs().sum()))
        estimated.append(float((torch.softmax(mp.loo_logits[i], -1) - mp.probs[i]).abs().sum()))
    return (
        spearmanr(true, estimated).statistic,
        spearmanr(true, mp.sensitivity[:50].tolist()).statistic,
    )


@pytest.mark.parametrize("classes", [2, 3])
def test_loo_self_deviation_and_sensitivity_rank_like_retraining(classes):
    # over seeds 0-19: loo 0.92-1.0, sensitivity 0.93-1.0
    loo, sensitivity = self_deviation_rankings(classes=classes, seed=1)
    assert loo >= 0.9
    assert sensitivity >= 0.9


def group_rankings(*, classes: int, seed: int) -> float:
    """Spearman(estimated, true) held-out sum |delta p| over 30 random groups of 1-20 examples."""
    model, posterior, x, y, xh, _ = laplace_problem(classes=classes, seed=seed)
    p0 = heldout_probs(model, posterior.mean, xh)
    g = torch.Generator().manual_seed(seed + 100)
    true, estimated = [], []
    for _ in range(30):
        size = int(torch.randint(1, 21, (1,), generator=g))
        group = torch.randperm(N_TRAIN, generator=g)[:size]
        w_g = retrain_without(model, posterior, x, y, group)
        true.append(float((heldout_probs(model, w_g, xh) - p0).abs().sum()))
        r = whatif_remove(model, posterior, group_x=x[group], group_y=y[group], heldout_x=xh)
        estimated.append(float((r.probs_after - r.probs_before).abs().sum()))
    return spearmanr(true, estimated).statistic


def test_group_removal_ranks_like_retraining():
    # over seeds 0-19: 0.87-0.97 (the diagonal posterior is the limit: the same
    # Newton step with the full Hessian gave 0.97-0.99 on a similar problem)
    assert group_rankings(classes=2, seed=2) >= 0.8


def test_removing_a_class_lowers_its_heldout_probability_like_retraining():
    model, posterior, x, y, xh, yh = laplace_problem(classes=3, seed=3)
    p0 = heldout_probs(model, posterior.mean, xh)
    for c in range(3):
        group = torch.nonzero(y == c).squeeze(-1)
        w_c = retrain_without(model, posterior, x, y, group)
        true_drop = (p0 - heldout_probs(model, w_c, xh))[:, c]
        r = whatif_remove(model, posterior, group_x=x[group], group_y=y[group], heldout_x=xh, heldout_y=yh)
        est_drop = (r.probs_before - r.probs_after)[:, c]
        assert true_drop.mean() > 0 and est_drop.mean() > 0
        # a whole class is a large perturbation: over seeds 0-19, 0.71-1.0
        assert spearmanr(true_drop.tolist(), est_drop.tolist()).statistic >= 0.7
        nll = nn.functional.cross_entropy(r.logits_after, yh)
        torch.testing.assert_close(r.nll_after, nll)


def test_linearised_equals_forward_for_a_linear_model():
    model, posterior, x, y, xh, _ = laplace_problem(classes=3, seed=4)
    kwargs = dict(group_x=x[:7], group_y=y[:7], heldout_x=xh)
    lin = whatif_remove(model, posterior, linearise=True, **kwargs)
    fwd = whatif_remove(model, posterior, linearise=False, **kwargs)
    torch.testing.assert_close(lin.logits_after, fwd.logits_after)
    assert lin.delta_mean.abs().max() > 1e-3


def test_last_layer_estimator_is_exact_for_a_linear_model():
    model, posterior, x, _, _, _ = laplace_problem(classes=3, seed=5)
    _, exact = prediction_variance(model, posterior, x=x, estimator="exact")
    _, last = prediction_variance(model, posterior, x=x, estimator="last_layer")
    torch.testing.assert_close(last, exact)


def test_last_layer_estimator_on_an_mlp_is_the_last_layer_share_of_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, 5), nn.Tanh(), nn.Linear(5, 4))
    mean = flat_parameters(model)
    precision = 1.0 + 10 * torch.rand(mean.shape)
    x = torch.randn(20, D_IN)
    _, last = prediction_variance(model, DiagonalGaussian(mean, precision), x=x, estimator="last_layer")
    _, exact = prediction_variance(model, DiagonalGaussian(mean, precision), x=x)
    n_last = 5 * 4 + 4
    only_last = precision.clone()
    only_last[:-n_last] = float("inf")  # zero variance outside the last layer
    _, exact_last = prediction_variance(model, DiagonalGaussian(mean, only_last), x=x)
    torch.testing.assert_close(last, exact_last)
    assert bool((last <= exact + 1e-12).all())


def test_sampled_estimator_ranks_like_exact():
    model, posterior, x, y, _, _ = laplace_problem(classes=3, seed=6)
    exact = memory_perturbation(model, posterior, x=x, y=y)
    sampled = memory_perturbation(
        model,
        posterior,
        x=x,
        y=y,
        estimator="samples",
        num_samples=500,
        generator=torch.Generator().manual_seed(0),
    )
    assert spearmanr(exact.sensitivity, sampled.sensitivity).statistic >= 0.95
    assert spearmanr(exact.variance.flatten(), sampled.variance.flatten()).statistic >= 0.95


def test_quantities_match_their_definitions():
    model, posterior, x, y, _, _ = laplace_problem(classes=3, seed=7)
    mp = memory_perturbation(model, posterior, x=x, y=y, ess=120.0, n_train=60)
    p = torch.softmax(model_outputs(model, x, params=posterior.mean), -1)
    torch.testing.assert_close(mp.probs, p)
    torch.testing.assert_close(mp.error, p - nn.functional.one_hot(y, 3))
    torch.testing.assert_close(mp.curvature, p - p**2)
    torch.testing.assert_close(mp.loo_logits, mp.logits + 2.0 * mp.variance * mp.error)
    torch.testing.assert_close(mp.sensitivity, (mp.error * mp.curvature * mp.variance).abs().sum(-1))


def test_class_mask_equals_the_restricted_model():
    """Task-incremental: classes {1, 3} of a 4-class head == a 2-class head of those rows."""
    g = torch.Generator().manual_seed(8)
    model4, model2 = nn.Linear(D_IN, 4), nn.Linear(D_IN, 2)
    mean4 = torch.randn(4 * D_IN + 4, generator=g)
    precision4 = 1.0 + 5 * torch.rand(mean4.shape, generator=g)
    rows = torch.tensor([False, True, False, True])
    keep = torch.cat([rows.repeat_interleave(D_IN), rows])
    post4 = DiagonalGaussian(mean4, precision4)
    post2 = DiagonalGaussian(mean4[keep], precision4[keep])
    x = torch.randn(10, D_IN, generator=g)
    y2 = torch.randint(0, 2, (10,), generator=g)
    y4 = torch.tensor([1, 3])[y2]
    mask = rows.expand(10, 4).clone()
    for est in ("exact", "last_layer"):
        a = memory_perturbation(model4, post4, x=x, y=y4, class_mask=mask, estimator=est)
        b = memory_perturbation(model2, post2, x=x, y=y2, estimator=est)
        for field in ("probs", "error", "curvature", "variance", "loo_logits"):
            torch.testing.assert_close(getattr(a, field)[:, rows], getattr(b, field))
            assert bool((getattr(a, field)[:, ~rows] == 0).all()) or field == "loo_logits"
        torch.testing.assert_close(a.sensitivity, b.sensitivity)
    r4 = whatif_remove(
        model4,
        post4,
        group_x=x[:4],
        group_y=y4[:4],
        group_class_mask=mask[:4],
        heldout_x=x[4:],
        heldout_y=y4[4:],
        heldout_class_mask=mask[4:],
    )
    r2 = whatif_remove(model2, post2, group_x=x[:4], group_y=y2[:4], heldout_x=x[4:], heldout_y=y2[4:])
    torch.testing.assert_close(r4.probs_after[:, rows], r2.probs_after)
    torch.testing.assert_close(r4.nll_after, r2.nll_after)
    assert torch.isfinite(r4.logits_after).all()


def test_example_weight_and_errors():
    assert example_weight() == 1.0
    assert example_weight(ess=50.0, n_train=100) == 0.5
    with pytest.raises(ValueError, match="both"):
        example_weight(ess=10.0)
    model, posterior, x, y, _, _ = laplace_problem(classes=2, seed=9)
    with pytest.raises(ValueError, match="estimator"):
        memory_perturbation(model, posterior, x=x, y=y, estimator="laplace")
    with pytest.raises(ValueError, match="parameters"):
        memory_perturbation(model, DiagonalGaussian(torch.zeros(2), torch.ones(2)), x=x, y=y)
    mask = torch.tensor([True, False]).expand(x.shape[0], 2)
    with pytest.raises(ValueError, match="masked"):
        memory_perturbation(model, posterior, x=x, y=torch.ones_like(y), class_mask=mask)


@pytest.mark.parametrize("masked", [False, True])
def test_group_contribution_fast_equals_jacobians(masked):
    """One backward pass + the layer-wise GGN diagonal = the per-example Jacobian sums, at the mean."""
    from cl_bayes.sensitivity import group_contribution

    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(D_IN, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    weights = flat_parameters(model)
    mean = weights + 0.3 * torch.randn(weights.shape, generator=g)  # the posterior mean is not the weights
    posterior = DiagonalGaussian(mean, torch.rand(weights.shape, generator=g) + 0.5)
    x = torch.randn(12, D_IN, generator=g)
    mask = None
    y = torch.randint(0, 4, (12,), generator=g)
    if masked:  # task-incremental: rows allow classes {0, 1} or {2, 3}
        task = torch.arange(12) % 2
        mask = torch.stack([task == 0, task == 0, task == 1, task == 1], dim=1)
        y = 2 * task + torch.randint(0, 2, (12,), generator=g)
    fast = group_contribution(model, posterior, x=x, y=y, class_mask=mask)
    slow = group_contribution(model, posterior, x=x, y=y, class_mask=mask, method="jacobian")
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b)
    assert fast[0].abs().sum() > 0 and (fast[1] >= -1e-12).all()
    torch.testing.assert_close(flat_parameters(model), weights, rtol=0, atol=0)  # weights restored
    with pytest.raises(ValueError, match="method"):
        group_contribution(model, posterior, x=x, y=y, method="kfac")


def test_group_contribution_restores_weights_when_it_raises():
    from cl_bayes.sensitivity import group_contribution

    model = nn.Sequential(nn.Linear(D_IN, 4), nn.Tanh(), nn.Linear(4, 3))
    weights = flat_parameters(model)
    posterior = DiagonalGaussian(weights + 1.0, torch.ones_like(weights))
    with pytest.raises(ValueError):
        group_contribution(model, posterior, x=torch.randn(5, D_IN), y=torch.tensor([0, 1, 2, 3, 0]))  # label 3
    torch.testing.assert_close(flat_parameters(model), weights, rtol=0, atol=0)
