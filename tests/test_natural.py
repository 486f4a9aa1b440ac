"""cl_bayes.natural: the posterior of experience t becomes the prior of t + 1; natural parameters add up."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cl_bayes.ivon import IVON
from cl_bayes.natural import carry_posterior_to_prior, contribution
from cl_bayes.posterior import DiagonalGaussian


def trained_ivon(steps: int = 3, **kwargs) -> tuple[torch.nn.Module, IVON]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "hess_init": 0.2}]
    opt = IVON(groups, lr=0.1, ess=40.0, weight_decay=1e-2, **kwargs)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    for _ in range(steps):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


# ----------------------------------------------------------------------------- exact: conjugate linear regression


def orthogonal_design(n: int, scales: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """n x d matrix with X^T X = diag(scales^2): orthonormal columns, rescaled."""
    q, _ = torch.linalg.qr(torch.randn(n, scales.numel(), generator=generator, dtype=torch.float64))
    return q * scales


def test_chunked_ivon_accumulation_equals_the_joint_bayesian_linear_regression_posterior():
    """Bayesian linear regression, Gaussian noise, prior N(m0, diag(1/lambda0)), data in T = 3 chunks.

    The joint posterior is closed form: Lambda = lambda0 + X^T X / s2, eta1 = lambda0 m0 + X^T y / s2.
    With an orthogonal design (every chunk's X_t^T X_t diagonal) it is exactly diagonal, so IVON's
    diagonal Gaussian family contains it.

    What is replaced, and why: IVON's two Monte Carlo estimators are replaced by their expectations,
    which are known exactly here because the loss L_t (mean over the chunk of (y - x^T w)^2 / (2 s2)) is
    quadratic: E_q[grad L_t(theta)] = grad L_t(m) (the gradient is recorded from a backward pass at the
    mean, inside an empty sampled_params(train=True), so the sample is drawn but not used), and
    E_q[g * eps / sigma^2] = diag of the per-example Hessian X_t^T X_t / (n_t s2), set through the public
    ``hess`` setter and frozen with beta2 = 1 (then the real h update is the identity). Everything else
    is the real code path: the momentum/mean update with its delta (m - m0) term and a non-zero prior
    mean, delta = prior_precision / ess, precision = ess (h + delta), and carry_posterior_to_prior with
    keep_hess=False and next_ess, as the strategy calls it. Without noise the mean update is a damped
    Newton iteration that converges to the exact posterior mean of each chunk's posterior.
    """
    gen = torch.Generator().manual_seed(0)
    d, sizes, s2 = 6, (20, 30, 25), 0.25
    w_true = torch.randn(d, generator=gen, dtype=torch.float64)
    chunks = []
    for n in sizes:
        scales = 0.5 + 1.5 * torch.rand(d, generator=gen, dtype=torch.float64)
        x = orthogonal_design(n, scales, gen)
        y = x @ w_true + math.sqrt(s2) * torch.randn(n, generator=gen, dtype=torch.float64)
        chunks.append((x, y))
    lambda0 = 0.5 + 2.0 * torch.rand(d, generator=gen, dtype=torch.float64)
    m0 = torch.randn(d, generator=gen, dtype=torch.float64)

    model = torch.nn.Linear(d, 1, bias=False).double()
    opt = IVON(model.parameters(), lr=0.5, ess=sizes[0], beta2=1.0, rescale_lr=False)
    opt.set_prior(mean=m0, precision=lambda0)
    initial = opt.prior
    eta1_joint, eta2_joint = lambda0 * m0, -lambda0 / 2
    contributions = []
    for t, (x, y) in enumerate(chunks):
        n = x.shape[0]
        assert opt.ess == n
        xtx = x.T @ x
        assert torch.allclose(xtx, torch.diag(torch.diagonal(xtx)), atol=1e-12)
        opt.hess = torch.diagonal(xtx) / (n * s2)  # exact per-example Hessian of the mean loss
        prior = opt.prior
        for _ in range(400):
            opt.zero_grad()
            loss = ((y - model(x).squeeze(-1)) ** 2).mean() / (2 * s2)
            loss.backward()
            with opt.sampled_params(train=True):
                pass
            opt.step()
        posterior = opt.posterior

        # this chunk's likelihood in natural parameters, and the joint posterior of chunks 1..t
        c1, c2 = x.T @ y / s2, -torch.diagonal(xtx) / (2 * s2)
        eta1_joint, eta2_joint = eta1_joint + c1, eta2_joint + c2
        got1, got2 = contribution(posterior, prior)
        torch.testing.assert_close(got1, c1, rtol=0, atol=1e-6)
        torch.testing.assert_close(got2, c2, rtol=0, atol=1e-6)
        contributions.append((got1, got2))
        eta1, eta2 = opt.natural_parameters
        torch.testing.assert_close(eta1, eta1_joint, rtol=0, atol=1e-6)
        torch.testing.assert_close(eta2, eta2_joint, rtol=0, atol=1e-6)

        next_ess = sizes[t + 1] if t + 1 < len(sizes) else None
        carry_posterior_to_prior(opt, keep_hess=False, next_ess=next_ess)

    # lambda_T = lambda_0 + sum_t c_t, and the final prior is the joint posterior
    e1, e2 = initial.natural_parameters
    for c1, c2 in contributions:
        e1, e2 = e1 + c1, e2 + c2
    final1, final2 = opt.prior.natural_parameters
    torch.testing.assert_close(final1, e1, rtol=0, atol=1e-6)
    torch.testing.assert_close(final2, e2, rtol=0, atol=1e-6)
    joint = DiagonalGaussian.from_natural(eta1_joint, eta2_joint)
    torch.testing.assert_close(opt.prior.mean, joint.mean, rtol=0, atol=1e-8)
    assert not torch.allclose(joint.mean, m0, atol=1e-2)  # the data did move the posterior


# ----------------------------------------------------------------------------- properties


def test_prior_of_next_experience_is_posterior_of_previous():
    _, opt = trained_ivon()
    posterior, hess = opt.posterior, opt.hess
    prior = carry_posterior_to_prior(opt, keep_hess=True)
    assert torch.equal(prior.mean, posterior.mean) and torch.equal(prior.precision, posterior.precision)
    assert torch.equal(opt.prior_mean, posterior.mean) and torch.equal(opt.prior_precision, posterior.precision)
    assert torch.equal(opt.hess, hess)
    assert torch.equal(opt.mean, posterior.mean)  # the weights stay where they were
    # ess unchanged: the new posterior counts the old data in the prior and (keep_hess) in h again
    torch.testing.assert_close(opt.precision, opt.ess * hess + posterior.precision)


@settings(max_examples=25, deadline=None)
@given(
    temper=st.floats(1e-3, 10.0),
    next_ess=st.one_of(st.none(), st.floats(1.0, 1e5)),
    keep_hess=st.booleans(),
)
def test_carry_tempers_the_natural_parameters_and_sets_the_next_ess(temper, next_ess, keep_hess):
    _, opt = trained_ivon(steps=1)
    posterior, hess, ess = opt.posterior, opt.hess, opt.ess
    prior = carry_posterior_to_prior(opt, keep_hess=keep_hess, temper=temper, next_ess=next_ess)
    for got, want in zip(prior.natural_parameters, posterior.natural_parameters, strict=True):
        torch.testing.assert_close(got, temper * want)
    assert torch.equal(opt.prior_precision, temper * posterior.precision)  # kept, whatever the new ess
    assert opt.ess == (ess if next_ess is None else next_ess)
    n0 = 5 * 4 + 5  # first group's size; its hess_init is 1.0, the second group's 0.2
    expected_hess = hess if keep_hess else torch.cat([torch.full((n0,), 1.0), torch.full((hess.numel() - n0,), 0.2)])
    assert torch.equal(opt.hess, expected_hess)
    torch.testing.assert_close(opt.precision, opt.ess * expected_hess + temper * posterior.precision)


def test_accumulation_without_data_changes_nothing_and_validates():
    _, opt = trained_ivon()
    before, prior_precision = opt.posterior, opt.prior_precision
    with pytest.raises(ValueError, match="temper"):
        carry_posterior_to_prior(opt, keep_hess=True, temper=0.0)
    with pytest.raises(ValueError, match="temper"):
        carry_posterior_to_prior(opt, keep_hess=True, temper=math.nan)
    with pytest.raises(ValueError, match="next_ess"):
        carry_posterior_to_prior(opt, keep_hess=True, next_ess=-1)
    assert torch.equal(opt.prior_precision, prior_precision) and opt.ess == 40.0  # untouched
    with opt.sampled_params(train=True):
        opt.zero_grad()
        opt.params[0].sum().backward()
    with pytest.raises(RuntimeError, match="pending"):
        carry_posterior_to_prior(opt, keep_hess=True)
    assert torch.equal(opt.prior_precision, prior_precision)
    c1, c2 = contribution(before, before)
    assert torch.equal(c1, torch.zeros_like(c1)) and torch.equal(c2, torch.zeros_like(c2))


def test_carry_with_a_negative_hessian_entry_resets_before_the_new_prior():
    """h may be negative where delta is large (only h + delta > 0 is kept); the carry must not trip on it."""
    import torch

    from cl_bayes.ivon import IVON
    from cl_bayes.natural import carry_posterior_to_prior

    w = torch.nn.Parameter(torch.zeros(3))
    opt = IVON([w], lr=0.1, ess=10.0, hess_init=0.5, weight_decay=1.0)
    opt.hess = torch.tensor([-0.5, 0.2, 0.3])  # h + delta = 0.5 > 0, but 2h + delta < 0
    before = opt.posterior
    prior = carry_posterior_to_prior(opt, keep_hess=False)
    assert torch.allclose(prior.precision, before.precision)
    assert torch.allclose(opt.hess, torch.full((3,), 0.5))


def test_debiased_carry_uses_the_data_hessian_not_the_leftover_hess_init():
    """prior_precision_{t+1} = temper * (ess * data_hess + prior_precision_t): h's leftover hess_init is dropped."""
    model, opt = trained_ivon(steps=50, beta2=0.99)
    before_prior = opt.prior_precision
    expected = 0.5 * (opt.data_hess * opt.ess + before_prior)
    raw = 0.5 * opt.precision
    prior = carry_posterior_to_prior(opt, keep_hess=False, temper=0.5, debias_hess=True)
    assert torch.allclose(prior.precision, expected)
    assert not torch.allclose(prior.precision, raw)
    assert (prior.precision >= 0.5 * before_prior).all()
