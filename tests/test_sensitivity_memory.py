"""Memory chosen inside Avalanche: ivon-replay and its ablations on tiny real runs.

Each run is split-mnist (or split-mnist-ci) with 200 training examples per experience and
the specs' memory sizes. A recording plugin, placed after the replay plugin, re-derives
at every experience's end what the selection should have been, from a per-example read of
the experience's dataset (independent of the selectors' batched tensor read) and the
pure functions of ``cl_bayes.sensitivity`` / ``cl_bayes.memory``; and checks that the
replay buffer holds exactly the chosen examples.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from avalanche.benchmarks.utils.classification_dataset import (
    _make_taskaware_tensor_classification_dataset as tensor_dataset,
)
from avalanche.training.plugins import ReplayPlugin, SupervisedPlugin

from cl_bayes import config as C
from cl_bayes.avalanche import strategies
from cl_bayes.avalanche.ivon_strategy import NaturalParameterAccumulation
from cl_bayes.avalanche.memory import experience_data, experience_targets, lambda_selector, sensitivity_selector
from cl_bayes.avalanche.models import class_mask, unwrap
from cl_bayes.jacobians import masked_softmax
from cl_bayes.memory import class_quotas, herding_selection, select_memory, softmax_hessian_trace
from cl_bayes.posterior import DiagonalGaussian
from cl_bayes.sensitivity import memory_perturbation

TINY = {"train_per_experience": 200, "test_per_experience": 100}


def config(strategy: str, benchmark: str = "split-mnist", seed: int = 0, **overrides):
    spec, path = C.load_spec(strategy)
    return C.resolve(benchmark=benchmark, strategy=strategy, seed=seed, protocol="quick",
                     params_cls=strategies.get(strategy).params_cls, spec=spec, spec_path=path,
                     overrides={**TINY, **overrides})


@pytest.fixture(scope="module")
def bundles(mnist_root):
    """Benchmarks by (benchmark, seed, sizes), built once per module."""
    from cl_bayes.avalanche.benchmarks import build_benchmark

    cache = {}

    def get(cfg):
        key = (cfg.benchmark, cfg.seed, cfg.train_per_experience, cfg.test_per_experience)
        if key not in cache:
            cache[key] = build_benchmark(cfg, data_root=mnist_root)
        return cache[key]

    return get


class Recorder(SupervisedPlugin):
    """After the replay plugin's selection: what each selection rule should have picked."""

    def __init__(self):
        super().__init__()
        self.records = []

    def after_training_exp(self, strategy, **kwargs):
        exp = strategy.experience
        ds = exp.dataset.eval()
        items = [ds[i] for i in range(len(ds))]  # the slow, obviously right read
        x = torch.stack([it[0] for it in items])
        y = torch.tensor([int(it[1]) for it in items])
        t = torch.tensor([int(it[2]) for it in items])
        model, net = strategy.model, unwrap(strategy.model)
        mask = class_mask(model, t, len(y))
        was_training = model.training
        model.eval()
        seen = {}
        handle = net.classifier.register_forward_hook(lambda _m, inp, _o: seen.update(h=inp[0]))
        with torch.no_grad():
            logits = net(x)
        handle.remove()
        model.train(was_training)
        (replay,) = [p for p in strategy.plugins if isinstance(p, ReplayPlugin)]
        memory = replay.storage_policy
        optimizer = strategy.optimizer
        self.records.append(SimpleNamespace(
            exp=exp.current_experience, x=x, y=y, t=t, mask=mask, logits=logits, features=seen["h"],
            posterior=optimizer.posterior, ess=optimizer.ess, chosen=memory.indices[-1].clone(),
            prior=DiagonalGaussian(optimizer.prior_mean, optimizer.prior_precision),
            kept=memory.groups[-1], buffer_size=len(memory.buffer), net=net,
        ))


def run_tiny(bundles, cfg):
    from cl_bayes.avalanche.runner import build_strategy, seed_everything

    bundle = bundles(cfg)
    seed_everything(cfg.seed)
    recorder = Recorder()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        strategy, _ = build_strategy(cfg, bundle, plugins=[recorder])
        for experience in bundle.benchmark.train_stream:
            strategy.train(experience)
    return strategy, recorder.records


def assert_top_per_class(chosen, scores, y, memory_size):
    """``chosen`` holds, per class, the quota's highest scores (ties: lower index first)."""
    quotas = class_quotas(y, memory_size=memory_size)
    assert len(chosen) == memory_size == sum(quotas.values())
    assert len(set(chosen.tolist())) == memory_size
    for c, quota in quotas.items():
        members = torch.nonzero(y == c).squeeze(-1)
        picked = chosen[y[chosen] == c]
        assert len(picked) == quota
        rest = members[~torch.isin(members, picked)]
        assert len(rest) > 0, "the test needs more examples than memory slots"
        assert scores[picked].min() >= scores[rest].max()
        # in selection order: best first
        assert torch.all(scores[picked][:-1] >= scores[picked][1:])


def assert_memory_holds(record, memory_size, n_experiences_so_far):
    kept = torch.stack([record.kept[j][0] for j in range(len(record.kept))])
    assert torch.equal(kept, record.x[record.chosen])
    assert [int(record.kept[j][1]) for j in range(len(record.kept))] == record.y[record.chosen].tolist()
    assert record.buffer_size == memory_size * n_experiences_so_far


@pytest.mark.parametrize("bench", ["split-mnist", "split-mnist-ci"])
def test_sensitivity_ablation_keeps_the_most_sensitive_examples_per_class(bundles, bench):
    n_train = {"split-mnist": 200, "split-mnist-ci": 500}[bench]
    # A tiny run takes 4 steps per experience. At split-mnist-ci's lr 0.6 (chosen on full quick runs) the first
    # experience ends with a saturated softmax (every score exactly 0, top-k then undefined), so the tiny run keeps
    # the smaller step; what is checked is which examples the selector keeps for the scores it sees.
    lr = {"split-mnist": {}, "split-mnist-ci": {"lr": 0.2}}[bench]
    cfg = config("ivon-replay-sensitivity", bench, train_per_experience=n_train, **lr)
    memory_size = cfg.params["memory_size"]
    assert memory_size == {"split-mnist": 40, "split-mnist-ci": 200}[bench]  # replay.toml's sizes
    _, records = run_tiny(bundles, cfg)
    assert len(records) == 5
    for i, r in enumerate(records):
        if bench == "split-mnist":
            assert r.mask is not None and bool((r.t == i).all())
        mp = memory_perturbation(r.net, r.posterior, x=r.x, y=r.y, class_mask=r.mask, estimator="last_layer",
                                 ess=r.ess, n_train=len(r.y))
        scores = mp.sensitivity
        assert scores.std() > 0
        assert_top_per_class(r.chosen, scores, r.y, memory_size)
        assert_memory_holds(r, memory_size, i + 1)


def test_lambda_ablation_keeps_top_softmax_hessian_trace(bundles):
    cfg = config("ivon-replay-lambda")
    assert cfg.params["selection"] == "lambda"
    _, records = run_tiny(bundles, cfg)
    for i, r in enumerate(records):
        scores = softmax_hessian_trace(masked_softmax(r.logits, r.mask))
        assert_top_per_class(r.chosen, scores, r.y, 40)
        assert_memory_holds(r, 40, i + 1)


def test_ivon_replay_default_matches_icarl_herding_on_last_layer_features(bundles):
    cfg = config("ivon-replay")
    assert cfg.params["selection"] == "herding"  # the best rule on validation (strategies/ivon-replay.toml)
    _, records = run_tiny(bundles, cfg)
    for i, r in enumerate(records):
        assert torch.equal(r.chosen, herding_selection(r.features, r.y, memory_size=40))
        assert_memory_holds(r, 40, i + 1)


def test_random_ablation_matches_seeded_class_balanced_choice(bundles):
    cfg = config("ivon-replay-random", seed=1)
    _, records = run_tiny(bundles, cfg)
    for i, r in enumerate(records):
        expected = select_memory(labels=r.y, memory_size=40, mode="random", seed=1 * 10_007 + r.exp)
        assert torch.equal(r.chosen, expected)
        assert_memory_holds(r, 40, i + 1)


def test_ablations_run_end_to_end_with_equal_memory(mnist_root):
    from cl_bayes.avalanche.runner import run

    for name in ("ivon-replay", "ivon-replay-sensitivity", "ivon-replay-lambda", "ivon-replay-random"):
        cfg = config(name, "split-mnist-ci", test_per_experience=50)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore")
            result = run(cfg, data_root=mnist_root)
        assert result["memory_size"] == 200
        assert len(result["accuracy_matrix"]) == 5
        assert 0.0 <= result["metrics"]["average_accuracy"] <= 1.0


def test_accumulate_selects_before_the_posterior_becomes_the_prior(bundles):
    """With ``accumulate`` the replay plugin (selection) runs before the carry; the recorder runs
    after it, when the prior is the pre-carry posterior (temper = 1): the selection must be the
    top sensitivity under that prior, i.e. under the posterior the experience ended with."""
    cfg = config("ivon-replay-sensitivity", accumulate=True)
    strategy, records = run_tiny(bundles, cfg)
    kinds = [type(p) for p in strategy.plugins]
    assert kinds.index(ReplayPlugin) < kinds.index(NaturalParameterAccumulation)
    for i, r in enumerate(records):
        assert torch.equal(r.prior.mean, r.posterior.mean)
        assert not torch.allclose(r.prior.precision, r.posterior.precision)  # the carry happened
        mp = memory_perturbation(r.net, r.prior, x=r.x, y=r.y, class_mask=r.mask, estimator="last_layer")
        assert_top_per_class(r.chosen, mp.sensitivity, r.y, 40)
        assert_memory_holds(r, 40, i + 1)


def test_candidate_pool_scores_only_a_seeded_random_pool(bundles):
    cfg = config("ivon-replay-sensitivity", candidates=2)
    _, records = run_tiny(bundles, cfg)
    for r in records:
        pool = select_memory(labels=r.y, memory_size=80, mode="random", seed=0 * 10_007 + r.exp)
        assert bool(torch.isin(r.chosen, pool).all())
        mp = memory_perturbation(r.net, r.posterior, x=r.x[pool], y=r.y[pool], class_mask=r.mask[pool],
                                 estimator="last_layer", ess=r.ess, n_train=len(r.y))
        in_pool = torch.tensor([pool.tolist().index(i) for i in r.chosen.tolist()])  # positions in the pool
        assert_top_per_class(in_pool, mp.sensitivity, r.y[pool], 40)


def test_fast_tensor_read_matches_dataset_and_falls_back_with_transforms(bundles):
    bundle = bundles(config("ivon-replay", "split-mnist"))
    for exp in bundle.benchmark.train_stream:
        data = experience_data(exp)
        ds = exp.dataset.eval()
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        assert torch.equal(data.x(), x)
        assert data.y.tolist() == [int(ds[i][1]) for i in range(len(ds))]
        assert data.t.tolist() == [exp.current_experience] * len(ds)
    # a dataset with a transform: the spot check sees it and the DataLoader path is used
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(30, 1, 4, 4, generator=g), torch.randint(0, 3, (30,), generator=g)
    ds = tensor_dataset(x, y, task_labels=0).eval().replace_current_transform_group(lambda v: v + 1)
    assert torch.equal(ds[3][0], x[3] + 1)
    data = experience_data(SimpleNamespace(dataset=ds, task_labels=[0], current_experience=0))
    assert torch.allclose(data.x(), x + 1) and torch.equal(data.y, y)


def test_selectors_reject_bad_inputs(bundles):
    with pytest.raises(ValueError, match="estimator"):
        sensitivity_selector(estimator="fisher")
    with pytest.raises(ValueError, match="candidates"):
        lambda_selector(candidates=0)
    with pytest.raises(C.ConfigError, match="selection"):
        config("ivon-replay", selection="best")
    # sensitivity needs the IVON posterior: replay (Adam) + the sensitivity selector fails clearly
    from cl_bayes.avalanche.runner import build_strategy

    bundle = bundles(config("replay"))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        strategy, _ = build_strategy(config("replay"), bundle)
    with pytest.raises(TypeError, match="IVON"):
        sensitivity_selector()(strategy, bundle.benchmark.train_stream[0], 10)


def test_bfloat16_scores_choose_nearly_the_float32_memory(bundles):
    """score_dtype='bfloat16' runs the scoring pass under bf16 autocast: float32 scores out, and on a
    trained IVON posterior a memory that shares most of its examples with the float32 choice."""
    cfg = config("ivon-replay-sensitivity", "split-mnist", train_per_experience=400)
    strategy, _ = run_tiny(bundles, cfg)
    experience = bundles(cfg).benchmark.train_stream[4]  # the last of the 5
    exact = sensitivity_selector()(strategy, experience, 40)
    approx = sensitivity_selector(score_dtype="bfloat16")(strategy, experience, 40)
    assert approx.shape == exact.shape and len(set(approx.tolist())) == 40
    y = experience_targets(experience)
    assert class_quotas(y[approx], memory_size=40) == class_quotas(y[exact], memory_size=40)
    assert len(set(approx.tolist()) & set(exact.tolist())) >= 30
    with pytest.raises(ValueError, match="score_dtype"):
        sensitivity_selector(score_dtype="float16")
