"""The Bayesian strategies, registered in ``cl_bayes.avalanche.strategies``.

* ``ivon``: IVON in place of Adam, nothing else (posterior kept across experiences,
  Bayesian model averaging at test time).
* ``ivon-prior``: IVON with natural-parameter accumulation: the posterior after each
  experience is the next experience's prior (the VCL-like method).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cl_bayes.avalanche.ivon_strategy import IVONStrategy, NaturalParameterAccumulation
from cl_bayes.avalanche.strategies import BuildContext, register, with_plugins
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


@dataclass
class IVONPriorParams(IVONParams):
    keep_hess: bool = False  # keep h at experience boundaries (else reset to hess_init)
    temper: float = 1.0  # multiplies the carried prior precision


def ivon_strategy(ctx: BuildContext, *plugins) -> IVONStrategy:
    """An IVONStrategy for ``ctx``; the optimizer is built last, on the model's device."""
    p = ctx.params
    model = ctx.model.to(ctx.config.device)
    first_ess = p.ess or ctx.first_experience_size
    clip_radius = math.inf if p.clip_radius is None else p.clip_radius
    optimizer = IVON(
        model.parameters(), lr=ctx.config.lr, ess=first_ess, hess_init=p.hess_init, beta1=p.beta1,
        beta2=p.beta2, weight_decay=p.weight_decay, mc_samples=p.mc_samples, clip_radius=clip_radius,
    )
    return IVONStrategy(
        optimizer=optimizer, mc_samples=p.mc_samples, test_samples=p.test_samples, ess=p.ess,
        plugins=with_plugins(ctx, *plugins), **ctx.template_args(),
    )


@register("ivon", IVONParams, "IVON (Shen et al., 2024) in place of Adam, BMA at test time")
def _ivon(ctx: BuildContext):
    return ivon_strategy(ctx)


@register("ivon-prior", IVONPriorParams, "IVON with natural-parameter accumulation (posterior -> next prior)")
def _ivon_prior(ctx: BuildContext):
    return ivon_strategy(ctx, NaturalParameterAccumulation(keep_hess=ctx.params.keep_hess, temper=ctx.params.temper))
