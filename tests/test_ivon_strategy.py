"""IVON inside real Avalanche templates: state across experiences, ess, accumulation, BMA, plugins."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from avalanche.training.plugins import EWCPlugin, LwFPlugin, ReplayPlugin, SupervisedPlugin

from cl_bayes.avalanche.benchmarks import build_benchmark
from cl_bayes.avalanche.ivon_strategy import IVONStrategy, NaturalParameterAccumulation
from cl_bayes.avalanche.models import TaskMaskedModel
from cl_bayes.config import RunConfig
from cl_bayes.ivon import IVON
from cl_bayes.models import MLP

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("CL_BAYES_DATA", ROOT.parent / "shared" / "data"))
pytestmark = pytest.mark.skipif(not (DATA / "MNIST" / "raw").is_dir(), reason=f"no MNIST under {DATA}")


@pytest.fixture(scope="module")
def bundle():
    config = RunConfig(benchmark="split-mnist", strategy="ivon", seed=0, train_per_experience=1000,
                       test_per_experience=100)
    return build_benchmark(config, data_root=DATA)


def make_strategy(bundle, *plugins, test_samples=4, mc_samples=1, ess=None, lr_schedule="constant"):
    torch.manual_seed(0)
    model = TaskMaskedModel(MLP(in_features=784, hidden=[32], num_classes=10), bundle.class_masks)
    optimizer = IVON(model.parameters(), lr=0.1, ess=len(bundle.train[0].y), hess_init=0.1, mc_samples=mc_samples)
    return IVONStrategy(model=model, optimizer=optimizer, mc_samples=mc_samples, test_samples=test_samples, ess=ess,
                        lr_schedule=lr_schedule, train_mb_size=64, train_epochs=2, eval_mb_size=500, evaluator=None,
                        plugins=list(plugins))


class Recorder(SupervisedPlugin):
    """Snapshots of the optimizer at experience boundaries."""

    def __init__(self):
        super().__init__()
        self.before, self.after, self.ess = [], [], []

    def before_training_epoch(self, strategy, **kwargs):
        if strategy.clock.train_exp_epochs != 0:  # first epoch of each experience only
            return
        opt = strategy.optimizer
        self.before.append({"hess": opt.hess, "prior_mean": opt.prior_mean, "prior_precision": opt.prior_precision,
                            "mean": opt.mean})
        self.ess.append(opt.ess)

    def after_training_exp(self, strategy, **kwargs):
        opt = strategy.optimizer
        self.after.append({"hess": opt.hess, "mean": opt.mean, "precision": opt.precision})


def test_state_survives_experiences_and_ess_follows_the_data(bundle):
    rec = Recorder()
    strategy = make_strategy(bundle, rec)
    for exp in bundle.benchmark.train_stream[:2]:
        strategy.train(exp)
    # Avalanche would reset optimizer state here; IVON's posterior must carry over untouched.
    assert torch.equal(rec.before[1]["hess"], rec.after[0]["hess"])
    assert torch.equal(rec.before[1]["mean"], rec.after[0]["mean"])
    assert not torch.equal(rec.after[0]["hess"], torch.full_like(rec.after[0]["hess"], 0.1))  # it did learn h
    assert rec.ess == [float(len(bundle.train[0].y)), float(len(bundle.train[1].y))]


class LrRecorder(SupervisedPlugin):
    """The learning rate of every IVON step (read after the step), per experience."""

    def __init__(self):
        super().__init__()
        self.lrs: list[list[float]] = []

    def before_training_exp(self, strategy, **kwargs):
        self.lrs.append([])

    def after_update(self, strategy, **kwargs):
        self.lrs[-1].append(strategy.optimizer.param_groups[0]["lr"])


def test_cosine_schedule_anneals_each_experience_and_restarts(bundle):
    rec = LrRecorder()
    strategy = make_strategy(bundle, rec, lr_schedule="cosine")
    for exp in bundle.benchmark.train_stream[:2]:
        strategy.train(exp)
    for lrs in rec.lrs:
        total = len(lrs)  # 2 epochs of ceil(n / 64) steps
        assert total == 2 * -(-len(bundle.train[0].y) // 64)
        assert lrs[0] == pytest.approx(0.1)
        assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))  # strictly decreasing
        assert lrs[-1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * (total - 1) / total)))
        assert lrs[total // 2] == pytest.approx(0.05)


def test_constant_schedule_never_touches_the_rate(bundle):
    rec = LrRecorder()
    strategy = make_strategy(bundle, rec)
    strategy.train(bundle.benchmark.train_stream[0])
    assert set(rec.lrs[0]) == {0.1}


def test_unknown_schedule_is_an_error(bundle):
    with pytest.raises(ValueError, match="lr_schedule must be one of constant, cosine"):
        make_strategy(bundle, lr_schedule="step")


def test_fixed_ess_is_kept(bundle):
    rec = Recorder()
    strategy = make_strategy(bundle, rec, ess=1234.0)
    strategy.train(bundle.benchmark.train_stream[0])
    assert rec.ess == [1234.0]


def test_accumulation_makes_the_posterior_the_next_prior(bundle):
    rec = Recorder()
    # Recorder first: Avalanche calls plugins in list order, so it sees the posterior before accumulation.
    strategy = make_strategy(bundle, rec, NaturalParameterAccumulation(keep_hess=False))
    for exp in bundle.benchmark.train_stream[:3]:
        strategy.train(exp)
    for t in (0, 1):
        assert torch.allclose(rec.before[t + 1]["prior_mean"], rec.after[t]["mean"])
        assert torch.allclose(rec.before[t + 1]["prior_precision"], rec.after[t]["precision"], rtol=1e-6)
        # precision grows: lambda_{t+1} = lambda_t + this experience's data term (>= 0 on average)
    assert rec.after[2]["precision"].mean() > rec.after[0]["precision"].mean()
    # h was reset to hess_init at each boundary
    assert torch.allclose(rec.before[1]["hess"], torch.full_like(rec.before[1]["hess"], 0.1))


def test_bma_restores_the_mean_and_averages_samples(bundle):
    strategy = make_strategy(bundle, test_samples=8)
    strategy.train(bundle.benchmark.train_stream[0])
    x, task = bundle.eval[0].x[:50], bundle.eval[0].task
    mean_before = strategy.optimizer.mean
    torch.manual_seed(1)
    probs = strategy.predict_proba(x, task)
    assert torch.equal(strategy.optimizer.mean, mean_before)
    assert torch.allclose(probs.sum(1), torch.ones(50), atol=1e-5)
    assert torch.all(probs[:, 2:] == 0)  # task 0 only sees classes 0 and 1
    at_mean = torch.softmax(strategy.model(x, task), -1)
    assert not torch.allclose(probs, at_mean)  # a real average over samples, not the mean network
    strategy.test_samples = 0
    assert torch.allclose(strategy.predict_proba(x, task), at_mean)


def test_avalanche_eval_loop_uses_bma(bundle):
    strategy = make_strategy(bundle, test_samples=3)
    strategy.train(bundle.benchmark.train_stream[0])
    mean_before = strategy.optimizer.mean
    strategy.eval(bundle.benchmark.test_stream[:1])
    assert torch.equal(strategy.optimizer.mean, mean_before)


@pytest.mark.parametrize("plugin", [
    lambda: EWCPlugin(ewc_lambda=100.0),
    lambda: LwFPlugin(alpha=1.0, temperature=2.0),
    lambda: ReplayPlugin(mem_size=40),
], ids=["ewc", "lwf", "replay"])
def test_avalanche_plugins_work_unchanged(bundle, plugin):
    strategy = make_strategy(bundle, plugin(), mc_samples=2)
    for exp in bundle.benchmark.train_stream[:2]:
        strategy.train(exp)
    assert torch.isfinite(strategy.optimizer.mean).all()
    x = bundle.eval[1].x
    acc = (strategy.predict_proba(x, 1).argmax(1) == bundle.eval[1].y).float().mean()
    assert acc > 0.6  # two classes per task: well above chance after a few steps


def test_ewc_penalty_reaches_the_sampled_loss(bundle):
    """The EWC term added in before_backward is part of the loss IVON differentiates."""
    seen = []

    class LossSpy(SupervisedPlugin):
        def after_backward(self, strategy, **kwargs):
            seen.append(float(strategy.loss))

    with_ewc = make_strategy(bundle, EWCPlugin(ewc_lambda=1e6), LossSpy())
    for exp in bundle.benchmark.train_stream[:2]:
        with_ewc.train(exp)
    n_first = len(seen)
    seen_ewc = seen[:]
    seen.clear()
    plain = make_strategy(bundle, LossSpy())
    for exp in bundle.benchmark.train_stream[:2]:
        plain.train(exp)
    assert seen_ewc[: n_first // 2] == pytest.approx(seen[: n_first // 2])  # first experience: no penalty yet
    assert sum(seen_ewc[-3:]) > sum(seen[-3:])  # second experience: the penalty is in the loss


def test_sampled_params_restores_weights_when_a_plugin_raises(bundle):
    class Boom(SupervisedPlugin):
        def before_backward(self, strategy, **kwargs):
            raise RuntimeError("boom")

    strategy = make_strategy(bundle, Boom())
    mean_before = strategy.optimizer.mean
    with pytest.raises(RuntimeError, match="boom"):
        strategy.train(bundle.benchmark.train_stream[0])
    assert torch.equal(strategy.optimizer.mean, mean_before)
    assert all(torch.equal(p, m) for p, m in zip(
        [p.detach().flatten() for p in strategy.model.parameters()],
        torch.split(mean_before, [p.numel() for p in strategy.model.parameters()]), strict=True))


def test_user_script_with_two_changed_lines_runs():
    """examples/avalanche_ivon.py: an ordinary Avalanche script with IVON swapped in."""
    script = ROOT / "examples" / "avalanche_ivon.py"
    text = script.read_text()
    changed = [line for line in text.splitlines() if line.rstrip().endswith("# cl-bayes")]
    assert len(changed) == 4  # two imports, the optimizer line, the strategy line
    out = subprocess.run([sys.executable, str(script), "--data-root", str(DATA), "--limit", "2000"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    last = float(out.stdout.strip().splitlines()[-1].split("last experience: ")[1].split(";")[0])
    assert last > 0.3  # ten-way head, two classes in the experience: chance is 0.1
