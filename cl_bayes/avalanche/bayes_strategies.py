"""The Bayesian strategies, registered in ``cl_bayes.avalanche.strategies``.

* ``ivon``: IVON in place of Adam, nothing else (posterior kept across experiences,
  Bayesian model averaging at test time).
* ``ivon-prior``: IVON with natural-parameter accumulation: the posterior after each
  experience is the next experience's prior (the VCL-like method).
* ``ivon-replay``: IVON with Avalanche's ReplayPlugin over a ``PerExperienceMemory``
  whose examples are chosen at the end of each experience by ``selection``
  (``cl_bayes.avalanche.memory``): iCaRL herding by default, the best rule on the
  validation split (issue 13; no memory-perturbation sensitivity rule beat random
  there); optional natural-parameter accumulation (``accumulate``).
* ``ivon-replay-sensitivity``, ``ivon-replay-lambda``, ``ivon-replay-random``, ...: the
  same strategy and builder with another ``selection`` (top-k sensitivity, FROMP's
  lambda, uniform, the coverage-keeping sensitivity rules): equal memory, only the
  choice differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, make_dataclass

from cl_bayes.avalanche.ivon_strategy import IVONStrategy, NaturalParameterAccumulation
from cl_bayes.avalanche.memory import SELECTIONS, make_selector
from cl_bayes.avalanche.strategies import BuildContext, register, replay_plugin, with_plugins
from cl_bayes.ivon import IVON


@dataclass
class IVONParams:
    ess: float | None = None  # effective sample size; None: each experience's training-set size
    hess_init: float = 0.1  # initial Hessian estimate h0
    beta1: float = 0.9  # momentum of the gradient
    beta2: float = 0.99999  # momentum of the Hessian estimate
    weight_decay: float = 1e-4  # delta at the start: initial prior precision = ess * weight_decay
    clip_radius: float | None = None  # element-wise clipping of the update (None: no clipping)
    mc_samples: int = 1  # posterior samples per training step
    test_samples: int = 10  # posterior samples for the Bayesian model average (0: predict at the mean)
    lr_schedule: str = "constant"  # within each experience: constant or cosine (to 0; cl_bayes.schedules)
    skip_zero_grad: bool = False  # h keeps its value where the batch's gradient is exactly 0 (no curvature seen)
    antithetic: bool = False  # noise in pairs z, -z: half the Gaussian draws (changes the results)
    fused: bool = False  # the update compiled into one loop (cl_bayes.ivon_fused; seconds to compile per run)


@dataclass
class IVONPriorParams(IVONParams):
    keep_hess: bool = False  # keep h at experience boundaries (else reset to hess_init)
    temper: float = 1.0  # multiplies the carried prior precision
    debias_hess: bool = False  # carry the data's Hessian without what is left of hess_init (cl_bayes.natural)


@dataclass
class IVONReplayParams(IVONParams):
    memory_size: int = 200  # examples kept per experience (class-balanced)
    selection: str = "herding"  # how they are chosen: one of cl_bayes.avalanche.memory.SELECTIONS
    estimator: str = "last_layer"  # sensitivity's variance estimator: last_layer, exact or samples
    candidates: int | None = None  # sensitivity/lambda: score a random pool of candidates * memory_size (None: all)
    accumulate: bool = False  # natural-parameter accumulation (posterior -> next prior) as in ivon-prior
    keep_hess: bool = False  # with accumulate: keep h at experience boundaries (else reset to hess_init)
    temper: float = 1.0  # with accumulate: multiplies the carried prior precision
    debias_hess: bool = False  # with accumulate: carry the data's Hessian without what is left of hess_init

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.estimator not in ("last_layer", "exact", "samples"):
            raise ValueError(f"estimator must be last_layer, exact or samples, got {self.estimator!r}")
        if self.candidates is not None and self.candidates < 1:
            raise ValueError(f"candidates must be >= 1 or null, got {self.candidates}")


def ivon_strategy(ctx: BuildContext, *plugins) -> IVONStrategy:
    """An IVONStrategy for ``ctx``; the optimizer is built last, on the model's device."""
    p = ctx.params
    model = ctx.model.to(ctx.config.device)
    first_ess = p.ess or ctx.first_experience_size
    clip_radius = math.inf if p.clip_radius is None else p.clip_radius
    optimizer = IVON(
        model.parameters(), lr=ctx.config.lr, ess=first_ess, hess_init=p.hess_init, beta1=p.beta1,
        beta2=p.beta2, weight_decay=p.weight_decay, mc_samples=p.mc_samples, clip_radius=clip_radius,
        skip_zero_grad=p.skip_zero_grad, antithetic=p.antithetic, fused=p.fused,
    )
    return IVONStrategy(
        optimizer=optimizer, mc_samples=p.mc_samples, test_samples=p.test_samples, ess=p.ess,
        lr_schedule=p.lr_schedule,
        plugins=with_plugins(ctx, *plugins), **ctx.template_args(),
    )


@register("ivon", IVONParams, "IVON (Shen et al., 2024) in place of Adam, BMA at test time")
def _ivon(ctx: BuildContext):
    return ivon_strategy(ctx)


@register("ivon-prior", IVONPriorParams, "IVON with natural-parameter accumulation (posterior -> next prior)")
def _ivon_prior(ctx: BuildContext):
    return ivon_strategy(ctx, NaturalParameterAccumulation(
        keep_hess=ctx.params.keep_hess, temper=ctx.params.temper, debias_hess=ctx.params.debias_hess))


def _ivon_replay(ctx: BuildContext):
    """IVON + ReplayPlugin over a per-experience memory chosen by ``ctx.params.selection``.

    Plugin order matters: the replay plugin's ``after_training_exp`` (the selection, which
    reads the posterior) runs before natural-parameter accumulation changes the posterior.
    """
    p = ctx.params
    selector = make_selector(p.selection, seed=ctx.config.seed, estimator=p.estimator, candidates=p.candidates)
    plugins = [replay_plugin(ctx, selector)]
    if p.accumulate:
        plugins.append(NaturalParameterAccumulation(keep_hess=p.keep_hess, temper=p.temper, debias_hess=p.debias_hess))
    return ivon_strategy(ctx, *plugins)


register(
    "ivon-replay", IVONReplayParams, "IVON + replay, memory by iCaRL herding (the best rule on validation)"
)(_ivon_replay)

_ABLATIONS = {
    "sensitivity": "IVON + replay, top-k memory-perturbation sensitivity (MPE); ivon-replay's ablation",
    "lambda": "IVON + replay, memory by FROMP's lambda (softmax-Hessian trace); ivon-replay's ablation",
    "random": "IVON + replay, class-balanced random memory; ivon-replay's ablation",
    "stratified": "IVON + replay, one random example per sensitivity-quantile bin of a class; ivon-replay's ablation",
    "proportional": "IVON + replay, drawn with probability proportional to sensitivity^T; ivon-replay's ablation",
    "trimmed": "IVON + replay, top sensitivity after discarding each class's top q; ivon-replay's ablation",
    "pruned": "IVON + replay, random after discarding each class's top-q sensitivity; ivon-replay's ablation",
}
for _selection, _description in _ABLATIONS.items():
    # The same parameters with another default ``selection``: the spec may still set any field.
    _params = make_dataclass(
        f"IVONReplay{_selection.title()}Params",
        [("selection", str, field(default=_selection))],
        bases=(IVONReplayParams,),
    )
    register(f"ivon-replay-{_selection}", _params, _description)(_ivon_replay)
