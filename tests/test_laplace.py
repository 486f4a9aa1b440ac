"""FROMP as published: the diagonal Laplace-GGN posterior, re-anchoring, and `fromp` / `frorp` in real templates."""

from __future__ import annotations

import json

import pytest
import torch
from avalanche.training.plugins import SupervisedPlugin
from avalanche.training.supervised import Naive
from torch import nn

from cl_bayes.avalanche import runner
from cl_bayes.avalanche.benchmarks import build_benchmark
from cl_bayes.avalanche.fromp_plugin import FunctionalRegularisationPlugin
from cl_bayes.avalanche.fromp_strategies import GradientNormClipping
from cl_bayes.avalanche.memory import experience_data
from cl_bayes.avalanche.models import TaskMaskedModel
from cl_bayes.config import ConfigError, RunConfig
from cl_bayes.fromp import FunctionalPrior, fromp_kernel
from cl_bayes.jacobians import flat_parameters, masked_softmax, per_example_jacobians
from cl_bayes.laplace import DiagonalLaplace, diagonal_ggn
from cl_bayes.models import MLP, SmallCNN
from cl_bayes.posterior import DiagonalGaussian
from cl_bayes.results import validate


def explicit_ggn(model: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The full P x P matrix sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i, from explicit per-example Jacobians."""
    jac = per_example_jacobians(model, x, class_mask=mask)
    with torch.no_grad():
        p = masked_softmax(model(x), mask)
    lam = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    return torch.einsum("ncp,ncd,ndq->pq", jac.double(), lam.double(), jac.double())


def _mask(n: int, classes: int) -> torch.Tensor:
    mask = torch.ones(n, classes, dtype=torch.bool)
    mask[: n // 2, 2:] = False  # half the examples see classes {0, 1} only (a task-incremental mask)
    mask[n // 2 :, :1] = False
    return mask


@pytest.mark.parametrize("method", ["linear", "jacobian", "auto"])
@pytest.mark.parametrize("masked", [False, True])
def test_diagonal_ggn_is_the_diagonal_of_the_explicit_ggn(method, masked):
    torch.manual_seed(0)
    model = MLP(in_features=12, hidden=[6, 5], num_classes=4)
    x = torch.randn(9, 12)
    mask = _mask(9, 4) if masked else None
    expected = explicit_ggn(model, x, mask).diagonal()
    got = diagonal_ggn(model, x, class_mask=mask, method=method).double()
    assert got.shape == (sum(p.numel() for p in model.parameters()),)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7)
    assert float(expected.abs().max()) > 1e-2  # not a vacuous comparison


def test_diagonal_ggn_of_a_cnn_falls_back_to_jacobians():
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=3, width=2, dense=4)
    x = torch.randn(3, 1, 32, 32)
    expected = explicit_ggn(model, x, None).diagonal()
    assert torch.allclose(diagonal_ggn(model, x).double(), expected, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="nn.Linear"):
        diagonal_ggn(model, x, method="linear")


def test_laplace_covariance_is_the_inverse_of_ggn_plus_prior_and_fitting_again_accumulates():
    torch.manual_seed(1)
    model = MLP(in_features=10, hidden=[5], num_classes=3)
    x1, x2 = torch.randn(7, 10), torch.randn(5, 10)
    laplace = DiagonalLaplace(prior_precision=0.3)
    laplace.fit(model, [(x1, None)])
    laplace.fit(model, [(x2[:2], None), (x2[2:], None)])  # a second experience, in two batches
    ggn = explicit_ggn(model, torch.cat([x1, x2]), None)  # the GGN of all data so far
    covariance = torch.linalg.inv(torch.diag(ggn.diagonal()) + 0.3 * torch.eye(ggn.shape[0], dtype=ggn.dtype))
    posterior = laplace.posterior(model)
    assert torch.allclose(posterior.variance.double(), covariance.diagonal(), rtol=1e-4)
    assert torch.equal(posterior.mean, flat_parameters(model))
    assert laplace.n_data == 12
    assert torch.allclose(laplace.posterior_precision, laplace.ggn + 0.3)


def test_laplace_rejects_bad_input():
    model = MLP(in_features=4, hidden=[3], num_classes=2)
    with pytest.raises(ValueError, match="prior_precision"):
        DiagonalLaplace(prior_precision=0.0)
    with pytest.raises(ValueError, match="method"):
        diagonal_ggn(model, torch.randn(2, 4), method="kfac")
    with pytest.raises(ValueError, match="no data"):
        DiagonalLaplace(prior_precision=1.0).fit(model, [])
    with pytest.raises(ValueError, match="not been fitted"):
        DiagonalLaplace(prior_precision=1.0).posterior(model)


def test_reanchor_recomputes_outputs_and_kernels_under_the_new_posterior():
    torch.manual_seed(2)
    model = MLP(in_features=6, hidden=[4], num_classes=3)
    w = flat_parameters(model)
    first = DiagonalGaussian(w, torch.full_like(w, 10.0))
    prior = FunctionalPrior(tau=1.0, kernel="block", eps=1e-4)
    xs = [torch.randn(4, 6), torch.randn(3, 6)]
    for x in xs:
        prior.add_task(model, first, x)
    later = DiagonalGaussian(w + 0.3 * torch.randn_like(w), torch.rand_like(w) + 1.0)
    prior.reanchor(model, later)
    assert len(prior) == 2
    for x, task in zip(xs, prior.tasks, strict=True):
        with torch.no_grad():
            probs = torch.func.functional_call(model, dict(zip(
                [n for n, _ in model.named_parameters()],
                [t.view(p.shape) for t, p in zip(later.mean.split([p.numel() for p in model.parameters()]),
                                                  model.parameters(), strict=True)], strict=True)), (x,)).softmax(-1)
        assert torch.allclose(task.probs, probs, atol=1e-6)
        assert torch.allclose(task.kernel, fromp_kernel(model, later, x=x, form="block", eps=1e-4), atol=1e-7)
        assert not torch.allclose(task.kernel, fromp_kernel(model, first, x=x, form="block", eps=1e-4), atol=1e-5)


# --- inside Avalanche ------------------------------------------------------------

MEMORY = 10


@pytest.fixture(scope="module")
def bundle(mnist_root):
    config = RunConfig(benchmark="split-mnist", strategy="fromp", seed=0, train_per_experience=300,
                       test_per_experience=100)
    return build_benchmark(config, data_root=mnist_root)


class Probe(SupervisedPlugin):
    """Listed after FROMP and clipping: the term at the first step, and each step's gradient norm."""

    def __init__(self, fromp):
        super().__init__()
        self.fromp = fromp
        self.first_penalty = []
        self.grad_norms = []

    def before_training_iteration(self, strategy, **kwargs):
        if strategy.clock.train_exp_iterations == 0 and len(self.fromp.prior):
            self.first_penalty.append(float(self.fromp.prior(strategy.model.net)))

    def after_backward(self, strategy, **kwargs):
        grads = [p.grad.reshape(-1) for p in strategy.model.parameters() if p.grad is not None]
        self.grad_norms.append(float(torch.cat(grads).norm()))


def test_fromp_with_laplace_reanchors_every_task_at_the_latest_posterior(bundle):
    torch.manual_seed(0)
    model = TaskMaskedModel(MLP(in_features=784, hidden=[32], num_classes=10), bundle.class_masks)
    laplace = DiagonalLaplace(prior_precision=1e-3)
    fromp = FunctionalRegularisationPlugin(tau=10.0, memory_size=MEMORY, eps=1e-5, selection="lambda",
                                           laplace=laplace, anchor="latest")
    probe = Probe(fromp)
    expected = DiagonalLaplace(prior_precision=1e-3)

    class Reference(SupervisedPlugin):  # listed first: the GGN of each experience at the weights of its end
        def after_training_exp(self, strategy, **kwargs):
            data = experience_data(strategy.experience)
            expected.fit(model.net, [(data.x(), model.mask_for(strategy.experience.task_label, len(data.y)))])

    strategy = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                     train_mb_size=64, train_epochs=1, eval_mb_size=500, evaluator=None,
                     plugins=[Reference(), fromp, GradientNormClipping(0.05), probe])
    stream = bundle.benchmark.train_stream
    for exp in stream[:3]:
        strategy.train(exp)
    sizes = [len(experience_data(e).y) for e in stream[:3]]
    assert laplace.n_data == sum(sizes)  # the GGN holds every experience's training data
    posterior = laplace.posterior(model.net)
    assert torch.allclose(posterior.precision, expected.posterior_precision, rtol=1e-4)
    # every task, old ones included, is anchored at the latest weights: the term vanishes there...
    assert float(fromp.prior(model.net)) == pytest.approx(0.0, abs=1e-10)
    # ...and at the first step of experiences 2 and 3 (weights = the stored posterior mean)
    assert probe.first_penalty == pytest.approx([0.0, 0.0], abs=1e-10)
    for task in fromp.prior.tasks:  # kernels use the latest (accumulated) Laplace covariance
        assert torch.allclose(task.kernel, fromp_kernel(model.net, posterior, x=task.inputs, form="block",
                                                        class_mask=task.class_mask, eps=1e-5), rtol=1e-4, atol=1e-9)
    assert max(probe.grad_norms) <= 0.05 * (1 + 1e-5)  # clipped


def test_anchor_experience_keeps_each_tasks_own_outputs(bundle):
    torch.manual_seed(0)
    model = TaskMaskedModel(MLP(in_features=784, hidden=[32], num_classes=10), bundle.class_masks)
    fromp = FunctionalRegularisationPlugin(tau=10.0, memory_size=MEMORY, eps=1e-5, selection="lambda",
                                           laplace=DiagonalLaplace(prior_precision=1e-3), anchor="experience")
    strategy = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                     train_mb_size=64, train_epochs=1, eval_mb_size=500, evaluator=None, plugins=[fromp])
    for exp in bundle.benchmark.train_stream[:2]:
        strategy.train(exp)
    first = fromp.prior.tasks[0]
    with torch.no_grad():
        now = masked_softmax(model.net(first.inputs), first.class_mask)
    assert not torch.allclose(first.probs, now, atol=1e-3)  # still the outputs of the end of experience 1


@pytest.mark.parametrize(("strategy", "bench"), [("fromp", "split-mnist"), ("frorp", "permuted-mnist")])
def test_fromp_and_frorp_run_and_report(strategy, bench, make_config, mnist_root):
    extra = {"memory_size": 8, "test_per_experience": 100} if bench == "permuted-mnist" else {}
    cfg = make_config(strategy, benchmark=bench, **extra)
    result = runner.run(cfg)
    validate(result)
    json.loads(json.dumps(result, allow_nan=False))
    n = 10 if bench == "permuted-mnist" else 5
    assert len(result["accuracy_matrix"]) == n
    assert result["memory_size"] == cfg.params["memory_size"]


def test_fromp_specs_carry_the_papers_settings(make_config):
    split, perm = make_config("fromp"), make_config("fromp", benchmark="permuted-mnist")
    assert (split.lr, split.params["tau"], split.params["memory_size"]) == (1e-4, 10.0, 40)
    assert (perm.lr, perm.params["tau"], perm.params["memory_size"]) == (1e-3, 0.5, 200)
    assert split.params["selection"] == "lambda"
    assert make_config("frorp").params["selection"] == "random"
    for bad in ({"selection": "sensitivity"}, {"prior_precision": 0.0}, {"anchor": "first"},
                {"max_grad_norm": 0.0}):
        with pytest.raises(ConfigError):
            make_config("fromp", **bad)
