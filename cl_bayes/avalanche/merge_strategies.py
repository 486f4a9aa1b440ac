"""Merging strategies: every experience trained on its own from one shared start, then merged.

Registered in ``cl_bayes.avalanche.strategies``. Each strategy is a real Avalanche template
(``IVONStrategy`` or ``Naive`` with Adam) with one plugin over two hooks:

* ``before_training_exp``: at the first experience, snapshot the starting state (the weights,
  and for IVON its whole state: Hessian estimate, momentum, prior, step counters); at every
  later one, restore it, so experience t trains from exactly the state experience 1 did
  (Avalanche keeps optimizer state across experiences unless told otherwise; Adam's moments
  are cleared here, IVON's buffers are loaded back from the snapshot).
* ``after_training_exp``: record what experience t produced, then load the merge of
  experiences 1..t into the model, so the runner's evaluation after experience t scores the
  merged model. The next ``before_training_exp`` puts the start back.

The strategies (the maths is ``cl_bayes.merge``):

* ``ivon-merge``: IVON's posterior of each experience, q_t = N(m_t, diag(1 / lambda_t)),
  merged by natural parameters (the product of the q_t divided by the shared prior repeated
  t - 1 times). ``merge_precision`` chooses lambda_t: ``data_hess`` (the default) is
  ess_t * ``IVON.data_hess`` + prior precision, the data's debiased Hessian
  (``cl_bayes.natural``); ``hess`` is IVON's own precision ess_t * (h_t + delta), mostly
  ess_t * hess_init after one epoch at beta2 near 1; ``ggn`` is ess_t * the diagonal GGN
  (below) at the mean + prior precision, a Laplace precision in place of IVON's. The merged posterior is loaded into
  IVON (mean into the weights, h = (lambda - prior precision) / ess), so the Bayesian model
  average at test time samples it. ``prior_at_init``: centre IVON's prior at the shared
  initial weights instead of 0, so a weight an experience never moves adds nothing.
  ``workers`` > 0: the experiences train in parallel, one Ray task each (``train_in_parallel``;
  a local Ray with ``workers`` CPUs, or the Ray this process already runs in, e.g. under
  ``cl-bayes suite --executor ray``). Each task builds the run exactly as the runner does
  (same seed, so the same initial weights and prior) and trains its one experience; the
  driver's strategy then trains nothing (``train_epochs = 0``) and merges the returned
  posteriors after each experience as above. torch's RNG is reseeded at the start of every
  experience from (seed, experience id) (``experience_seed``), so each experience draws the
  same batches and noise wherever and after whatever it trains: the parallel posteriors equal
  the sequential ones, and a run over a subset of the stream reproduces the full run's
  posteriors of those experiences (``cl-bayes whatif --merge``).
* ``weight-average``, ``task-arithmetic``, ``fisher-merge``: Adam-trained models theta_t from
  the shared start theta_0, merged by the plain average, by theta_0 + alpha * sum_t (theta_t -
  theta_0), or by the Fisher-weighted average (Matena & Raffel, 2022) with F_t the diagonal
  GGN Fisher (``cl_bayes.laplace.diagonal_ggn``: the softmax cross-entropy's exact Fisher,
  over the task's classes on task-incremental benchmarks) averaged over the experience's
  training examples at theta_t.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass

import torch
from avalanche.training.plugins import SupervisedPlugin
from avalanche.training.supervised import Naive
from torch import Tensor

from cl_bayes.avalanche.bayes_strategies import IVONParams, ivon_strategy
from cl_bayes.avalanche.fromp_plugin import laplace_batches
from cl_bayes.avalanche.memory import experience_data
from cl_bayes.avalanche.models import unwrap
from cl_bayes.avalanche.strategies import BuildContext, register, with_plugins
from cl_bayes.jacobians import trainable_parameters
from cl_bayes.laplace import diagonal_ggn
from cl_bayes.merge import fisher_weighted_average, merge_gaussians, task_arithmetic, weight_average

MERGE_PRECISIONS = ("data_hess", "hess", "ggn")
WEIGHT_RULES = ("average", "task_arithmetic", "fisher")


@torch.no_grad()
def load_flat(params, flat: Tensor) -> None:
    """Copy a flat vector into ``params`` in place (IVON's parameters are views of its flat mean: keep them so)."""
    params = list(params)
    total = sum(p.numel() for p in params)
    if flat.shape != (total,):
        raise ValueError(f"flat vector has shape {tuple(flat.shape)}, the parameters hold {total} values")
    for p, chunk in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.copy_(chunk.view_as(p))


def check_merge_precision(name: str) -> str:
    if name not in MERGE_PRECISIONS:
        raise ValueError(f"merge_precision must be one of {', '.join(MERGE_PRECISIONS)}, got {name!r}")
    return name


def flat_of(params) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params]).clone()


# --- ivon-merge ------------------------------------------------------------------


@dataclass
class IVONMergeParams(IVONParams):
    merge_precision: str = "data_hess"  # lambda_t merged: data_hess (ess * debiased Hessian + prior) or hess (IVON's)
    prior_at_init: bool = False  # centre IVON's prior at the shared initial weights (else at 0)
    workers: int = 0  # > 0: train the experiences as parallel Ray tasks on this many CPUs, merge in the driver

    def __post_init__(self):
        check_merge_precision(self.merge_precision)
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")


class PosteriorMergingPlugin(SupervisedPlugin):
    """IVON from the same start in every experience; after each, the natural-parameter merge so far.

    ``posteriors`` holds (mean, precision) of each experience's own posterior, before merging;
    ``merged`` the last merge (mean, precision). See the module docstring.
    """

    def __init__(self, *, merge_precision: str = "data_hess", prior_at_init: bool = False, trained=None,
                 seed: int | None = None):
        super().__init__()
        # seed: reseed torch's RNG at the start of every experience from (seed, experience id), so that
        # experience t draws the same noise and batches however many experiences ran before it (in this
        # process, in a Ray worker, or in a run over a subset of the stream: cl_bayes.whatif_merge).
        # experience_ids: the benchmark's ids of the experiences this run trains, in order (default 0, 1, ...).
        self.seed = seed
        self.experience_ids: list[int] | None = None
        self.merge_precision = check_merge_precision(merge_precision)
        self.prior_at_init = prior_at_init
        self.trained = trained  # None, or a callable returning every experience's (mean, precision): parallel mode
        self.precomputed: list[tuple[Tensor, Tensor]] | None = None
        self.initial: tuple[Tensor, dict] | None = None  # (weights, IVON state dict) at the start
        self.posteriors: list[tuple[Tensor, Tensor]] = []
        self.merged: tuple[Tensor, Tensor] | None = None
        self.seconds: dict[str, float] = {}  # parallel mode: wall time of the parallel training (runner's time parts)

    def before_training_exp(self, strategy, **kwargs):
        opt = strategy.optimizer
        if self.trained is not None and self.precomputed is None:
            start = time.perf_counter()
            self.precomputed = self.trained()
            self.seconds["parallel_training"] = time.perf_counter() - start
        if self.seed is not None:
            k = len(self.posteriors)
            t = self.experience_ids[k] if self.experience_ids is not None else k
            torch.manual_seed(experience_seed(self.seed, t))
        if self.initial is None:
            if self.prior_at_init:
                opt.set_prior(mean=opt.mean)
            self.initial = (opt.mean, copy.deepcopy(opt.state_dict()))
            return
        weights, state = self.initial
        opt.load_state_dict(copy.deepcopy(state))
        load_flat(opt.params, weights)
        opt.ess = float(strategy.fixed_ess or len(strategy.experience.dataset))  # as IVONStrategy.make_optimizer

    def experience_posterior(self, strategy) -> tuple[Tensor, Tensor]:
        """(m_t, lambda_t) of the experience just trained, lambda_t by ``merge_precision``, never below the prior's."""
        opt = strategy.optimizer
        prior_precision = opt.prior_precision
        if self.merge_precision == "data_hess":
            precision = opt.data_hess.mul_(opt.ess).add_(prior_precision)
        elif self.merge_precision == "ggn":
            precision = mean_fisher(strategy).mul_(opt.ess).add_(prior_precision)
        else:  # IVON's own: where h < 0 (possible while h + delta > 0) it would be below the prior's
            precision = torch.maximum(opt.precision, prior_precision)
        return opt.mean, precision

    def after_training_exp(self, strategy, **kwargs):
        opt = strategy.optimizer
        if self.precomputed is not None:
            mean, precision = self.precomputed[len(self.posteriors)]
            self.posteriors.append((mean.to(opt.mean), precision.to(opt.mean)))
        else:
            self.posteriors.append(self.experience_posterior(strategy))
        prior_precision = opt.prior_precision
        mean, precision = merge_gaussians(
            means=[m for m, _ in self.posteriors], precisions=[s for _, s in self.posteriors],
            prior_mean=opt.prior_mean, prior_precision=prior_precision,
        )
        self.merged = (mean, precision)
        load_flat(opt.params, mean)
        opt.hess = (precision - prior_precision).div_(opt.ess)  # so ess * (h + delta) = the merged precision


def experience_seed(seed: int, t: int) -> int:
    """The torch seed experience ``t`` of a merging run with ``seed`` trains with."""
    return seed * 1_000_003 + 7_919 * (t + 1)


def train_one_experience(config: dict, t: int, data_root: str | None) -> dict:
    """A worker: build the run as the runner does (same seed: same start), train experience ``t`` alone.

    Returns {"t", "mean", "precision", "seconds"}: the experience's posterior as ``PosteriorMergingPlugin``
    records it. Module level, so Ray workers import it by name.
    """
    from cl_bayes.avalanche import runner  # here: runner imports the registry, which imports this module
    from cl_bayes.avalanche.benchmarks import build_benchmark
    from cl_bayes.config import RunConfig

    torch.set_num_threads(1)
    cfg = RunConfig(**{**config, "params": {**config["params"], "workers": 0}})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="avalanche")
        warnings.filterwarnings("ignore", message="No loggers specified")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        runner.seed_everything(cfg.seed)
        bundle = build_benchmark(cfg, data_root=data_root)
        stream = list(bundle.benchmark.train_stream)
        if cfg.experiences is not None:  # as the runner slices it: the same first_experience_size, the same prior
            k = cfg.experiences
            bundle = dataclasses.replace(bundle, train=bundle.train[:k], eval=bundle.eval[:k])
        strategy, _ = runner.build_strategy(cfg, bundle, data_root=data_root)
        plugin = next(p for p in strategy.plugins if isinstance(p, PosteriorMergingPlugin))
        plugin.experience_ids = [t]
        start = time.perf_counter()
        strategy.train(stream[t])
    mean, precision = plugin.posteriors[0]
    return {"t": t, "mean": mean, "precision": precision, "seconds": time.perf_counter() - start}


def train_in_parallel(config: dict, n_experiences: int, *, workers: int, data_root: str | None) -> list[dict]:
    """``train_one_experience`` for t = 0..n-1 as Ray tasks (one CPU each); the outcomes in experience order.

    Uses the Ray this process runs in if there is one, else starts a local Ray with ``workers`` CPUs
    and shuts it down at the end.
    """
    from cl_bayes.ray_executor import _import_ray

    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=workers, include_dashboard=False, logging_level=logging.WARNING)
    try:
        task = ray.remote(num_cpus=1, max_retries=1)(train_one_experience)
        return ray.get([task.remote(config, t, data_root) for t in range(n_experiences)])
    finally:
        if started:
            ray.shutdown()


@register("ivon-merge", IVONMergeParams, "IVON per experience from one prior, posteriors merged by natural parameters")
def _ivon_merge(ctx: BuildContext):
    p = ctx.params
    trained = None
    if p.workers > 0:
        config, n = ctx.config.to_dict(), ctx.n_experiences

        def trained():
            outcomes = train_in_parallel(config, n, workers=p.workers, data_root=ctx.data_root)
            return [(o["mean"], o["precision"]) for o in outcomes]

    plugin = PosteriorMergingPlugin(merge_precision=p.merge_precision, prior_at_init=p.prior_at_init, trained=trained,
                                    seed=ctx.config.seed)
    strategy = ivon_strategy(ctx, plugin)
    if p.workers > 0:
        strategy.train_epochs = 0  # the driver only merges: each experience was trained by its own task
    return strategy


# --- Adam-trained baselines --------------------------------------------------------


@torch.no_grad()
def mean_fisher(strategy) -> Tensor:
    """Diagonal GGN Fisher of the experience's training data at the current weights, averaged per example."""
    data = experience_data(strategy.experience)
    net = unwrap(strategy.model)
    was_training = net.training
    net.eval()
    try:
        total = None
        for x, mask in laplace_batches(strategy, data):
            part = diagonal_ggn(net, x, class_mask=mask)
            total = part if total is None else total + part
    finally:
        net.train(was_training)
    return total / len(data.y)


class WeightMergingPlugin(SupervisedPlugin):
    """Adam from the same start in every experience; after each, the merged weights so far.

    ``rule``: ``average``, ``task_arithmetic`` (``alpha``) or ``fisher`` (``fisher_floor``).
    ``weights`` (and ``fishers``) hold each experience's own result, before merging.
    """

    def __init__(self, *, rule: str, alpha: float = 1.0, fisher_floor: float = 1e-6):
        super().__init__()
        if rule not in WEIGHT_RULES:
            raise ValueError(f"rule must be one of {', '.join(WEIGHT_RULES)}, got {rule!r}")
        self.rule = rule
        self.alpha = alpha
        self.fisher_floor = fisher_floor
        self.initial: Tensor | None = None
        self.weights: list[Tensor] = []
        self.fishers: list[Tensor] = []

    @staticmethod
    def _params(strategy):
        return [p for _, p in trainable_parameters(unwrap(strategy.model))]

    def before_training_exp(self, strategy, **kwargs):
        params = self._params(strategy)
        if self.initial is None:
            self.initial = flat_of(params)
            return
        load_flat(params, self.initial)
        strategy.optimizer.state.clear()  # fresh Adam moments, as at the first experience

    def after_training_exp(self, strategy, **kwargs):
        params = self._params(strategy)
        self.weights.append(flat_of(params))
        if self.rule == "average":
            merged = weight_average(weights=self.weights)
        elif self.rule == "task_arithmetic":
            merged = task_arithmetic(base=self.initial, weights=self.weights, alpha=self.alpha)
        else:
            self.fishers.append(mean_fisher(strategy))
            merged = fisher_weighted_average(weights=self.weights, fishers=self.fishers, floor=self.fisher_floor)
        load_flat(params, merged)


@dataclass
class WeightAverageParams:
    pass


@dataclass
class TaskArithmeticParams:
    alpha: float = 1.0  # scaling of the summed task vectors theta_t - theta_0 (1 / T: the weight average)


@dataclass
class FisherMergeParams:
    fisher_floor: float = 1e-6  # each diagonal Fisher (mean per example) is floored at this


def _adam_merging(ctx: BuildContext, plugin: WeightMergingPlugin):
    return Naive(optimizer=ctx.adam(), plugins=with_plugins(ctx, plugin), **ctx.template_args())


@register("weight-average", WeightAverageParams, "Adam per experience from one start, weights averaged")
def _weight_average(ctx: BuildContext):
    return _adam_merging(ctx, WeightMergingPlugin(rule="average"))


@register("task-arithmetic", TaskArithmeticParams, "Adam per experience from one start, task vectors added")
def _task_arithmetic(ctx: BuildContext):
    return _adam_merging(ctx, WeightMergingPlugin(rule="task_arithmetic", alpha=ctx.params.alpha))


@register("fisher-merge", FisherMergeParams, "Adam per experience from one start, Fisher-weighted average")
def _fisher_merge(ctx: BuildContext):
    return _adam_merging(ctx, WeightMergingPlugin(rule="fisher", fisher_floor=ctx.params.fisher_floor))
