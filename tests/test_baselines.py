"""Every registered baseline, end to end, inside the real Avalanche templates on a slice of real MNIST."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from avalanche.training.plugins import AGEMPlugin, GEMPlugin, ReplayPlugin, SupervisedPlugin
from conftest import TINY, write_image_folder

from cl_bayes import metrics as M
from cl_bayes.avalanche import runner
from cl_bayes.avalanche.benchmarks import build_benchmark
from cl_bayes.avalanche.runner import NonFiniteLossError
from cl_bayes.results import validate

BASELINES = ["naive", "naive-sgd", "ewc", "online-ewc", "si", "lwf", "replay", "agem", "gem", "cumulative", "joint",
             "ivon", "ivon-prior"]


@pytest.mark.parametrize("strategy", BASELINES)
def test_baseline_runs_and_reports(strategy, make_config, mnist_root):
    cfg = make_config(strategy)
    result = runner.run(cfg)

    validate(result)
    json.loads(json.dumps(result, allow_nan=False))  # what write_atomic will do
    assert (result["benchmark"], result["strategy"], result["seed"], result["protocol"]) == (
        "split-mnist", strategy, 0, "quick")
    assert result["config"] == cfg.to_dict()
    assert result["data_source"] == "torchvision:MNIST"
    matrix = result["accuracy_matrix"]
    joint = strategy == "joint"
    assert len(matrix) == (1 if joint else 5) and all(len(row) == 5 for row in matrix)
    assert all(0 <= v <= 1 for row in matrix for v in row)

    # the metrics are the metric functions of what was recorded
    m = result["metrics"]
    assert m["average_accuracy"] == pytest.approx(M.average_accuracy(matrix))
    if joint:
        assert m["backward_transfer"] is None and m["forgetting"] is None
    else:
        assert m["backward_transfer"] == pytest.approx(M.backward_transfer(matrix))
        assert m["forgetting"] == pytest.approx(M.forgetting(matrix))
    assert all(v is None or math.isfinite(v) for v in m.values())
    assert m["nll"] > 0 and 0 <= m["ece"] <= 1
    cal = result["calibration"]
    assert sum(cal["count"]) == 5 * TINY["test_per_experience"]  # pooled over every experience's test data
    assert m["ece"] == pytest.approx(M.ece_from_reliability(cal))

    times = result["time_s"]
    assert len(times["per_experience"]) == len(matrix)
    assert all(t > 0 for t in times["per_experience"])
    assert times["total"] == pytest.approx(sum(times["per_experience"]))
    assert result["peak_memory_mb"] > 0
    assert result["memory_size"] == cfg.params.get("memory_size", 0)


def test_naive_learns_the_first_experience(tiny_config):
    result = runner.run(tiny_config)
    r = result["accuracy_matrix"]
    # masked 2-way task: chance is 0.5; 0 vs 1 is easy even from 200 examples
    assert r[0][0] > 0.8
    assert result["metrics"]["average_accuracy"] > 0.6


def test_runs_are_reproducible(make_config, mnist_root):
    a = runner.run(make_config("ewc", seed=5))
    b = runner.run(make_config("ewc", seed=5))
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    assert a["metrics"] == b["metrics"]


@pytest.mark.parametrize("strategy_name", ["replay", "agem", "gem"])
def test_memory_holds_memory_size_examples_per_experience(strategy_name, make_config, mnist_root):
    size = 30  # per experience; two experiences are enough to see it per experience, not in total
    cfg = make_config(strategy_name, memory_size=size)
    bundle = build_benchmark(cfg)
    strategy, _ = runner.build_strategy(cfg, bundle)
    for i, exp in enumerate(list(bundle.benchmark.train_stream)[:2]):
        strategy.train(exp)
        seen = i + 1
        if strategy_name == "replay":
            (plugin,) = [p for p in strategy.plugins if isinstance(p, ReplayPlugin)]
            memory = plugin.storage_policy
            assert [len(g) for g in memory.groups] == [size] * seen
            assert len(memory.buffer) == size * seen
            for k, group in enumerate(memory.groups):
                labels = [int(y) for y in group.targets]
                assert Counter(labels) == {2 * k: size // 2, 2 * k + 1: size // 2}  # class-balanced
                assert set(int(t) for t in group.targets_task_labels) == {k}
                xs = torch.stack([group[j][0] for j in range(len(group))])
                train = {x.numpy().tobytes() for x in bundle.train[k].x}
                assert all(x.numpy().tobytes() in train for x in xs)  # examples of that experience
        elif strategy_name == "agem":
            (plugin,) = [p for p in strategy.plugins if isinstance(p, AGEMPlugin)]
            assert [len(b) for b in plugin.buffers] == [size] * seen
        else:
            (plugin,) = [p for p in strategy.plugins if isinstance(p, GEMPlugin)]
            assert sorted(plugin.memory_x) == list(range(seen))
            assert [plugin.memory_x[t].shape[0] for t in range(seen)] == [size] * seen


def test_joint_trains_once_on_everything(make_config, mnist_root):
    result = runner.run(make_config("joint"))
    assert len(result["accuracy_matrix"]) == 1 and len(result["accuracy_matrix"][0]) == 5
    assert len(result["time_s"]["per_experience"]) == 1
    assert M.backward_transfer(result["accuracy_matrix"]) is None
    # trained on every experience: above chance (0.5, masked 2-way) on all of them
    assert min(result["accuracy_matrix"][0]) > 0.6


def test_a_cnn_run_on_split_cifar10_from_an_image_folder(make_config, tmp_path):
    root = tmp_path / "root"
    write_image_folder(root / "CIFAR10-jpeg", n_classes=10, n_train=4, n_test=2)
    cfg = make_config("naive", benchmark="split-cifar10", batch_size=4)
    assert cfg.model == "cnn"
    result = runner.run(cfg, data_root=root)
    validate(result)
    assert result["data_source"].startswith("imagefolder:")
    assert len(result["accuracy_matrix"]) == 5
    assert sum(result["calibration"]["count"]) == 5 * 4


# --- the NaN guard ------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["naive", "naive-sgd", "ivon"])
def test_a_diverging_lr_raises_non_finite_loss(strategy, make_config, mnist_root):
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        runner.run(make_config(strategy, lr=1e30))


class NaNInputs(SupervisedPlugin):
    """Poisons the inputs of the ``at``-th training iteration."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at
        self.seen = 0

    def before_forward(self, strategy, **kwargs):
        self.seen += 1
        if self.seen == self.at:
            strategy.mbatch[0] = torch.full_like(strategy.mbatch[0], float("nan"))


@pytest.mark.parametrize("strategy", ["naive", "ewc", "ivon-prior"])
def test_a_nan_loss_stops_training(strategy, make_config, mnist_root):
    cfg = make_config(strategy)
    bundle = build_benchmark(cfg)
    poison = NaNInputs(at=6)  # in the second experience (4 iterations per experience)
    model, _ = runner.build_strategy(cfg, bundle, plugins=[poison])
    stream = list(bundle.benchmark.train_stream)
    model.train(stream[0])  # clean
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at experience 1"):
        model.train(stream[1])
    assert poison.seen == 6  # stopped at once,
    assert all(torch.isfinite(p).all() for p in model.model.parameters())  # before any update


def test_the_guard_rejects_only_non_finite_losses():
    guard = runner.NonFiniteLossGuard()

    class Fake:
        class clock:
            train_exp_counter = train_exp_epochs = train_epoch_iterations = 0

    fake = Fake()
    fake.loss = torch.tensor(1e30)
    guard.before_backward(fake)  # large but finite: fine
    for bad in (float("nan"), float("inf"), -float("inf")):
        fake.loss = torch.tensor(bad)
        with pytest.raises(NonFiniteLossError):
            guard.before_backward(fake)


def _agem_after_backward(plugin, grad: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Run a plugin's after_backward on a one-parameter model whose gradient is ``grad``."""
    from types import SimpleNamespace

    weight = torch.nn.Parameter(torch.zeros(grad.numel()))
    weight.grad = grad.clone()
    plugin.buffers = [object()]  # one past experience
    plugin.reference_gradients = ref
    plugin.after_backward(SimpleNamespace(model=torch.nn.ParameterList([weight]), device="cpu"))
    return weight.grad


def test_guarded_agem_projects_conflicting_gradients_and_survives_a_vanishing_reference():
    from cl_bayes.avalanche.strategies import GuardedAGEMPlugin

    def plugin(cls):
        return cls(patterns_per_experience=1, sample_size=1)

    g, ref = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.5, 1.0, 0.0])
    projected = _agem_after_backward(plugin(GuardedAGEMPlugin), g, ref)
    expected = g - (g @ ref) / (ref @ ref) * ref
    assert torch.allclose(projected, expected) and abs(float(projected @ ref)) < 1e-6
    torch.testing.assert_close(projected, _agem_after_backward(plugin(AGEMPlugin), g, ref))  # same maths
    agreeing = torch.tensor([1.0, 2.0, 0.0])
    assert torch.equal(_agem_after_backward(plugin(GuardedAGEMPlugin), agreeing, ref), agreeing)  # g . ref >= 0
    # a fitted memory: ref's squared norm underflows in float32 (1e-46 -> 0) while g . ref does not
    tiny = torch.tensor([1e-23, 0.0, 0.0])
    conflicting = torch.tensor([-1.0, 1.0, 0.0])
    assert not torch.isfinite(_agem_after_backward(plugin(AGEMPlugin), conflicting, tiny)).all()  # Avalanche 0.6
    guarded = _agem_after_backward(plugin(GuardedAGEMPlugin), conflicting, tiny)
    assert torch.isfinite(guarded).all()
    assert torch.allclose(guarded, torch.tensor([0.0, 1.0, 0.0]))  # the component along ref removed
    zero = torch.zeros(3)
    assert torch.equal(_agem_after_backward(plugin(GuardedAGEMPlugin), conflicting, zero), conflicting)
