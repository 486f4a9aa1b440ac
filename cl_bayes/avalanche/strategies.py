"""The strategy registry: every strategy the suite can run, built from Avalanche parts.

Each entry is a hyper-parameter dataclass (the keys a spec in ``strategies/``
may set besides the training fields of ``cl_bayes.config.RunConfig``) and a
builder that returns an Avalanche strategy. Baselines are Avalanche's own
``Naive`` template with its own plugins (EWC, SI, LwF, replay, A-GEM, GEM),
or its ``Cumulative`` and ``JointTraining`` strategies; nothing is re-implemented.

``memory_size`` always counts the examples kept *per experience*, so memory
strategies compare at equal memory.

The registry is an explicit dictionary, filled by the ``register`` decorator
below (and by ``cl_bayes.avalanche.bayes_strategies`` and ``fromp_strategies``
for the Bayesian strategies, ``merge_strategies`` for the merging ones): no folder
scanning, nothing happens at import time beyond that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from avalanche.training.plugins import (
    AGEMPlugin,
    EWCPlugin,
    GEMPlugin,
    LwFPlugin,
    ReplayPlugin,
    SupervisedPlugin,
    SynapticIntelligencePlugin,
)
from avalanche.training.supervised import Cumulative, JointTraining, Naive
from torch import nn

from cl_bayes.avalanche.memory import PerExperienceMemory, random_selector
from cl_bayes.config import RunConfig


@dataclass
class BuildContext:
    """What a builder gets: the model, the resolved config, its parameters, extra plugins."""

    model: nn.Module
    config: RunConfig
    params: object  # the strategy's hyper-parameter dataclass instance
    plugins: list[SupervisedPlugin]
    n_experiences: int
    first_experience_size: int  # training examples in experience 0 (IVON's initial ess)
    data_root: str | None = None  # the run's data root (None: $CL_BAYES_DATA or the default), for builders that fork

    def template_args(self) -> dict:
        """Keyword arguments shared by every Avalanche template."""
        return dict(
            model=self.model,
            criterion=nn.CrossEntropyLoss(),
            train_mb_size=self.config.batch_size,
            train_epochs=self.config.epochs,
            eval_mb_size=self.config.eval_batch_size,
            device=self.config.device,
            evaluator=None,  # the runner scores experiences itself (cl_bayes.avalanche.runner)
        )

    def adam(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), lr=self.config.lr)


@dataclass(frozen=True)
class StrategyDef:
    name: str
    params_cls: type
    build: Callable[[BuildContext], object]
    description: str
    joint: bool = False  # trained once on the whole stream (the upper bound)


STRATEGIES: dict[str, StrategyDef] = {}


def register(name: str, params_cls: type, description: str, *, joint: bool = False):
    def decorator(build: Callable[[BuildContext], object]):
        if name in STRATEGIES:
            raise ValueError(f"strategy '{name}' registered twice")
        STRATEGIES[name] = StrategyDef(name, params_cls, build, description, joint)
        return build

    return decorator


def _register_all() -> None:
    """Import the modules whose strategies register themselves here (explicit list, no scanning)."""
    import cl_bayes.avalanche.bayes_strategies  # noqa: F401
    import cl_bayes.avalanche.fromp_strategies  # noqa: F401
    import cl_bayes.avalanche.merge_strategies  # noqa: F401
    import cl_bayes.avalanche.vcl_strategy  # noqa: F401


def get(name: str) -> StrategyDef:
    _register_all()
    if name not in STRATEGIES:
        raise KeyError(f"unknown strategy '{name}' (known: {', '.join(sorted(STRATEGIES))})")
    return STRATEGIES[name]


def names() -> list[str]:
    _register_all()
    return sorted(STRATEGIES)


def with_plugins(ctx: BuildContext, *plugins: SupervisedPlugin) -> list[SupervisedPlugin]:
    return [*plugins, *ctx.plugins]


# --- hyper-parameters ---------------------------------------------------------


@dataclass
class NoParams:
    pass


@dataclass
class SGDParams:
    momentum: float = 0.9  # SGD momentum


@dataclass
class EWCParams:
    ewc_lambda: float = 100.0  # weight of the quadratic (Fisher) penalty


@dataclass
class OnlineEWCParams:
    ewc_lambda: float = 100.0  # weight of the quadratic (Fisher) penalty
    decay_factor: float = 0.9  # decay of the running Fisher (online EWC's gamma)


@dataclass
class SIParams:
    si_lambda: float = 1.0  # weight of the path-integral penalty
    eps: float = 1e-7  # SI's damping term xi


@dataclass
class LwFParams:
    alpha: float = 1.0  # weight of the distillation loss
    temperature: float = 2.0  # softmax temperature of the distillation


@dataclass
class ReplayParams:
    memory_size: int = 200  # examples kept per experience (class-balanced, random)


@dataclass
class AGEMParams:
    memory_size: int = 200  # examples kept per experience
    sample_size: int = 256  # memory examples drawn per step for the reference gradient


@dataclass
class GEMParams:
    memory_size: int = 200  # examples kept per experience
    memory_strength: float = 0.5  # GEM's margin gamma


# --- baselines ----------------------------------------------------------------


@register("naive", NoParams, "Fine-tuning with Adam (lower bound)")
def _naive(ctx: BuildContext):
    return Naive(optimizer=ctx.adam(), plugins=ctx.plugins, **ctx.template_args())


@register("naive-sgd", SGDParams, "Fine-tuning with SGD and momentum")
def _naive_sgd(ctx: BuildContext):
    opt = torch.optim.SGD(ctx.model.parameters(), lr=ctx.config.lr, momentum=ctx.params.momentum)
    return Naive(optimizer=opt, plugins=ctx.plugins, **ctx.template_args())


@register("ewc", EWCParams, "EWC (Kirkpatrick et al., 2017): one Fisher penalty per experience")
def _ewc(ctx: BuildContext):
    plugin = EWCPlugin(ctx.params.ewc_lambda, mode="separate")
    return Naive(optimizer=ctx.adam(), plugins=with_plugins(ctx, plugin), **ctx.template_args())


@register("online-ewc", OnlineEWCParams, "Online EWC (Schwarz et al., 2018): one decayed running Fisher")
def _online_ewc(ctx: BuildContext):
    plugin = EWCPlugin(ctx.params.ewc_lambda, mode="online", decay_factor=ctx.params.decay_factor)
    return Naive(optimizer=ctx.adam(), plugins=with_plugins(ctx, plugin), **ctx.template_args())


class CopyingSynapticIntelligencePlugin(SynapticIntelligencePlugin):
    """Avalanche 0.6's SI plugin with its weight snapshots copied.

    Avalanche snapshots weights with ``param.detach().cpu().flatten()``; on a CPU
    tensor that is a *view* of the live weights. So on CPUs the anchor taken at the
    start of an experience always equals the current weights (the penalty is 0) and
    the weights before an update equal those after it (the path integral is 0): SI
    reduces to fine-tuning. Copying both snapshots, in ``before_training_exp`` and
    ``before_training_iteration``, restores the method; on GPUs ``.cpu()`` copied already.
    """

    def before_training_exp(self, strategy, **kwargs):
        super().before_training_exp(strategy, **kwargs)
        for anchor in self.ewc_data[0].values():
            anchor.data = anchor.data.clone()

    def before_training_iteration(self, strategy, **kwargs):
        super().before_training_iteration(strategy, **kwargs)
        for snapshot in self.syn_data["old_theta"].values():
            snapshot.data = snapshot.data.clone()


@register("si", SIParams, "Synaptic Intelligence (Zenke et al., 2017)")
def _si(ctx: BuildContext):
    plugin = CopyingSynapticIntelligencePlugin(si_lambda=ctx.params.si_lambda, eps=ctx.params.eps)
    return Naive(optimizer=ctx.adam(), plugins=with_plugins(ctx, plugin), **ctx.template_args())


@register("lwf", LwFParams, "Learning without Forgetting (Li & Hoiem, 2017)")
def _lwf(ctx: BuildContext):
    plugin = LwFPlugin(alpha=ctx.params.alpha, temperature=ctx.params.temperature)
    return Naive(optimizer=ctx.adam(), plugins=with_plugins(ctx, plugin), **ctx.template_args())


def replay_plugin(ctx: BuildContext, selector) -> ReplayPlugin:
    """Avalanche's ReplayPlugin over a memory of ``memory_size`` examples per experience."""
    total = ctx.params.memory_size * ctx.n_experiences
    memory = PerExperienceMemory(memory_size=ctx.params.memory_size, total_size=total, selector=selector)
    return ReplayPlugin(mem_size=total, storage_policy=memory)


@register("replay", ReplayParams, "Experience replay from a class-balanced random memory")
def _replay(ctx: BuildContext):
    plugin = replay_plugin(ctx, random_selector(seed=ctx.config.seed))
    return Naive(optimizer=ctx.adam(), plugins=with_plugins(ctx, plugin), **ctx.template_args())


class GuardedAGEMPlugin(AGEMPlugin):
    """Avalanche 0.6's A-GEM with its projection safe against a vanishing reference gradient.

    Hook ``after_backward`` (replaces Avalanche's; the reference gradient is still
    Avalanche's, from ``before_training_iteration``). When ``g . g_ref < 0`` A-GEM
    steps along ``g - (g . g_ref / g_ref . g_ref) g_ref``. Avalanche divides in
    float32: once the memory is fit, ``g_ref . g_ref`` underflows to 0 while
    ``g . g_ref`` does not, and the step is infinite (seen: split-mnist, paper
    protocol, seed 1, a NaN loss in experience 1). Here both dot products are
    float64, and a zero reference gradient leaves ``g`` as it is.

    Pickles (for ``cl_bayes.avalanche.checkpoint``): the memory's iterator, a generator, is left
    out and made again from its data loader, as Avalanche makes it after each experience.
    """

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("buffer_dliter", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.buffer_dliter = iter(self.buffer_dataloader) if self.buffer_dataloader is not None else iter([])

    def after_backward(self, strategy, **kwargs):
        if len(self.buffers) == 0:
            return
        params = list(strategy.model.parameters())
        grad = torch.cat([p.new_zeros(p.numel()) if p.grad is None else p.grad.reshape(-1) for p in params])
        ref = self.reference_gradients.double()
        dot, ref_sq = torch.dot(grad.double(), ref), torch.dot(ref, ref)
        if dot >= 0 or ref_sq == 0:
            return
        projected = (grad.double() - (dot / ref_sq) * ref).to(grad.dtype)
        for p, g in zip(params, projected.split([p.numel() for p in params]), strict=True):
            if p.grad is not None:
                p.grad.copy_(g.view_as(p))


@register("agem", AGEMParams, "A-GEM (Chaudhry et al., 2019)")
def _agem(ctx: BuildContext):
    plugin = GuardedAGEMPlugin(patterns_per_experience=ctx.params.memory_size, sample_size=ctx.params.sample_size)
    return Naive(optimizer=ctx.adam(), plugins=with_plugins(ctx, plugin), **ctx.template_args())


@register("gem", GEMParams, "GEM (Lopez-Paz & Ranzato, 2017); quadratic programs by quadprog")
def _gem(ctx: BuildContext):
    plugin = GEMPlugin(patterns_per_experience=ctx.params.memory_size, memory_strength=ctx.params.memory_strength)
    return Naive(optimizer=ctx.adam(), plugins=with_plugins(ctx, plugin), **ctx.template_args())


@register("cumulative", NoParams, "Retrains on all data seen so far at every experience")
def _cumulative(ctx: BuildContext):
    return Cumulative(optimizer=ctx.adam(), plugins=ctx.plugins, **ctx.template_args())


@register("joint", NoParams, "Joint training on all experiences at once (upper bound)", joint=True)
def _joint(ctx: BuildContext):
    return JointTraining(optimizer=ctx.adam(), plugins=ctx.plugins, **ctx.template_args())


