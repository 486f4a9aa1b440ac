"""cl_bayes.ivon: the update equations, the reference oracle, sampling, posterior bookkeeping, checkpoints.

The oracle is ``ivon-opt`` 0.1.3 (GPL-3.0, dev dependency): imported here only, never by cl_bayes.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cl_bayes.ivon import IVON, hessian_estimate, hessian_update, mean_update, momentum_update, posterior_std
from cl_bayes.posterior import DiagonalGaussian

ivon_ref = pytest.importorskip("ivon")

X = torch.randn(32, 5, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(2))


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def loss_fn(model: torch.nn.Module) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(X), Y)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def train_step(opt, model, mc_samples: int, seed: int) -> None:
    """The by-hand loop of the ivon-opt README, with a fixed seed for the noise."""
    torch.manual_seed(seed)
    for _ in range(mc_samples):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            loss_fn(model).backward()
    opt.step()


def two_groups(model: torch.nn.Module) -> list[dict]:
    return [
        {"params": model[0].parameters()},
        {"params": model[2].parameters(), "lr": 0.05, "weight_decay": 3e-2, "hess_init": 0.3},
    ]


# ----------------------------------------------------------------------------- equations


def test_equations_match_the_paper_formulas_and_out_paths_match_pure():
    g = torch.Generator().manual_seed(0)
    n = 50
    h = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    hhat = torch.randn(n, generator=g, dtype=torch.float64) * 3
    delta = torch.rand(n, generator=g, dtype=torch.float64)
    m, m0, mom = (torch.randn(n, generator=g, dtype=torch.float64) for _ in range(3))
    ghat, z = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    ess, beta1, beta2, lr, debias = 40.0, 0.8, 0.9, 0.3, 0.2
    inputs = (h.clone(), m.clone(), mom.clone())

    sigma = 1 / torch.sqrt(ess * (h + delta))
    torch.testing.assert_close(posterior_std(h, delta, ess), sigma)
    eps = sigma * z
    torch.testing.assert_close(hessian_estimate(ghat * z, sigma), ghat * eps / sigma**2)
    torch.testing.assert_close(momentum_update(mom, ghat, beta1), beta1 * mom + (1 - beta1) * ghat)
    h_new = beta2 * h + (1 - beta2) * hhat + 0.5 * (1 - beta2) ** 2 * (h - hhat) ** 2 / (h + delta)
    torch.testing.assert_close(hessian_update(h, hhat, delta, beta2), h_new)
    for clip in (math.inf, 0.5):
        step = ((mom / debias + delta * (m - m0)) / (h + delta)).clamp(-clip, clip)
        expected = m - lr * step
        torch.testing.assert_close(mean_update(m, mom, h, delta, m0, lr, debias, clip), expected)
        # the optimizer's in-place path: out aliases the state, scratch given
        m_inplace, work = m.clone(), (torch.empty_like(m), torch.empty_like(m))
        mean_update(m_inplace, mom, h, delta, m0, lr, debias, clip, out=m_inplace, work=work)
        torch.testing.assert_close(m_inplace, expected)
        if clip < math.inf:
            assert (step.abs() == clip).any()  # the clip was active
    h_inplace = h.clone()
    hessian_update(h_inplace, hhat, delta, beta2, out=h_inplace, work=(torch.empty_like(h), torch.empty_like(h)))
    torch.testing.assert_close(h_inplace, h_new)
    assert torch.equal(h, inputs[0]) and torch.equal(m, inputs[1]) and torch.equal(mom, inputs[2])  # pure calls


@settings(max_examples=60, deadline=None)
@given(
    delta=st.floats(0.0, 1e3),
    h_offset=st.floats(1e-3, 1e3),
    hhat=st.floats(-1e6, 1e6),
    beta2=st.floats(0.0, 1.0),
)
def test_hessian_update_keeps_precision_positive(delta, h_offset, hhat, beta2):
    """Riemannian correction: h' + delta >= (h + delta) / 2 for any hhat, even when h < 0 < h + delta."""
    h = torch.tensor([h_offset - delta], dtype=torch.float64)
    d = torch.tensor([delta], dtype=torch.float64)
    new = hessian_update(h, torch.tensor([hhat], dtype=torch.float64), d, beta2)
    scale = 1e-9 * (abs(hhat) + abs(h.item()) + delta + 1)
    assert (new + d).item() >= 0.5 * (h + d).item() - scale


# ----------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("mc_samples", [1, 2])
@pytest.mark.parametrize(
    "options",
    [{}, {"rescale_lr": False, "debias": False}, {"clip_radius": 1e-3}],
    ids=["defaults", "no-rescale-no-debias", "clipped"],
)
def test_matches_ivon_opt_step_for_step(mc_samples, options):
    """Zero-mean isotropic prior (weight_decay), two parameter groups: same weights and hess as ivon-opt."""
    ours_model, ref_model = make_model(), make_model()
    kwargs = dict(lr=0.1, ess=50.0, mc_samples=mc_samples, weight_decay=1e-2, hess_init=0.5, beta2=0.99, **options)
    ours = IVON(two_groups(ours_model), **kwargs)
    ref = ivon_ref.IVON(two_groups(ref_model), **kwargs)
    for t in range(6):
        train_step(ours, ours_model, mc_samples, seed=100 + t)
        train_step(ref, ref_model, mc_samples, seed=100 + t)
        torch.testing.assert_close(flat(ours_model.parameters()), flat(ref_model.parameters()), rtol=1e-5, atol=1e-6)
        ref_hess = torch.cat([g["hess"] for g in ref.param_groups])
        ref_momentum = torch.cat([g["momentum"] for g in ref.param_groups])
        torch.testing.assert_close(ours.hess, ref_hess, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours._momentum, ref_momentum, rtol=1e-5, atol=1e-7)
    assert not torch.equal(flat(ours_model.parameters()), flat(make_model().parameters()))  # it did move
    assert not torch.allclose(ours.hess[:10], torch.tensor(0.5))  # the hess did move too


def test_closure_step_equals_the_by_hand_loop():
    """step(closure): closure called mc_samples times, each inside sampled_params(train=True)."""
    a_model, b_model = make_model(), make_model()
    a = IVON(a_model.parameters(), lr=0.1, ess=50.0, mc_samples=2)
    b = IVON(b_model.parameters(), lr=0.1, ess=50.0, mc_samples=2)
    calls = []

    def closure():
        calls.append(b._sampling)
        b.zero_grad()
        loss = loss_fn(b_model)
        loss.backward()
        return loss

    for t in range(3):
        train_step(a, a_model, 2, seed=t)
        torch.manual_seed(t)
        loss = b.step(closure)
        assert loss.shape == ()
    assert calls == [True] * 6
    assert torch.equal(flat(a_model.parameters()), flat(b_model.parameters()))
    assert torch.equal(a.hess, b.hess)


def test_zero_precision_prior_is_plain_ivon():
    """set_prior(precision=0) (any prior mean) follows ivon-opt with weight_decay=0."""
    ours_model, ref_model = make_model(), make_model()
    ours = IVON(ours_model.parameters(), lr=0.1, ess=50.0, weight_decay=0.3, rescale_lr=False)
    ours.set_prior(mean=torch.randn(ours.mean.numel()), precision=0.0)
    ref = ivon_ref.IVON(ref_model.parameters(), lr=0.1, ess=50.0, weight_decay=0.0, rescale_lr=False)
    for t in range(4):
        train_step(ours, ours_model, 1, seed=t)
        train_step(ref, ref_model, 1, seed=t)
    torch.testing.assert_close(flat(ours_model.parameters()), flat(ref_model.parameters()), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.hess, ref.param_groups[0]["hess"], rtol=1e-5, atol=1e-6)


def test_mean_gradient_enters_the_momentum_and_not_the_hessian_estimate():
    """add_mean_gradient(G): the step is the one whose ghat is the samples' average + G, with the
    Hessian of the step without G (a term of the mean has no curvature), and it is consumed."""
    models = [make_model() for _ in range(3)]
    opts = [IVON(m.parameters(), lr=0.1, ess=50.0, mc_samples=2, hess_init=0.5) for m in models]
    extra = [torch.randn_like(p) for p in models[0].parameters()]
    extra[1] = None  # a parameter the term does not touch
    for t in range(3):
        for k, (opt, model) in enumerate(zip(opts, models, strict=True)):
            torch.manual_seed(t)
            for _ in range(2):
                with opt.sampled_params(train=True):
                    opt.zero_grad()
                    loss_fn(model).backward()
                    if k == 2:  # the same G added to each sample's gradient: enters ghat *and* hhat
                        for p, g in zip(model.parameters(), extra, strict=True):
                            if g is not None:
                                p.grad += g
            if k == 1:
                opt.add_mean_gradient(extra)
            opt.step()
        plain, with_mean, in_samples = opts
        torch.testing.assert_close(with_mean.hess, plain.hess)  # same noise, same hhat: G adds no curvature
        assert not torch.allclose(in_samples.hess, plain.hess)  # through the samples it would
        torch.testing.assert_close(with_mean._momentum, in_samples._momentum)  # ghat + G either way
        for opt in opts:  # keep the three on the same posterior for the next step's check
            opt.hess = plain.hess
            opt._momentum.copy_(in_samples._momentum)
            opt._flat.copy_(in_samples._flat)
    with pytest.raises(ValueError, match="gradients"):
        opts[1].add_mean_gradient(extra[:2])
    with pytest.raises(ValueError, match="shape"):
        opts[1].add_mean_gradient([torch.zeros(2)] + extra[1:])
    assert not opts[1]._has_mean_grad  # each G is used by one step only


# ----------------------------------------------------------------------------- sampling


def test_sampled_params_restores_the_mean_when_the_body_raises_and_records_nothing():
    model = make_model()
    opt = IVON(model.parameters(), lr=0.1, ess=50.0)
    mean = opt.mean
    with pytest.raises(KeyError):
        with opt.sampled_params(train=True):
            assert not torch.equal(flat(model.parameters()), mean)  # a sample is in the weights
            torch.testing.assert_close(opt.mean, mean)  # ... but `mean` is still the mean
            loss_fn(model).backward()
            raise KeyError("boom")
    assert torch.equal(flat(model.parameters()), mean)
    assert opt._count == 0
    with pytest.raises(RuntimeError, match="no gradient sample"):
        opt.step()
    assert torch.equal(flat(model.parameters()), mean)
    train_step(opt, model, 1, seed=0)  # still usable
    assert not torch.equal(flat(model.parameters()), mean)


def test_sample_has_the_posterior_scale_and_uses_current_ess_and_prior():
    model = make_model()
    opt = IVON(model.parameters(), lr=0.1, ess=50.0)
    n = opt.mean.numel()
    opt.set_prior(mean=torch.randn(n), precision=torch.rand(n) * 10)
    opt.hess = torch.rand(n) + 0.1
    opt.ess = 7.0
    mean = opt.mean
    torch.manual_seed(3)
    z = torch.randn(n)
    torch.manual_seed(3)
    with opt.sampled_params():
        sample = flat(model.parameters())
    torch.testing.assert_close(sample, mean + z * opt.precision.rsqrt())
    torch.testing.assert_close(opt.precision, 7.0 * opt.hess + opt.prior_precision)


def test_sampled_params_is_not_reentrant_and_step_inside_is_refused():
    model = make_model()
    opt = IVON(model.parameters(), lr=0.1, ess=50.0)
    with opt.sampled_params(train=True):
        loss_fn(model).backward()
        with pytest.raises(RuntimeError, match="re-entrant"):
            with opt.sampled_params():
                pass
        with pytest.raises(RuntimeError, match="after leaving"):
            opt.step()


def test_parameters_without_grad_are_skipped_and_frozen_ones_excluded():
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3), torch.nn.Linear(3, 3))
    model[2].bias.requires_grad_(False)
    frozen = model[2].bias.detach().clone()
    opt = IVON(model.parameters(), lr=0.1, ess=50.0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert opt.params == tuple(trainable)
    assert opt.mean.numel() == sum(p.numel() for p in trainable)
    torch.testing.assert_close(opt.mean, flat(trainable))  # flat order = model.parameters() order
    unused = slice(opt.mean.numel() - model[2].weight.numel(), opt.mean.numel())  # model[2].weight: no grad
    before_mean, before_hess = opt.mean, opt.hess
    for t in range(3):
        torch.manual_seed(t)
        with opt.sampled_params(train=True):
            assert torch.equal(model[2].bias, frozen)  # frozen parameters are not sampled either
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model[1](model[0](X)), Y).backward()
        opt.step()
    assert torch.equal(opt.mean[unused], before_mean[unused])
    assert torch.equal(opt.hess[unused], before_hess[unused])
    assert torch.equal(opt._momentum[unused], torch.zeros(model[2].weight.numel()))
    assert not torch.equal(opt.mean[: unused.start], before_mean[: unused.start])
    assert not torch.equal(opt.hess[: unused.start], before_hess[: unused.start])
    assert torch.equal(model[2].bias, frozen)


def test_replaced_storage_is_adopted_and_size_changes_raise():
    replaced, in_place = make_model(), make_model()
    opts = [IVON(m.parameters(), lr=0.1, ess=50.0) for m in (replaced, in_place)]
    new_weight = torch.randn(7, 5)
    replaced[0].weight.data = new_weight.clone()  # e.g. load_state_dict(assign=True)
    with torch.no_grad():
        in_place[0].weight.copy_(new_weight)
    for opt, model in zip(opts, (replaced, in_place), strict=True):
        train_step(opt, model, 1, seed=0)
    assert torch.equal(opts[0].mean, opts[1].mean)  # the new value was adopted as the mean
    assert replaced[0].weight.data_ptr() == opts[0]._flat.data_ptr()  # relinked into the flat mean
    replaced[2].weight.data = torch.randn(8, 7)  # a growing head
    with pytest.raises(ValueError, match="changed size"):
        with opts[0].sampled_params():
            pass


def test_new_trainable_parameter_in_the_group_raises():
    model = make_model()
    opt = IVON(model.parameters(), lr=0.1, ess=50.0)
    opt.param_groups[0]["params"].append(torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(ValueError, match="new trainable"):
        with opt.sampled_params():
            pass
    with pytest.raises(RuntimeError, match="fixed at construction"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})


# ----------------------------------------------------------------------------- posterior


def test_posterior_properties_are_consistent():
    model = make_model()
    opt = IVON(model.parameters(), lr=0.1, ess=50.0, weight_decay=1e-2)
    for t in range(3):
        train_step(opt, model, 1, seed=t)
    n = opt.mean.numel()
    torch.testing.assert_close(opt.prior_precision, torch.full((n,), 50.0 * 1e-2))
    torch.testing.assert_close(opt.precision, 50.0 * (opt.hess + 1e-2))
    torch.testing.assert_close(opt.variance, 1 / opt.precision)
    post = opt.posterior
    assert isinstance(post, DiagonalGaussian)
    torch.testing.assert_close(post.mean, flat(model.parameters()))
    eta1, eta2 = opt.natural_parameters
    torch.testing.assert_close(eta1, opt.precision * opt.mean)
    torch.testing.assert_close(eta2, -opt.precision / 2)


@settings(max_examples=25, deadline=None)
@given(ess1=st.floats(1.0, 1e5), ess2=st.floats(1.0, 1e5), scale=st.floats(0.0, 1e3))
def test_changing_ess_keeps_the_prior_precision(ess1, ess2, scale):
    model = make_model()
    opt = IVON(model.parameters(), lr=0.1, ess=ess1)
    n = opt.mean.numel()
    precision = torch.linspace(0.0, 1.0, n) * scale
    opt.set_prior(precision=precision)
    hess = opt.hess
    opt.ess = ess2
    assert opt.ess == ess2
    assert torch.equal(opt.prior_precision, precision)
    torch.testing.assert_close(opt.precision, ess2 * hess + precision, rtol=1e-5, atol=1e-4)


def test_setters_validate():
    model = make_model()
    opt = IVON(model.parameters(), lr=0.1, ess=50.0)
    n = opt.mean.numel()
    with pytest.raises(ValueError, match="shape"):
        opt.set_prior(mean=torch.zeros(n + 1))
    with pytest.raises(ValueError, match=">= 0"):
        opt.set_prior(precision=-1.0)
    with pytest.raises(ValueError, match="finite"):
        opt.hess = torch.full((n,), math.nan)
    with pytest.raises(ValueError, match="precision per example"):
        opt.hess = -1.0  # h + delta <= 0
    with pytest.raises(ValueError, match="ess"):
        opt.ess = 0.0
    opt.hess = 2.0
    opt.reset_hess()
    assert torch.equal(opt.hess, torch.ones(n))
    with opt.sampled_params(train=True):
        loss_fn(model).backward()
    with pytest.raises(RuntimeError, match="pending"):
        opt.ess = 10.0


@pytest.mark.parametrize(
    "bad",
    [
        {"lr": -0.1},
        {"lr": math.nan},
        {"ess": 0.0},
        {"ess": -5.0},
        {"ess": math.inf},
        {"hess_init": 0.0},
        {"beta1": 1.0},
        {"beta1": -0.1},
        {"beta2": 1.5},
        {"weight_decay": -1e-4},
        {"mc_samples": 0},
        {"mc_samples": 1.5},
        {"clip_radius": 0.0},
    ],
)
def test_bad_hyperparameters_raise_value_error(bad):
    name = next(iter(bad))
    kwargs = {"lr": 0.1, "ess": 10.0, **bad}
    with pytest.raises(ValueError, match=name):
        IVON(make_model().parameters(), **kwargs)


def test_bad_group_settings_and_positional_arguments():
    model = make_model()
    with pytest.raises(ValueError, match="lr"):
        IVON([{"params": model[0].parameters(), "lr": -1.0}], lr=0.1, ess=10.0)
    with pytest.raises(ValueError, match="ess is global"):
        IVON([{"params": model[0].parameters(), "ess": 3.0}], lr=0.1, ess=10.0)
    with pytest.raises(TypeError):
        IVON(model.parameters(), 0.1, 10.0)  # keyword-only hyper-parameters


# ----------------------------------------------------------------------------- checkpoints and Avalanche


def test_state_dict_round_trip_continues_exactly():
    model = make_model()
    opt = IVON(two_groups(model), lr=0.1, ess=50.0, mc_samples=2)
    opt.set_prior(mean=torch.randn(opt.mean.numel()), precision=torch.rand(opt.mean.numel()))
    for t in range(3):
        train_step(opt, model, 2, seed=t)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)

    copy_model = make_model(seed=1)
    copy_model.load_state_dict(saved["model"])
    copy_opt = IVON(two_groups(copy_model), lr=0.5, ess=3.0, weight_decay=0.2)
    copy_opt.load_state_dict(saved["opt"])
    assert copy_opt.ess == 50.0 and copy_opt.mc_samples == 2
    for t in range(3, 6):
        train_step(opt, model, 2, seed=t)
        train_step(copy_opt, copy_model, 2, seed=t)
    assert torch.equal(flat(copy_model.parameters()), flat(model.parameters()))
    for name in ("hess", "prior_mean", "prior_precision", "precision"):
        assert torch.equal(getattr(copy_opt, name), getattr(opt, name)), name
    assert torch.equal(copy_opt._momentum, opt._momentum)
    with pytest.raises(ValueError, match="not an IVON state dict"):
        copy_opt.load_state_dict(torch.optim.SGD(copy_model.parameters(), lr=0.1).state_dict())


def test_avalanche_optimizer_reset_leaves_posterior_momentum_and_steps_intact():
    """make_optimizer -> reset_optimizer / update_optimizer(reset_state=True) replace opt.state; IVON's
    posterior (mean, hess, prior), momentum and step count live outside it, so training continues exactly
    as without the reset (also when the reset adds the model's frozen parameters to the group)."""
    dynamic = pytest.importorskip("avalanche.models.dynamic_optimizers")
    models = [make_model(), make_model()]
    for m in models:
        m[0].bias.requires_grad_(False)
    opts = [IVON(m.parameters(), lr=0.1, ess=50.0) for m in models]
    for opt in opts:
        opt.set_prior(mean=0.1, precision=2.0)
    for t in range(3):
        for opt, m in zip(opts, models, strict=True):
            train_step(opt, m, 1, seed=t)
    before = {name: getattr(opts[0], name) for name in ("mean", "hess", "prior_mean", "prior_precision")}
    momentum, steps = opts[0]._momentum.clone(), opts[0]._step_count

    opts[0].state["junk"] = 1
    dynamic.reset_optimizer(opts[0], models[0])
    assert "junk" not in opts[0].state  # avalanche did reset the torch state...
    assert len(opts[0].param_groups[0]["params"]) == 4  # ...and put the frozen bias in the group
    for name, value in before.items():
        assert torch.equal(getattr(opts[0], name), value), name  # ...but not IVON's posterior
    assert torch.equal(opts[0]._momentum, momentum) and opts[0]._step_count == steps
    dynamic.update_optimizer(opts[0], dict(models[0].named_parameters()), reset_state=True)

    for t in range(3, 6):
        for opt, m in zip(opts, models, strict=True):
            train_step(opt, m, 1, seed=t)
    assert torch.equal(flat(models[0].parameters()), flat(models[1].parameters()))
    assert torch.equal(opts[0].hess, opts[1].hess)


def test_deepcopy_of_a_model_does_not_share_the_flat_mean():
    model = make_model()
    opt = IVON(model.parameters(), lr=0.1, ess=50.0)
    clone = copy.deepcopy(model)
    train_step(opt, model, 1, seed=0)
    assert not torch.equal(flat(clone.parameters()), flat(model.parameters()))


def _quadratic_run(steps: int, *, beta2: float, mc_samples: int, curvature: torch.Tensor, seed: int = 0) -> IVON:
    """IVON on the loss 0.5 * sum(A * w^2): every hhat has expectation A, the true per-example Hessian."""
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.zeros(curvature.numel()))
    opt = IVON([w], lr=0.05, ess=200.0, hess_init=1.0, beta2=beta2, weight_decay=1e-2, mc_samples=mc_samples)
    for _ in range(steps):
        for _ in range(mc_samples):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                (0.5 * (curvature * w**2).sum()).backward()
        opt.step()
    return opt


def test_data_hess_removes_what_is_left_of_hess_init():
    """After 300 steps at beta2 0.999, h is still 74 % hess_init; data_hess is the data's Hessian A.

    A weight with A = 0 (an input that is never lit) has hhat = 0 at every step: data_hess is 0, h is not.
    """
    curvature = torch.tensor([4.0, 0.5, 0.05, 0.0])
    opt = _quadratic_run(300, beta2=0.999, mc_samples=16, curvature=curvature)
    decay = 0.999**300
    assert torch.allclose(opt.hess, decay * 1.0 + (1 - decay) * curvature, rtol=0.1, atol=0.01)
    assert (opt.hess[1:] > 0.7).all()  # mostly hess_init
    # beta2-weighted mean of 300 x 16 chi-square(1) draws: relative std ~ 0.02
    assert torch.allclose(opt.data_hess[:3], curvature[:3], rtol=0.1)
    assert opt.data_hess[3] < 1e-3 < 0.7 < opt.hess[3]  # 1e-3: the update's O((1 - beta2)^2) correction
    # the debiasing restarts when h is set, and state dicts carry it
    state = opt.state_dict()
    fresh = _quadratic_run(0, beta2=0.999, mc_samples=16, curvature=curvature)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.data_hess, opt.data_hess)
    opt.reset_hess()
    assert torch.equal(opt.data_hess, opt.hess)


def test_data_hess_is_h_when_beta2_freezes_it_and_never_negative():
    opt = _quadratic_run(5, beta2=1.0, mc_samples=1, curvature=torch.tensor([1.0, 2.0]))
    assert torch.equal(opt.data_hess, opt.hess)
    opt = _quadratic_run(1, beta2=0.9, mc_samples=16, curvature=torch.tensor([-1.0, 1.0]))
    assert opt.data_hess[0] == 0 and opt.data_hess[1] > 0  # a concave direction's estimate is clamped


# ----------------------------------------------------------------------------- the fused step


def _reference_run(model, groups_of, kwargs, *, steps, mc_samples, prior, curvature, mean_grad, unused):
    """The step written with the pure equation functions (one line of Algorithm 1 each), on flat float64 tensors.

    Same noise as the optimizer (one normal_ per group, in order, after a fixed seed per step), the
    gradient at each sample from a copy of the model, per-group hyper-parameters, a prior with a mean and
    per-weight precision, a mean-gradient term, a mean curvature and a parameter without gradient.
    """
    ref = copy.deepcopy(model)
    params = [p for g in groups_of(ref) for p in g]  # the optimizer's flat order
    m = flat(params).clone()
    n = m.numel()
    sizes = [sum(p.numel() for p in g) for g in groups_of(ref)]
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    settings_ = [dict(kwargs, **{k: v for k, v in g.items() if k != "params"}) for g in two_groups(ref)]
    prior_mean, prior_precision = prior
    ess = kwargs["ess"]
    delta = prior_precision / ess
    h = torch.cat([torch.full((s,), float(c["hess_init"]), dtype=m.dtype)
                   for s, c in zip(sizes, settings_, strict=True)])
    mom = torch.zeros(n, dtype=m.dtype)
    unused_slice = slice(n - unused, n)
    for t in range(steps):
        torch.manual_seed(100 + t)
        sigma = posterior_std(h, delta, ess)
        ghat, gz = torch.zeros(n, dtype=m.dtype), torch.zeros(n, dtype=m.dtype)
        for _ in range(mc_samples):
            z = torch.cat([torch.empty(s, dtype=m.dtype).normal_() for s in sizes])
            torch.nn.utils.vector_to_parameters(m + sigma * z, params)
            ref.zero_grad()
            loss_fn(ref).backward()
            g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            ghat += g
            gz += g * z
        ghat, gz = ghat / mc_samples, gz / mc_samples
        ghat = ghat + mean_grad
        hhat = hessian_estimate(gz, sigma)
        old = m[unused_slice].clone(), h[unused_slice].clone(), mom[unused_slice].clone()
        for sl, c in zip(slices, settings_, strict=True):
            mom[sl] = momentum_update(mom[sl], ghat[sl], c["beta1"])
            h_new = hessian_update(h[sl], hhat[sl], delta[sl], c["beta2"])
            lr = c["lr"] * (c["hess_init"] + c["weight_decay"])
            debias = 1 - c["beta1"] ** (t + 1)
            m[sl] = mean_update(
                m[sl], mom[sl], h_new, delta[sl], prior_mean[sl], lr, debias, c.get("clip_radius", math.inf),
                curvature=curvature[sl],
            )
            h[sl] = h_new
        m[unused_slice], h[unused_slice], mom[unused_slice] = old
    return m, h, mom


@pytest.mark.parametrize("mc_samples", [1, 3])
@pytest.mark.parametrize("clip", [math.inf, 2e-3], ids=["unclipped", "clipped"])
def test_fused_step_equals_the_equations(mc_samples, clip):
    """The optimizer's fused in-place step is the composition of the pure equation functions (float64).

    Covers the paths the ivon-opt oracle cannot: a prior with a mean and per-weight precision, a term
    of the mean (gradient and curvature), a parameter without gradient, three samples per step.
    """
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    model.register_parameter("unused", torch.nn.Parameter(torch.randn(4, dtype=torch.float64)))
    groups_of = lambda net: [list(net[0].parameters()), list(net[2].parameters()) + [net.unused]]  # noqa: E731

    def groups(net):
        first, second = groups_of(net)
        return [{"params": first}, {"params": second, "lr": 0.05, "weight_decay": 3e-2, "hess_init": 0.3}]

    kwargs = dict(lr=0.1, ess=50.0, weight_decay=1e-2, hess_init=0.5, beta1=0.8, beta2=0.9, clip_radius=clip)
    n = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(5)
    prior = (torch.randn(n, generator=gen, dtype=torch.float64) * 0.1,
             torch.rand(n, generator=gen, dtype=torch.float64))
    curvature = torch.rand(n, generator=gen, dtype=torch.float64)
    mean_grad = torch.randn(n, generator=gen, dtype=torch.float64) * 0.1
    mean_grad[n - 4 :] = 0.0

    global X  # the loss of this module, in float64
    x_before = X
    X = X.double()
    try:
        expected = _reference_run(
            model, groups_of, kwargs, steps=4, mc_samples=mc_samples, prior=prior, curvature=curvature,
            mean_grad=mean_grad, unused=4,
        )
        opt = IVON(groups(model), mc_samples=mc_samples, **kwargs)
        initial = opt.mean
        opt.set_prior(mean=prior[0], precision=prior[1])
        opt.mean_curvature = curvature
        for t in range(4):
            torch.manual_seed(100 + t)
            for _ in range(mc_samples):
                with opt.sampled_params(train=True):
                    opt.zero_grad(set_to_none=True)
                    loss_fn(model).backward()
            pieces = mean_grad.split([p.numel() for p in opt.params])
            opt.add_mean_gradient([g.view_as(p) for g, p in zip(pieces, opt.params, strict=True)])
            opt.step()
    finally:
        X = x_before
    for name, ours, theirs in zip(("mean", "hess", "momentum"), (opt.mean, opt.hess, opt._momentum), expected,
                                  strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12, msg=name)
    assert not torch.allclose(opt.mean[:-4], initial[:-4])
    assert torch.equal(opt.mean[-4:], initial[-4:])


class _PairedByHand(IVON):
    """The default optimizer fed z1, -z1, z2, -z2, ... by hand: what antithetic=True claims to be."""

    draws = 0

    def _draw_noise(self) -> float:
        self.draws += 1
        if self.draws % 2:
            super()._draw_noise()
            self.previous = self._noise.clone()
        else:
            torch.neg(self.previous, out=self._noise)
        return 1.0


@pytest.mark.parametrize("mc_samples", [1, 2])
def test_antithetic_noise_is_the_only_difference(mc_samples):
    """antithetic=True equals the default step fed the noise pairs (z, -z) by hand, bit for bit; it draws
    half the random numbers, and the default (which the ivon-opt oracle test covers) differs."""
    models = [make_model() for _ in range(3)]
    kwargs = dict(lr=0.1, ess=50.0, mc_samples=mc_samples, weight_decay=1e-2, hess_init=0.5, beta2=0.99)
    anti = IVON(two_groups(models[0]), antithetic=True, **kwargs)
    by_hand = _PairedByHand(two_groups(models[1]), **kwargs)
    plain = IVON(two_groups(models[2]), **kwargs)
    rng_after = []
    for opt, model in zip((anti, by_hand, plain), models, strict=True):
        torch.manual_seed(7)
        for _ in range(4):
            for _ in range(mc_samples):
                with opt.sampled_params(train=True):
                    opt.zero_grad()
                    loss_fn(model).backward()
            opt.step()
        rng_after.append(torch.randn(1))
    assert torch.equal(flat(models[0].parameters()), flat(models[1].parameters()))
    assert torch.equal(anti.hess, by_hand.hess) and torch.equal(anti._momentum, by_hand._momentum)
    assert not torch.allclose(flat(models[0].parameters()), flat(models[2].parameters()))
    assert torch.equal(rng_after[0], rng_after[1]) and not torch.equal(rng_after[0], rng_after[2])  # half the draws

    # the pair shares |eps|: a second sample at the same posterior is the mirror image of the first
    mean = anti.mean
    eps = []
    for _ in range(3):
        with torch.no_grad(), anti.sampled_params():
            eps.append(flat(models[0].parameters()) - mean)
    torch.testing.assert_close(eps[1], -eps[0])  # (m + a) - m and (m - a) - m: equal up to rounding
    assert not torch.allclose(eps[2].abs(), eps[0].abs())
    assert torch.equal(flat(models[0].parameters()), mean)
    state = anti.state_dict()
    assert state["ivon"]["antithetic"] is True
    plain.load_state_dict(state)
    assert plain.antithetic


def test_sample_is_a_separate_buffer_and_the_mean_is_untouched_inside():
    """Inside sampled_params the weights are views of the sample buffer; the mean buffer itself is never written."""
    model = make_model()
    opt = IVON(model.parameters(), lr=0.1, ess=50.0)
    mean_buffer = opt._flat.clone()
    with opt.sampled_params(train=True):
        assert all(p.data_ptr() != q.data_ptr() for p, q in zip(model.parameters(), opt._mean_views, strict=True))
        assert torch.equal(opt._flat, mean_buffer)
        loss_fn(model).backward()
    assert all(p.data_ptr() == q.data_ptr() for p, q in zip(model.parameters(), opt._mean_views, strict=True))
    assert torch.equal(opt._flat, mean_buffer)


def _masked_input_run(steps: int, *, skip_zero_grad: bool) -> tuple[IVON, torch.nn.Linear]:
    """A linear model whose input 2 is 0 in every example (a never-lit pixel): its weights get gradient 0."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(3))
    x[:, 2] = 0.0
    y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(4))
    opt = IVON(layer.parameters(), lr=0.1, ess=64.0, hess_init=0.5, beta2=0.9, skip_zero_grad=skip_zero_grad)
    for _ in range(steps):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(layer(x), y).backward()
        opt.step()
    return opt, layer


def test_skip_zero_grad_keeps_h_where_the_loss_does_not_depend_on_the_weight():
    """hhat = g z / sigma is 0 where g = 0: without skip_zero_grad h decays towards 0 there (beta2 0.9:
    ~0.5 * 0.9^50 after 50 steps), with it h keeps hess_init; every other weight follows the same path."""
    plain, layer = _masked_input_run(50, skip_zero_grad=False)
    skip, _ = _masked_input_run(50, skip_zero_grad=True)
    unlit = torch.zeros(3, 4, dtype=torch.bool)
    unlit[:, 2] = True
    unlit = torch.cat([unlit.reshape(-1), torch.zeros(3, dtype=torch.bool)])  # weight, then bias
    assert (plain.hess[unlit] < 0.01).all()  # ~0.5 * 0.9^50 plus the update's O((1 - beta2)^2) correction
    assert torch.equal(skip.hess[unlit], torch.full((3,), 0.5))
    torch.testing.assert_close(skip.hess[~unlit], plain.hess[~unlit])
    # elsewhere the same means (the unlit weights feed nothing); there only the prior's pull, damped by h + delta
    torch.testing.assert_close(skip.mean[~unlit], plain.mean[~unlit])
    # data_hess: no data seen, so no data curvature; elsewhere the same debiasing as without skip
    assert torch.equal(skip.data_hess[unlit], torch.zeros(3))
    torch.testing.assert_close(skip.data_hess[~unlit], plain.data_hess[~unlit])
    # checkpoints carry the count of skipped steps
    fresh, _ = _masked_input_run(0, skip_zero_grad=False)
    fresh.load_state_dict(skip.state_dict())
    assert fresh.skip_zero_grad and torch.equal(fresh.data_hess, skip.data_hess)


# ----------------------------------------------------------------------------- fused (compiled) update


def _run_fused_or_not(fused: bool, *, mc_samples: int, antithetic: bool, clip: float, extras: bool) -> IVON:
    model = make_model()
    opt = IVON(two_groups(model), lr=0.1, ess=50.0, mc_samples=mc_samples, weight_decay=1e-2, hess_init=0.5,
               beta2=0.99, clip_radius=clip, antithetic=antithetic, fused=fused)
    n = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(3)
    if extras:  # a prior with a mean and per-weight precision, and a term of the mean
        opt.set_prior(mean=torch.randn(n, generator=gen) * 0.1, precision=torch.rand(n, generator=gen) + 0.1)
        opt.mean_curvature = torch.rand(n, generator=gen)
    mean_grad = torch.randn(n, generator=gen) * 0.1
    torch.manual_seed(11)
    for t in range(6):
        for _ in range(mc_samples):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                loss_fn(model).backward()
            if extras and t % 2:  # an evaluation sample between the recorded one and the step
                with torch.no_grad(), opt.sampled_params():
                    model(X)
        if extras:
            pieces = mean_grad.split([p.numel() for p in opt.params])
            opt.add_mean_gradient([g.view_as(p) for g, p in zip(pieces, opt.params, strict=True)])
        opt.step()
    return opt


def test_fused_update_equals_the_eager_step():
    """fused=True (the update compiled into one loop, g * z formed inside it) is the eager step to float
    rounding: one and two samples, antithetic or not, clipped or not, with a prior mean, a term of the mean
    (gradient and curvature) and an evaluation sample between the recorded one and the step."""
    pytest.importorskip("torch._inductor")
    cases = [(1, False, math.inf, False), (1, True, math.inf, False), (2, False, 1e-2, False), (1, False, 1e-2, True),
             (1, True, math.inf, True)]
    for mc_samples, antithetic, clip, extras in cases:
        eager, fused = (_run_fused_or_not(f, mc_samples=mc_samples, antithetic=antithetic, clip=clip, extras=extras)
                        for f in (False, True))
        where = f"mc_samples={mc_samples} antithetic={antithetic} clip={clip} extras={extras}"
        for name in ("mean", "hess", "_momentum"):
            torch.testing.assert_close(getattr(fused, name), getattr(eager, name), rtol=1e-5, atol=1e-6,
                                       msg=f"{name}, {where}")
        assert not torch.equal(fused.hess, torch.full_like(fused.hess, fused.hess[0]))  # h did move


def test_fused_update_falls_back_to_the_eager_step_when_compilation_fails(monkeypatch):
    import cl_bayes.ivon_fused as F

    def broken(fn, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("no C++ compiler")
        return call

    monkeypatch.setattr(F, "_compiled", None)
    monkeypatch.setattr(F, "_failed", False)
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*no C\\+\\+ compiler.*eager step"):
        fused = _run_fused_or_not(True, mc_samples=1, antithetic=False, clip=math.inf, extras=True)
    eager = _run_fused_or_not(False, mc_samples=1, antithetic=False, clip=math.inf, extras=True)
    assert torch.equal(fused.mean, eager.mean) and torch.equal(fused.hess, eager.hess)
