"""VCL (cl_bayes.vcl, cl_bayes.avalanche.vcl_strategy): the maths, exact Bayesian linear regression, tiny real runs."""

from __future__ import annotations

import math

import pytest
import torch
from avalanche.training.plugins import SupervisedPlugin
from torch.distributions import Normal, kl_divergence

from cl_bayes.avalanche import runner
from cl_bayes.avalanche.benchmarks import build_benchmark
from cl_bayes.avalanche.vcl_strategy import (
    VCLCoresetParams,
    VCLParams,
    VCLStrategy,
    truncated_normal_init,
    variance_adam_group,
)
from cl_bayes.config import ConfigError
from cl_bayes.posterior import DiagonalGaussian
from cl_bayes.vcl import (
    MeanFieldGaussian,
    gaussian_kl,
    gaussian_kl_log_std,
    isotropic_prior,
    sample_weights,
    vcl_objective,
)

# --- 1. the closed-form KL ----------------------------------------------------------------


def test_gaussian_kl_is_the_closed_form():
    g = torch.Generator().manual_seed(0)
    qm, pm = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    qs = torch.rand(50, generator=g, dtype=torch.float64) + 0.1
    ps = torch.rand(50, generator=g, dtype=torch.float64) + 0.1
    expected = kl_divergence(Normal(qm, qs), Normal(pm, ps))
    assert torch.allclose(gaussian_kl(qm, qs**2, pm, ps**2, reduce=False), expected)
    assert torch.allclose(gaussian_kl(qm, qs**2, pm, ps**2), expected.sum())
    assert torch.allclose(gaussian_kl_log_std(qm, qs.log(), pm, ps**2), expected)
    q = MeanFieldGaussian(mean=qm, log_std=qs.log())
    prior = DiagonalGaussian(mean=pm, precision=ps**-2)
    assert torch.allclose(q.kl(prior), expected.sum())
    mask = torch.arange(50) % 3 == 0
    assert torch.allclose(q.kl(prior, mask), expected[mask].sum())
    # identical Gaussians: exactly zero, also for tiny variances (log-std form)
    assert gaussian_kl(qm, qs**2, qm, qs**2) == 0
    tiny = MeanFieldGaussian(mean=qm.float(), log_std=torch.full((50,), -12.0))
    assert abs(float(tiny.kl(tiny.frozen()))) < 1e-3
    assert float(q.kl(q.frozen())) == pytest.approx(0.0, abs=1e-12)


def test_mean_field_gaussian_samples_and_freezes():
    q = MeanFieldGaussian.initial(torch.tensor([1.0, -2.0]), init_std=0.5)
    assert torch.allclose(q.std, torch.tensor([0.5, 0.5]))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([q.sample(g) for _ in range(20000)])
    assert torch.allclose(draws.mean(0), q.mean, atol=0.02)
    assert torch.allclose(draws.std(0), q.std, atol=0.02)
    frozen = q.frozen()
    assert torch.allclose(frozen.variance, torch.tensor([0.25, 0.25]))
    prior = isotropic_prior(3, 2.0, like=torch.zeros(1))
    assert torch.equal(prior.mean, torch.zeros(3)) and torch.allclose(prior.variance, torch.full((3,), 2.0))


# --- 2. sequential VCL on Bayesian linear regression ------------------------------------------

NOISE_VAR = 0.5


def expected_nll(mean: torch.Tensor, log_std: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """E_q[-log N(y | x w, NOISE_VAR)], summed over examples, in closed form for q = N(mean, diag exp(2 log_std))."""
    resid = y - x @ mean
    quad = resid.square().sum() + (x.square() @ torch.exp(2 * log_std)).sum()
    return 0.5 * quad / NOISE_VAR + 0.5 * len(y) * math.log(2 * math.pi * NOISE_VAR)


def fit_vcl(x, y, prior: DiagonalGaussian) -> MeanFieldGaussian:
    """argmin of VCL's mean-form objective E_q[NLL]/N + KL(q || prior)/N, full batch (L-BFGS, float64)."""
    mean = prior.mean.clone().requires_grad_(True)
    log_std = torch.full_like(prior.mean, -1.0).requires_grad_(True)
    opt = torch.optim.LBFGS([mean, log_std], lr=1.0, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")
    n = len(y)

    def closure():
        opt.zero_grad()
        q = MeanFieldGaussian(mean=mean, log_std=log_std)
        loss = vcl_objective(expected_nll(mean, log_std, x, y) / n, q.kl(prior), n)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return MeanFieldGaussian(mean=mean.detach(), log_std=log_std.detach())


def exact_posterior(x, y, prior_var: float):
    """The joint Gaussian posterior of w under N(0, prior_var I): (mean, precision matrix)."""
    d = x.shape[1]
    precision = torch.eye(d, dtype=x.dtype) / prior_var + x.T @ x / NOISE_VAR
    return torch.linalg.solve(precision, x.T @ y / NOISE_VAR), precision


def regression_chunks(*, orthogonal: bool, d=4, n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(d, generator=g, dtype=torch.float64)
    chunks = []
    for _ in range(2):
        z = torch.randn(n, d, generator=g, dtype=torch.float64)
        if orthogonal:  # orthonormal columns, scaled: X^T X = diag(scale^2)
            z = torch.linalg.qr(z).Q * (torch.rand(d, generator=g, dtype=torch.float64) * 3 + 1)
        else:  # correlated features
            z = z @ (torch.eye(d, dtype=torch.float64) + 0.8 * torch.ones(d, d, dtype=torch.float64))
        y = z @ w_true + math.sqrt(NOISE_VAR) * torch.randn(n, generator=g, dtype=torch.float64)
        chunks.append((z, y))
    return chunks


def sequential_vcl(chunks, prior_var=1.0) -> MeanFieldGaussian:
    prior = isotropic_prior(chunks[0][0].shape[1], prior_var, like=chunks[0][0])
    for x, y in chunks:
        q = fit_vcl(x, y, prior)
        prior = q.frozen()  # the posterior of this chunk is the prior of the next
    return q


def test_sequential_vcl_equals_the_joint_posterior_for_independent_features():
    """Orthogonal design (diagonal X_k^T X_k): the exact posterior factorises, so VCL chunk by chunk is exact."""
    chunks = regression_chunks(orthogonal=True)
    for x, _ in chunks:
        gram = x.T @ x
        assert torch.allclose(gram, torch.diag(torch.diag(gram)), atol=1e-10)
    q = sequential_vcl(chunks)
    x, y = torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
    mean, precision = exact_posterior(x, y, 1.0)
    assert torch.allclose(q.mean, mean, atol=1e-6)
    assert torch.allclose(q.variance, torch.linalg.inv(precision).diagonal(), rtol=1e-5)
    joint = fit_vcl(x, y, isotropic_prior(x.shape[1], 1.0, like=x))  # the joint mean-field optimum, same answer
    assert torch.allclose(q.mean, joint.mean, atol=1e-6)
    assert torch.allclose(q.variance, joint.variance, rtol=1e-5)


def test_mean_field_loses_correlations_in_general():
    """Correlated features: the joint mean-field optimum has the exact mean and variances 1 / diag(Lambda),
    but sequential VCL drops the off-diagonal part of X_1^T X_1 and misses the joint mean."""
    chunks = regression_chunks(orthogonal=False)
    x, y = torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
    mean, precision = exact_posterior(x, y, 1.0)
    joint = fit_vcl(x, y, isotropic_prior(x.shape[1], 1.0, like=x))
    assert torch.allclose(joint.mean, mean, atol=1e-6)
    assert torch.allclose(joint.variance, 1 / precision.diagonal(), rtol=1e-5)
    q = sequential_vcl(chunks)
    assert (q.mean - mean).abs().max() > 1e-3


def test_monte_carlo_objective_is_unbiased():
    """The reparametrised-sample estimate of E_q[NLL] (what the strategy trains on) matches the closed form."""
    (x, y), _ = regression_chunks(orthogonal=False)
    q = MeanFieldGaussian(mean=torch.linspace(-1, 1, 4, dtype=torch.float64),
                          log_std=torch.tensor([-1.0, -0.5, -2.0, -1.5], dtype=torch.float64))
    g = torch.Generator().manual_seed(1)
    w = torch.stack([sample_weights(q.mean, q.log_std, generator=g) for _ in range(20000)])  # (S, d)
    mc = (0.5 * (y - w @ x.T).square().sum(1) / NOISE_VAR).mean() + 0.5 * len(y) * math.log(2 * math.pi * NOISE_VAR)
    assert float(mc) == pytest.approx(float(expected_nll(q.mean, q.log_std, x, y)), rel=5e-3)
    with pytest.raises(ValueError):
        vcl_objective(torch.tensor(0.0), torch.tensor(0.0), 0)


# --- 3. tiny real runs ---------------------------------------------------------------------

FAST = {"mc_samples": 2, "test_samples": 3, "epochs": 2}


@pytest.mark.parametrize("bench", ["split-mnist", "permuted-mnist"])
@pytest.mark.parametrize("strategy", ["vcl", "vcl-coreset"])
def test_tiny_run_is_finite_and_better_than_chance(make_config, mnist_root, strategy, bench):
    extra = {"memory_size": 10} if strategy == "vcl-coreset" else {}
    # ten-way permuted MNIST needs a few more of its 4 steps per epoch than the two-way tasks
    epochs = {"epochs": 6} if bench == "permuted-mnist" else {}
    config = make_config(strategy, benchmark=bench, **{**FAST, **epochs}, **extra)
    result = runner.run(config, data_root=mnist_root)
    rows = result["accuracy_matrix"]
    assert all(math.isfinite(a) for row in rows for a in row)
    assert math.isfinite(result["metrics"]["nll"])
    chance = 0.5 if bench == "split-mnist" else 0.1
    assert result["metrics"]["average_accuracy"] > chance + 0.1
    assert result["memory_size"] == extra.get("memory_size", 0)


class Recorder(SupervisedPlugin):
    """Snapshots at experience boundaries, gradients, and every training input seen."""

    def __init__(self):
        super().__init__()
        self.start, self.end_of_training, self.after, self.seen_x, self.grads = [], [], [], [], []

    @staticmethod
    def state(strategy):
        q = strategy.posterior()
        return {"mean": q.mean.detach().clone(), "log_std": strategy.log_std.detach().clone(),
                "prior_mean": strategy.prior.mean.clone(), "prior_precision": strategy.prior.precision.clone(),
                "active": strategy.active_mask()}

    def before_training_exp(self, strategy, **kwargs):
        self.start.append(self.state(strategy))
        self.seen_x.append([])

    def after_forward(self, strategy, **kwargs):
        self.seen_x[-1].append(strategy.mb_x.detach().flatten(1).clone())

    def after_backward(self, strategy, **kwargs):
        if strategy.clock.train_exp_iterations == 0:
            self.grads.append((strategy.log_std.grad.clone(), strategy.active_mask()))

    def after_training_epoch(self, strategy, **kwargs):
        if len(self.end_of_training) < len(self.start):
            self.end_of_training.append(None)
        self.end_of_training[-1] = self.state(strategy)  # the last epoch's wins: q~_t

    def after_training_exp(self, strategy, **kwargs):
        self.after.append(self.state(strategy))


def tiny_strategy(make_config, mnist_root, name, **extra):
    config = make_config(name, **FAST, **extra)
    bundle = build_benchmark(config, data_root=mnist_root)
    recorder = Recorder()
    strategy, _ = runner.build_strategy(config, bundle, plugins=[recorder])
    for exp in bundle.benchmark.train_stream[:3]:
        strategy.train(exp)
    return strategy, recorder, bundle


def test_vcl_std_gets_gradients_and_the_posterior_becomes_the_prior(make_config, mnist_root):
    strategy, rec, _ = tiny_strategy(make_config, mnist_root, "vcl")
    assert isinstance(strategy, VCLStrategy)
    for grad, active in rec.grads:  # first step of each experience
        assert grad[active].abs().sum() > 0 and torch.isfinite(grad).all()
        assert torch.all(grad[~active] == 0)  # heads of later tasks: no likelihood, no KL
    assert strategy.n_train == 200  # N_t: the whole experience
    first = strategy.first_prior
    for t in range(2):
        end, nxt = rec.after[t], rec.start[t + 1]
        active = end["active"]
        # the prior of experience t+1 is the frozen posterior at the end of experience t ...
        assert torch.equal(nxt["prior_mean"][active], end["mean"][active])
        assert torch.allclose(nxt["prior_precision"][active], torch.exp(-2 * end["log_std"][active]))
        # ... and on the heads of tasks not yet seen it is still the first prior N(0, prior_var)
        assert torch.equal(nxt["prior_mean"][~active], first.mean[~active])
        assert torch.equal(nxt["prior_precision"][~active], first.precision[~active])
        # the next experience starts from that posterior (Adam is fresh, the parameters are kept)
        assert torch.equal(nxt["mean"][active], end["mean"][active])
    assert not torch.equal(rec.after[0]["log_std"], torch.full_like(rec.after[0]["log_std"], math.log(0.05)))


def test_vcl_coreset_propagates_the_posterior_before_refinement(make_config, mnist_root):
    memory = 10
    strategy, rec, bundle = tiny_strategy(make_config, mnist_root, "vcl-coreset", memory_size=memory)
    assert strategy.n_train == 200 - memory
    assert [len(i) for i in strategy.coreset_indices] == [memory] * 3
    for t in range(2):
        propagated, refined, nxt = rec.end_of_training[t], rec.after[t], rec.start[t + 1]
        active = propagated["active"]
        # the test-time posterior q_t was refined on the coresets: it differs from q~_t
        assert not torch.allclose(refined["mean"][active], propagated["mean"][active])
        # the prior of t+1 is q~_t, the posterior before the coreset refinement, not q_t
        assert torch.equal(nxt["prior_mean"][active], propagated["mean"][active])
        assert torch.allclose(nxt["prior_precision"][active], torch.exp(-2 * propagated["log_std"][active]))
        # and experience t+1 starts from q~_t
        assert torch.equal(nxt["mean"], propagated["mean"]) and torch.equal(nxt["log_std"], propagated["log_std"])
    for t in range(3):
        seen = torch.cat(rec.seen_x[t])
        epochs = FAST["epochs"]
        assert len(seen) == epochs * (200 - memory)  # every non-coreset example, once per epoch
        coreset = strategy._coreset_x[t].flatten(1)
        assert torch.cat(strategy._coreset_y[t:t + 1]).bincount(minlength=10)[bundle.class_masks[t]].tolist() == [5, 5]
        same = (coreset[:, None, :] == seen[None, :, :]).all(-1)
        assert not same.any()  # coreset examples are never trained on in their experience
    x, y, t = strategy.coreset_tensors()
    assert len(y) == 3 * memory and set(t.tolist()) == {0, 1, 2}


def test_prediction_averages_samples_and_zero_samples_is_the_mean(make_config, mnist_root):
    strategy, _, bundle = tiny_strategy(make_config, mnist_root, "vcl")
    x = bundle.eval[0].x[:40]
    torch.manual_seed(0)
    probs = strategy.predict_proba(x, 0)
    assert torch.allclose(probs.sum(1), torch.ones(40), atol=1e-5)
    assert torch.all(probs[:, 2:] == 0)  # task 0 sees classes 0 and 1 only
    at_mean = torch.softmax(strategy.model(x, 0), -1)
    assert not torch.allclose(probs, at_mean)
    strategy.test_samples = 0
    assert torch.allclose(strategy.predict_proba(x, 0), at_mean)


# --- 4. hyper-parameter validation ---------------------------------------------------------


@pytest.mark.parametrize("cls, field, value", [
    (VCLParams, "mc_samples", 0),
    (VCLParams, "test_samples", -1),
    (VCLParams, "prior_var", 0.0),
    (VCLParams, "prior_var", float("inf")),
    (VCLParams, "init_std", -0.1),
    (VCLParams, "ml_init_epochs", -1),
    (VCLParams, "variance_parametrisation", "var"),
    (VCLParams, "init_mean_std", 0.0),
    (VCLCoresetParams, "memory_size", 0),
    (VCLCoresetParams, "coreset_epochs", -2),
])
def test_invalid_hyper_parameters_raise(cls, field, value):
    with pytest.raises(ValueError, match=field):
        cls(**{field: value})


def test_invalid_values_are_config_errors_and_the_strategy_checks_too(make_config):
    with pytest.raises(ConfigError, match="init_std"):
        make_config("vcl", init_std=0.0)
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="mc_samples"):
        VCLStrategy(model=model, mc_samples=0)
    with pytest.raises(ValueError, match="lr"):
        VCLStrategy(model=model, lr=0.0)


# --- 4. VCL's code: log-variance under Adam, truncated-normal initial means ----------------


def test_adam_on_log_std_with_the_log_var_group_is_adam_on_the_log_variance():
    """VCL's code optimises v = 2 log_std; our log_std group must take exactly the same path."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(40, generator=g, dtype=torch.float64)
    scale = torch.rand(40, generator=g, dtype=torch.float64) * 10 + 0.1

    def loss_of_log_std(s):  # any smooth function of the standard deviations
        return (scale * (torch.exp(s) - target.abs()).square()).sum() + torch.exp(-2 * s).sum() * 1e-3

    log_var = torch.full((40,), -6.0, dtype=torch.float64, requires_grad=True)
    reference = torch.optim.Adam([log_var], lr=1e-2, eps=1e-8)
    log_std = torch.full((40,), -3.0, dtype=torch.float64, requires_grad=True)
    ours = torch.optim.Adam([{"params": [log_std], **variance_adam_group(1e-2, "log_var")}], lr=1e-2)
    for _ in range(200):
        for opt, loss in ((reference, loss_of_log_std(log_var / 2)), (ours, loss_of_log_std(log_std))):
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert torch.allclose(log_std, log_var / 2, rtol=0, atol=1e-10)
    assert not torch.allclose(log_std, torch.full_like(log_std, -3.0))  # it moved
    plain = variance_adam_group(1e-2, "log_std")
    assert plain["lr"] == 1e-2 and plain["eps"] == 1e-8
    with pytest.raises(ValueError, match="variance_parametrisation"):
        variance_adam_group(1e-2, "var")


def test_truncated_normal_init_covers_weights_and_biases_within_two_std():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.ReLU(), torch.nn.Linear(200, 10))
    truncated_normal_init(model, 0.1)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert flat.abs().max() <= 0.2
    # N(0, 0.1^2) truncated at +-2 std has standard deviation 0.1 * 0.8796
    assert float(flat.std()) == pytest.approx(0.08796, rel=0.02)
    assert float(model[2].bias.abs().min()) > 0  # biases are drawn too, not left at zero


def test_the_strategy_wires_the_variance_parametrisation_and_the_initialisation():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.ReLU(), torch.nn.Linear(20, 4))
    strategy = VCLStrategy(model=model, lr=1e-3, init_mean_std=0.1)
    means, variances = strategy.optimizer.param_groups
    assert variances["params"][0] is strategy.log_std
    assert (means["lr"], variances["lr"], variances["eps"]) == (1e-3, 5e-4, 2e-8)  # VCL's log-variance path
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert flat.abs().max() <= 0.2 and torch.equal(flat, strategy.initial_mean)
    strategy.make_optimizer()  # a fresh Adam per experience keeps the same groups
    assert strategy.optimizer.param_groups[1]["lr"] == 5e-4
    plain = VCLStrategy(model=torch.nn.Linear(3, 2), variance_parametrisation="log_std")
    assert plain.optimizer.param_groups[1]["lr"] == plain.optimizer.param_groups[0]["lr"]
    with pytest.raises(ValueError, match="variance_parametrisation"):
        VCLStrategy(model=torch.nn.Linear(3, 2), variance_parametrisation="std")
