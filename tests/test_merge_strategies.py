"""Merging strategies inside real Avalanche templates on a slice of real MNIST: same start, merge after each."""

from __future__ import annotations

import json

import pytest
import torch
from avalanche.training.plugins import SupervisedPlugin

from cl_bayes.avalanche import runner
from cl_bayes.avalanche.benchmarks import build_benchmark
from cl_bayes.avalanche.merge_strategies import PosteriorMergingPlugin, WeightMergingPlugin, flat_of, load_flat
from cl_bayes.avalanche.models import unwrap
from cl_bayes.jacobians import trainable_parameters
from cl_bayes.merge import fisher_weighted_average, merge_gaussians, task_arithmetic, weight_average
from cl_bayes.results import validate

MERGING = ["ivon-merge", "weight-average", "task-arithmetic", "fisher-merge"]


class Recorder(SupervisedPlugin):
    """The state each experience starts from (after the merging plugin restored it) and the merged state after it."""

    def __init__(self):
        super().__init__()
        self.start, self.end, self.first_step = [], [], []

    @staticmethod
    def _state(strategy):
        opt = strategy.optimizer
        params = [p for _, p in trainable_parameters(unwrap(strategy.model))]
        state = {"weights": flat_of(params)}
        if hasattr(opt, "hess"):  # IVON
            state.update(hess=opt.hess, momentum=opt.state_dict()["ivon"]["momentum"], prior_mean=opt.prior_mean,
                         prior_precision=opt.prior_precision, ess=opt.ess, precision=opt.precision)
        else:
            state["adam_state"] = len(opt.state)
        return state

    def before_training_exp(self, strategy, **kwargs):
        self.start.append(self._state(strategy))
        self.first_step.append(True)

    def before_update(self, strategy, **kwargs):
        if self.first_step[-1] and not hasattr(strategy.optimizer, "hess"):
            self.start[-1]["adam_state_at_first_step"] = len(strategy.optimizer.state)
        self.first_step[-1] = False

    def after_training_exp(self, strategy, **kwargs):
        self.end.append(self._state(strategy))


def build(make_config, strategy, plugins=(), **overrides):
    cfg = make_config(strategy, **overrides)
    bundle = build_benchmark(cfg)
    built, _ = runner.build_strategy(cfg, bundle, plugins=plugins)
    merger = next(p for p in built.plugins if isinstance(p, (PosteriorMergingPlugin, WeightMergingPlugin)))
    return built, merger, bundle


def test_load_flat_keeps_ivon_views_and_checks_the_size():
    net = torch.nn.Linear(3, 2)
    views = [p.data_ptr() for p in net.parameters()]
    load_flat(net.parameters(), torch.arange(8.0))
    assert [p.data_ptr() for p in net.parameters()] == views
    assert torch.equal(flat_of(net.parameters()), torch.arange(8.0))
    with pytest.raises(ValueError, match="8 values"):
        load_flat(net.parameters(), torch.zeros(7))


@pytest.mark.parametrize("precision", ["data_hess", "hess", "ggn"])
def test_ivon_merge_restarts_every_experience_and_evaluates_the_merge(make_config, mnist_root, precision):
    rec = Recorder()
    strategy, merger, bundle = build(make_config, "ivon-merge", plugins=(rec,), merge_precision=precision)
    for exp in bundle.benchmark.train_stream[:3]:
        strategy.train(exp)
    first = rec.start[0]
    for t, start in enumerate(rec.start):
        # IVON's whole state is back at the start (weights, h, momentum, prior), ess follows the data
        for key in ("weights", "hess", "momentum", "prior_mean", "prior_precision"):
            assert torch.equal(start[key], first[key]), (t, key)
        assert start["ess"] == float(len(bundle.train[t].y))
    means = [m for m, _ in merger.posteriors]
    assert len(means) == 3 and not torch.equal(means[0], means[1])
    prior_precision = first["prior_precision"]
    for t, end in enumerate(rec.end):
        precisions = [s for _, s in merger.posteriors[: t + 1]]
        assert all((s >= prior_precision).all() for s in precisions)
        mean, merged = merge_gaussians(means=means[: t + 1], precisions=precisions, prior_mean=first["prior_mean"],
                                       prior_precision=prior_precision)
        assert torch.allclose(end["weights"], mean)  # the model the runner scores after t is the merge of 1..t
        assert torch.allclose(end["precision"], merged, rtol=1e-5)  # and IVON's posterior is the merged one
    assert torch.allclose(rec.end[0]["weights"], means[0], atol=1e-6)  # a merge of one posterior is itself


class BeforeMerge(SupervisedPlugin):
    """IVON's posterior at the end of an experience, read before the merging plugin changes it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def after_training_exp(self, strategy, **kwargs):
        opt = strategy.optimizer
        self.seen.append({"mean": opt.mean, "data_hess": opt.data_hess, "precision": opt.precision,
                          "prior_precision": opt.prior_precision, "ess": opt.ess})


@pytest.mark.parametrize("precision", ["data_hess", "hess"])
def test_ivon_merge_records_the_precision_it_names(make_config, mnist_root, precision):
    before = BeforeMerge()
    strategy, merger, bundle = build(make_config, "ivon-merge", merge_precision=precision)
    strategy.plugins.insert(0, before)  # Avalanche calls plugins in list order: this one reads before the merge
    for exp in bundle.benchmark.train_stream[:2]:
        strategy.train(exp)
    for seen, (mean, lam) in zip(before.seen, merger.posteriors, strict=True):
        assert torch.equal(mean, seen["mean"])
        if precision == "data_hess":
            expected = seen["ess"] * seen["data_hess"] + seen["prior_precision"]
        else:
            expected = torch.maximum(seen["precision"], seen["prior_precision"])
        assert torch.allclose(lam, expected, rtol=1e-6)


def test_ivon_merge_prior_at_init_centres_the_prior_at_the_start(make_config, mnist_root):
    rec = Recorder()
    strategy, _, bundle = build(make_config, "ivon-merge", plugins=(rec,), prior_at_init=True)
    strategy.train(bundle.benchmark.train_stream[0])
    assert torch.equal(rec.start[0]["prior_mean"], rec.start[0]["weights"])


@pytest.mark.parametrize("strategy_name", ["weight-average", "task-arithmetic", "fisher-merge"])
def test_adam_merging_restarts_every_experience_and_evaluates_the_merge(make_config, mnist_root, strategy_name):
    rec = Recorder()
    overrides = {"alpha": 0.5} if strategy_name == "task-arithmetic" else {}
    strategy, merger, bundle = build(make_config, strategy_name, plugins=(rec,), **overrides)
    for exp in bundle.benchmark.train_stream[:3]:
        strategy.train(exp)
    theta0 = rec.start[0]["weights"]
    for start in rec.start:
        assert torch.equal(start["weights"], theta0)
        assert start["adam_state_at_first_step"] == 0  # fresh Adam moments at every experience
    thetas = merger.weights
    assert len(thetas) == 3 and not torch.equal(thetas[0], thetas[1])
    for t, end in enumerate(rec.end):
        seen = thetas[: t + 1]
        if strategy_name == "weight-average":
            expected = weight_average(weights=seen)
        elif strategy_name == "task-arithmetic":
            expected = task_arithmetic(base=theta0, weights=seen, alpha=0.5)
        else:
            expected = fisher_weighted_average(weights=seen, fishers=merger.fishers[: t + 1], floor=1e-6)
        assert torch.allclose(end["weights"], expected)
    if strategy_name == "fisher-merge":
        assert all(f.shape == theta0.shape and (f >= 0).all() and f.sum() > 0 for f in merger.fishers)
        # task-incremental: the output rows of the classes outside an experience's task get no Fisher
        out_bias = merger.fishers[0][-10:]
        assert (out_bias[2:] == 0).all() and (out_bias[:2] > 0).all()


@pytest.mark.parametrize("strategy", MERGING)
def test_merging_strategy_runs_and_reports(strategy, make_config, mnist_root):
    # IVON from scratch learns slowly: 4 steps at lr 0.05 leave it near chance, 12 at lr 0.5 do not
    # task arithmetic at alpha 1: after one experience the model is that experience's trained model
    overrides = {"ivon-merge": {"epochs": 3, "lr": 0.5}, "task-arithmetic": {"alpha": 1.0}}.get(strategy, {})
    cfg = make_config(strategy, **overrides)
    result = runner.run(cfg)
    validate(result)
    json.loads(json.dumps(result, allow_nan=False))
    matrix = result["accuracy_matrix"]
    assert len(matrix) == 5 and all(len(row) == 5 for row in matrix)
    assert matrix[0][0] > 0.8  # one experience, merged with nothing: a trained two-class model


def test_merge_parameters_are_checked(make_config, mnist_root):
    with pytest.raises(ValueError, match="merge_precision must be one of"):
        make_config("ivon-merge", merge_precision="fisher")
    with pytest.raises(ValueError, match="rule must be one of"):
        WeightMergingPlugin(rule="median")


def test_a_worker_trains_the_same_posteriors_as_the_sequential_run(make_config, mnist_root):
    """Each experience reseeds torch from (seed, experience id): a worker that trains experience t alone
    draws the same batches and noise as the sequential run did for t, after t - 1 others."""
    from cl_bayes.avalanche.merge_strategies import train_one_experience

    cfg = make_config("ivon-merge", experiences=2)
    runner.seed_everything(cfg.seed)  # the worker seeds as the runner does, so do it here
    bundle = build_benchmark(cfg)
    seq, _ = runner.build_strategy(cfg, bundle)
    for experience in bundle.benchmark.train_stream:
        seq.train(experience)
    plugin = next(p for p in seq.plugins if isinstance(p, PosteriorMergingPlugin))
    workers = [train_one_experience(cfg.to_dict(), t, None) for t in (1, 0)]  # any order
    for worker in workers:
        t = worker["t"]
        assert torch.equal(worker["mean"], plugin.posteriors[t][0])
        assert torch.equal(worker["precision"], plugin.posteriors[t][1])
    assert not torch.equal(workers[0]["mean"], workers[1]["mean"])


@pytest.mark.slow  # a local Ray and two workers importing Avalanche: about 90 s on the shared 2-core machine
def test_ivon_merge_trains_experiences_as_ray_tasks_and_merges_in_the_driver(make_config, mnist_root):
    pytest.importorskip("ray")
    overrides = {"experiences": 3, "epochs": 3, "lr": 0.5}
    sequential = runner.run(make_config("ivon-merge", **overrides))
    parallel = runner.run(make_config("ivon-merge", workers=2, **overrides))
    validate(parallel)
    assert parallel["config"]["params"]["workers"] == 2
    assert parallel["time_s"]["parts"]["parallel_training"] > 0
    # every experience trains from the same start with the same seeded draws as in the sequential run
    assert parallel["accuracy_matrix"] == sequential["accuracy_matrix"]
