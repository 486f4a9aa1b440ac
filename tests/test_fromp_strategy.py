"""FROMP with the IVON posterior inside real Avalanche templates: the plugin, ivon-fromp and bayes-cl."""

from __future__ import annotations

import json

import pytest
import torch
from avalanche.training.plugins import SupervisedPlugin

from cl_bayes.avalanche import runner
from cl_bayes.avalanche.benchmarks import build_benchmark
from cl_bayes.avalanche.fromp_plugin import FunctionalRegularisationPlugin
from cl_bayes.avalanche.ivon_strategy import IVONStrategy
from cl_bayes.avalanche.memory import experience_data
from cl_bayes.avalanche.models import TaskMaskedModel
from cl_bayes.config import ConfigError, RunConfig
from cl_bayes.ivon import IVON
from cl_bayes.models import MLP
from cl_bayes.results import validate

MEMORY = 10  # per experience


@pytest.fixture(scope="module")
def bundle(mnist_root):
    config = RunConfig(benchmark="split-mnist", strategy="ivon-fromp", seed=0, train_per_experience=300,
                       test_per_experience=100)
    return build_benchmark(config, data_root=mnist_root)


def make_strategy(bundle, *plugins, tau=1e-3, lr=0.1, **fromp_kwargs):
    torch.manual_seed(0)
    model = TaskMaskedModel(MLP(in_features=784, hidden=[32], num_classes=10), bundle.class_masks)
    optimizer = IVON(model.parameters(), lr=lr, ess=len(bundle.train[0].y), hess_init=0.1)
    fromp = FunctionalRegularisationPlugin(tau=tau, memory_size=MEMORY, kernel="block", eps=1e-3, **fromp_kwargs)
    strategy = IVONStrategy(model=model, optimizer=optimizer, test_samples=2, train_mb_size=64, train_epochs=1,
                            eval_mb_size=500, evaluator=None, plugins=[fromp, *plugins])
    return strategy, fromp


class Spy(SupervisedPlugin):
    """Listed after the FROMP plugin: sees the loss after it added its term."""

    def __init__(self, fromp):
        super().__init__()
        self.fromp = fromp
        self.at_mean_first_step = []  # the prior at the posterior mean, first iteration of each experience
        self.checks = []  # (loss, criterion, penalty) per step once a task is stored

    def before_training_iteration(self, strategy, **kwargs):
        if strategy.clock.train_exp_iterations == 0 and len(self.fromp.prior):
            self.at_mean_first_step.append(float(self.fromp.prior(strategy.model.net)))

    def before_update(self, strategy, **kwargs):  # after every sample's backward (and the term at the mean)
        if len(self.fromp.prior):
            self.checks.append((float(strategy.loss), float(strategy.criterion()), float(self.fromp.last_penalty)))


def test_memory_and_one_kernel_per_experience(bundle):
    strategy, fromp = make_strategy(bundle)
    for exp in bundle.benchmark.train_stream[:3]:
        strategy.train(exp)
    assert len(fromp.prior) == 3 and len(fromp.memory_indices) == 3
    for t, (task, chosen) in enumerate(zip(fromp.prior.tasks, fromp.memory_indices, strict=True)):
        assert task.inputs.shape == (MEMORY, 1, 28, 28)
        assert task.kernel.shape == task.kernel_inverse.shape == (10, MEMORY, MEMORY)  # block: one per class
        assert torch.equal(task.class_mask, bundle.class_masks[t].expand(MEMORY, -1))  # the task's two classes
        data = experience_data(bundle.benchmark.train_stream[t])  # indices are into the experience's dataset
        counts = torch.bincount(data.y[chosen], minlength=10)
        assert counts[bundle.class_masks[t]].tolist() == [MEMORY // 2] * 2 and counts.sum() == MEMORY  # balanced
        assert torch.equal(task.inputs, data.x()[chosen])  # the stored examples are the chosen ones
        assert torch.all(task.probs[:, ~bundle.class_masks[t]] == 0)
        assert torch.allclose(task.probs.sum(1), torch.ones(MEMORY))


@pytest.mark.parametrize("term_at", ["mean", "network"])
def test_functional_term_is_in_the_loss_and_vanishes_at_the_stored_weights(bundle, term_at):
    strategy, fromp = make_strategy(bundle, term_at=term_at)
    spy = Spy(fromp)
    strategy.plugins.append(spy)
    strategy.train(bundle.benchmark.train_stream[0])
    assert fromp.last_penalty is None and not spy.checks  # experience 1: nothing to regularise towards
    strategy.train(bundle.benchmark.train_stream[1])
    # before any update of experience 2 the weights are the stored posterior mean: zero residuals
    assert spy.at_mean_first_step == [0.0]
    assert spy.checks
    for loss, criterion, penalty in spy.checks:
        assert loss == pytest.approx(criterion + penalty, rel=1e-5, abs=1e-6)
    if term_at == "network":  # IVON trains at a sample, whose outputs differ from the mean's from step 1 on
        assert all(penalty > 0 for _, _, penalty in spy.checks)
    assert float(fromp.prior(strategy.model.net)) > 0  # after training on experience 2 they moved


def test_default_term_regularises_the_posterior_mean_not_its_samples(bundle):
    """The cause of docs/BISECTION.md step c: the term evaluated at IVON's samples penalises the
    posterior's own spread. By default it is evaluated at the mean, so at the first step of the
    next experience (mean = the stored posterior mean) it is exactly zero, for every sample."""
    first_step = {}
    for term_at in (None, "network"):
        kwargs = {} if term_at is None else {"term_at": term_at}
        strategy, fromp = make_strategy(bundle, **kwargs)  # None: the plugin's defaults
        seen = first_step.setdefault(term_at, [])

        class FirstStep(SupervisedPlugin):  # at the mean: once per step (before_update); at samples: per sample
            def after_backward(self, strategy, fromp=fromp, seen=seen, term_at=term_at, **kwargs):
                if term_at == "network" and strategy.clock.train_exp_iterations == 0 and len(fromp.prior):
                    seen.append(float(fromp.last_penalty))

            def before_update(self, strategy, fromp=fromp, seen=seen, term_at=term_at, **kwargs):
                if term_at is None and strategy.clock.train_exp_iterations == 0 and len(fromp.prior):
                    seen.append(float(fromp.last_penalty))

        strategy.plugins.append(FirstStep())
        strategy.mc_samples = 3  # three posterior samples in the first step
        for exp in bundle.benchmark.train_stream[:2]:
            strategy.train(exp)
    assert first_step[None] == pytest.approx([0.0], abs=1e-9)  # one evaluation for the three samples
    assert len(first_step["network"]) == 3 and min(first_step["network"]) > 1e-6  # the samples' own noise


def test_plugin_kernel_uses_the_posterior_before_accumulation(bundle):
    from cl_bayes.avalanche.ivon_strategy import NaturalParameterAccumulation
    from cl_bayes.fromp import fromp_kernel

    seen = []

    class Before(SupervisedPlugin):
        def after_training_exp(self, strategy, **kwargs):
            seen.append(strategy.optimizer.posterior)

    torch.manual_seed(0)
    strategy, fromp = make_strategy(bundle)
    strategy.plugins[:0] = [Before()]
    strategy.plugins.append(NaturalParameterAccumulation())
    strategy.train(bundle.benchmark.train_stream[0])
    task = fromp.prior.tasks[0]
    expected = fromp_kernel(strategy.model.net, seen[0], x=task.inputs, form="block", class_mask=task.class_mask,
                            eps=1e-3)
    assert torch.allclose(task.kernel, expected, rtol=1e-4, atol=1e-7)
    after = fromp_kernel(strategy.model.net, strategy.optimizer.posterior, x=task.inputs, form="block",
                         class_mask=task.class_mask, eps=1e-3)
    assert not torch.allclose(task.kernel, after, rtol=1e-2)  # accumulation did change the posterior


@pytest.mark.parametrize(("strategy", "parent"), [("ivon-fromp", "ivon"), ("bayes-cl", "ivon-prior")])
def test_tau_zero_is_exactly_the_parent_strategy(strategy, parent, make_config, mnist_root):
    """The plugin draws nothing from the global RNG and changes nothing but the loss."""
    same = dict(lr=0.1, beta2=0.999, test_samples=3)
    if parent == "ivon-prior":
        same["debias_hess"] = True  # bayes-cl.toml's; ivon-prior.toml keeps the raw Hessian
    ours = runner.run(make_config(strategy, tau=0.0, memory_size=MEMORY, **same))
    theirs = runner.run(make_config(parent, **same))
    assert ours["accuracy_matrix"] == theirs["accuracy_matrix"]


@pytest.mark.parametrize(("strategy", "bench", "extra", "learns"), [
    ("ivon-fromp", "split-mnist", {"train_per_experience": 1000, "epochs": 2}, 0.9),
    ("bayes-cl", "split-mnist", {"selection": "lambda"}, None),
    ("ivon-fromp", "split-mnist-ci", {"selection": "random", "kernel": "full"}, None),
    ("bayes-cl", "permuted-mnist", {"memory_size": 8, "test_per_experience": 200}, None),
    ("ivon-fromp", "split-mnist", {"memory_size": 8, "block_size": 3, "blocks_per_step": 2}, None),
])
def test_strategies_run_and_report(strategy, bench, extra, learns, make_config, mnist_root):
    cfg = make_config(strategy, benchmark=bench, **extra)
    result = runner.run(cfg)
    validate(result)
    json.loads(json.dumps(result, allow_nan=False))
    matrix = result["accuracy_matrix"]
    n = 10 if bench == "permuted-mnist" else 5
    assert len(matrix) == n and all(len(row) == n for row in matrix)
    assert all(0 <= v <= 1 for row in matrix for v in row)
    assert result["memory_size"] == cfg.params["memory_size"]
    if learns:  # masked two-way tasks: chance is 0.5
        assert matrix[0][0] > learns and result["metrics"]["average_accuracy"] > learns


def test_specs_resolve_with_the_documented_memory_sizes(make_config):
    for strategy in ("ivon-fromp", "bayes-cl"):
        assert make_config(strategy).params["memory_size"] == 40
        assert make_config(strategy, benchmark="split-mnist-ci").params["memory_size"] == 40
        assert make_config(strategy, benchmark="permuted-mnist").params["memory_size"] == 200
        assert make_config(strategy).params["selection"] == "sensitivity"
    for bad in ({"kernel": "diag"}, {"selection": "best"}, {"tau": -1.0}, {"eps": 0.0}, {"memory_size": 0},
                {"blocks_per_step": 0}, {"block_size": 0}, {"block_estimator": "exact"}):
        with pytest.raises(ConfigError):
            make_config("ivon-fromp", **bad)


def test_term_at_mean_gives_ivon_the_gradient_at_the_posterior_mean_once_per_step(bundle):
    """With IVON the default term is evaluated after the samples, at the mean, and its gradient
    goes to ``IVON.add_mean_gradient`` (the momentum, not the Hessian estimate)."""
    from cl_bayes.fromp import regulariser_gradient

    strategy, fromp = make_strategy(bundle)
    strategy.mc_samples = 2
    seen = []
    record = strategy.optimizer.add_mean_gradient

    def spy(grads):
        grads = list(grads)
        net = strategy.model.net
        with torch.no_grad():  # the weights hold the mean here, not a sample
            assert torch.equal(torch.cat([p.reshape(-1) for p in strategy.optimizer.params]), strategy.optimizer.mean)
        was = net.training
        net.eval()
        expected = regulariser_gradient(fromp.prior, net)
        net.train(was)
        got = torch.cat([torch.zeros_like(p).reshape(-1) if g is None else g.reshape(-1)
                         for p, g in zip(strategy.optimizer.params, grads, strict=True)])
        seen.append((got, expected))
        record(grads)

    strategy.optimizer.add_mean_gradient = spy
    strategy.train(bundle.benchmark.train_stream[0])
    assert not seen  # nothing to regularise towards in experience 1
    strategy.train(bundle.benchmark.train_stream[1])
    iterations = strategy.clock.train_exp_iterations
    assert len(seen) == iterations  # once per step, not once per sample
    assert float(seen[0][0].abs().max()) == 0.0  # first step: the mean is the anchored mean
    assert any(float(got.abs().max()) > 0 for got, _ in seen[1:])
    for got, expected in seen:
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("extra", [{"posterior": "laplace", "anchor": "latest", "selection": "lambda"},
                                   {"term_at": "mean"}])
def test_ivon_fromp_bisection_settings_run(extra, make_config, mnist_root):
    result = runner.run(make_config("ivon-fromp", memory_size=MEMORY, **extra))
    validate(result)
    assert len(result["accuracy_matrix"]) == 5


@pytest.mark.parametrize("term_curvature", [True, False])
def test_term_curvature_becomes_ivons_mean_curvature_after_each_experience(bundle, term_curvature):
    strategy, fromp = make_strategy(bundle, term_curvature=term_curvature)
    assert torch.equal(strategy.optimizer.mean_curvature, torch.zeros_like(strategy.optimizer.mean))
    for exp in bundle.benchmark.train_stream[:2]:
        strategy.train(exp)
        curvature = strategy.optimizer.mean_curvature
        if term_curvature:  # the term's Hessian diagonal at the anchors of every stored task
            assert torch.allclose(curvature, fromp.prior.curvature(strategy.model.net)) and curvature.max() > 0
        else:
            assert not curvature.any()
    assert fromp.seconds["curvature"] > 0 if term_curvature else fromp.seconds["curvature"] == 0


def test_curvature_is_scaled_at_an_experiences_first_step_until_the_terms_step_is_stable(bundle):
    """A stiff term (tau 10, lr 1): at experience 2's first step the plugin scales c by the least gamma
    with step * lambda_max((h + delta + gamma c)^-1 A) <= bound / margin, and IVON divides by h + delta + gamma c."""
    from cl_bayes.fromp import momentum_stability_bound, preconditioned_stiffness

    seen = []

    class Curvature(SupervisedPlugin):
        def before_update(self, strategy, **kwargs):
            seen.append(strategy.optimizer.mean_curvature)

    for margin in (4.0, None):
        seen.clear()
        strategy, fromp = make_strategy(bundle, Curvature(), tau=10.0, lr=1.0, stiffness_margin=margin)
        stream = bundle.benchmark.train_stream
        strategy.train(stream[0])
        c = strategy.optimizer.mean_curvature.clone()
        opt = strategy.optimizer
        seen.clear()
        strategy.train(stream[1])
        if margin is None:
            assert fromp.curvature_scales == [] and torch.equal(seen[0], c)
            continue
        (record,) = fromp.curvature_scales
        gamma = record["gamma"]
        assert record["experience"] == 1 and gamma > 1.0 and record["stiffness"] > record["stiffness_scaled"]
        assert torch.allclose(seen[0], gamma * c) and torch.equal(seen[-1], seen[0])
        target = momentum_stability_bound(0.9) / margin
        assert record["stiffness_scaled"] <= target * (1 + 1e-6)
        step = 1.0 * (0.1 + 1e-4)  # lr * (hess_init + weight_decay): rescale_lr
        unscaled = step * preconditioned_stiffness(fromp.prior, strategy.model.net,
                                                   opt.hess + opt.prior_precision / opt.ess + c, iters=20)
        assert unscaled > target  # the scaling was needed (c alone leaves the step past the target)
    with pytest.raises(ValueError, match="stiffness_margin"):
        make_strategy(bundle, stiffness_margin=0.5)


def test_sampled_term_draws_every_past_experience_and_is_scaled_for_its_random_gain(bundle):
    """block_size + blocks_per_step: each step's term is one block of each past experience, weighted by its
    block count (per_experience, the default), and the curvature scale is chosen for that draw's random gain:
    larger than the exact term's on the same run."""
    gammas = {}
    for sampled in (False, True):
        kwargs = {"block_size": 2, "blocks_per_step": 1} if sampled else {}
        strategy, fromp = make_strategy(bundle, tau=10.0, lr=1.0, **kwargs)
        draws = []
        if sampled:
            original = fromp.prior.draw

            def spy(count, generator=None, *, per_experience=False, original=original, draws=draws, prior=fromp.prior):
                out = original(count, generator, per_experience=per_experience)
                draws.append((out, [list(g) for g in prior.experiences]))
                return out

            fromp.prior.draw = spy
        for exp in bundle.benchmark.train_stream[:3]:
            strategy.train(exp)
        gammas[sampled] = [r["gamma"] for r in fromp.curvature_scales]
        if sampled:
            assert draws and fromp._saga is None  # block_estimator "scaled" by default
            for (blocks, weights), groups in draws:
                assert len(blocks) == len(groups)  # one block of each past experience
                for block, weight, group in zip(blocks, weights, groups, strict=True):
                    assert block in group and weight == len(group)
            assert {len(groups) for _, groups in draws} == {1, 2}  # experiences 2 and 3
    assert len(gammas[True]) == len(gammas[False]) == 2
    assert all(s > e for s, e in zip(gammas[True], gammas[False], strict=True))


def test_stiffness_guard_raises_the_curvature_scale_after_a_stiff_step_and_takes_an_unstable_one_back(bundle):
    """After experience 2, the mean moved along the term's stiffest (preconditioned) mode at its current weights, with
    a step size that makes that step 0.75x or 4x the momentum's bound: the guard's secant stiffness, from the term's
    gradients before and after, is that step's Rayleigh quotient, and gamma grows to bring it to bound / margin (IVON
    divides by h + delta + gamma c from then on). Past the bound the step is also taken back: the mean returns to
    where it started and the step uses the term's gradient there. A step within the guard, or no guard, changes
    nothing. Before gamma is chosen, the term's diagonal curvature c grows to max(c, c(w)), its value at the weights
    the step reached (the anchors' c can be ~0 along a step that is stiff there)."""
    from cl_bayes.fromp import _top_mode, momentum_stability_bound, secant_stiffness

    bound = momentum_stability_bound(0.9)
    for guard, factor in ((0.5, 0.75), (0.5, 4.0), (None, 4.0)):
        strategy, fromp = make_strategy(bundle, tau=10.0, lr=1.0, stiffness_guard=guard)
        for exp in bundle.benchmark.train_stream[:2]:
            strategy.train(exp)
        opt, net = strategy.optimizer, strategy.model.net
        strategy.experience = bundle.benchmark.train_stream[2]  # as at experience 3's steps (before its own scale)
        fromp.guard_events.clear()
        gamma0, c = fromp._gamma, fromp._curvature
        assert torch.allclose(opt.mean_curvature, gamma0 * c)

        def term_grads(fromp=fromp, net=net, opt=opt):
            return torch.autograd.grad(fromp.prior(net), list(opt.params))

        def move(dw, opt=opt):
            with torch.no_grad():
                for p, d in zip(opt.params, dw.split([p.numel() for p in opt.params]), strict=True):
                    p.add_(d.view_as(p))

        base = opt.hess + opt.prior_precision / opt.ess
        precond = base + gamma0 * c
        top, mode = _top_mode(fromp.prior, net, precond, iters=100, seed=0, at=opt.mean)
        opt.param_groups[0]["lr"] = factor * bound / (top * (0.1 + 1e-4))  # step_size * top = factor * bound
        step_size = opt.step_size(opt.param_groups[0])
        start = opt.mean
        grads = term_grads()
        before = torch.cat([g.reshape(-1) for g in grads])
        assert fromp._guard_stiffness(strategy, grads) is grads  # the first step of a pair: nothing to compare with
        assert fromp.guard_events == []
        dw = 1e-4 * precond.rsqrt() * mode
        move(dw)
        grads = term_grads()
        after = torch.cat([g.reshape(-1) for g in grads])
        used = fromp._guard_stiffness(strategy, grads)
        s = secant_stiffness(step_size=step_size, step=dw, gradient_change=after - before, preconditioner=precond)
        assert s == pytest.approx(factor * bound, rel=0.05)  # the step's secant is the stiffest mode's quotient
        if guard is None:
            assert fromp.guard_events == [] and torch.equal(opt.mean_curvature, gamma0 * c) and used is grads
            continue
        (event,) = fromp.guard_events
        gamma = event["gamma"]
        assert event["secant_stiffness"] == pytest.approx(s, rel=1e-3) and event["gamma_before"] == gamma0
        c_now = torch.maximum(c, fromp.prior.curvature(net, at=start + dw))  # c grows to its value where the step ended
        assert torch.allclose(fromp._curvature, c_now) and (c_now > c).any()
        refreshed = secant_stiffness(step_size=step_size, step=dw, gradient_change=after - before,
                                     preconditioner=base + gamma0 * c_now)
        assert event["secant_stiffness_refreshed"] == pytest.approx(refreshed, rel=1e-3)
        assert gamma > gamma0 and fromp._gamma == gamma and torch.allclose(opt.mean_curvature, gamma * c_now)
        rescaled = secant_stiffness(step_size=step_size, step=dw, gradient_change=after - before,
                                    preconditioner=base + gamma * c_now)
        assert rescaled == pytest.approx(bound / 4.0, rel=1e-3)  # back at the target of stiffness_margin 4
        taken_back = factor > 1.0
        assert event["step_taken_back"] is taken_back
        if taken_back:
            assert torch.equal(opt.mean, start) and torch.equal(torch.cat([g.reshape(-1) for g in used]), before)
        else:
            assert torch.equal(opt.mean, start + dw) and used is grads
        move(1e-3 * dw)  # a tiny step: within the guard
        fromp._guard_stiffness(strategy, term_grads())
        assert len(fromp.guard_events) == 1 and fromp._gamma == gamma
    with pytest.raises(ValueError, match="stiffness_guard"):
        make_strategy(bundle, stiffness_guard=1.5)
