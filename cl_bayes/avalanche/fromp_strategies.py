"""Functional regularisation of the memorable past (FROMP): as published, and with the IVON posterior.

* ``fromp``: FROMP as published (Pan et al., NeurIPS 2020): Adam on the data loss plus
  the functional term; after each experience the diagonal Laplace-GGN posterior
  (``cl_bayes.laplace``: GGN summed over every experience's training data so far, plus
  ``prior_precision``), ``memory_size`` memorable points per experience chosen by the
  largest trace of the softmax Hessian (``lambda``, class-balanced), and the term of
  every past task re-anchored at the latest posterior (``anchor="latest"``). The
  gradient's norm is clipped to ``max_grad_norm`` (FROMP's code clips its gradient,
  whose data part is divided by tau, at ``grad_clip_norm``: on our scale that is
  ``max_grad_norm = tau * grad_clip_norm``; hook ``after_backward``).
* ``frorp``: the paper's ablation, the same with a class-balanced random memory.
* ``ivon-fromp``: IVON (as ``ivon``) + ``FunctionalRegularisationPlugin``: after each
  experience ``memory_size`` examples are chosen by memory-perturbation sensitivity
  under the IVON posterior, and FROMP's functional prior over them, with the kernel
  ``J Sigma J^T`` from that posterior, is added to the loss of every later step
  (Pan et al., 2020, with IVON's posterior in place of the Laplace-GGN one).
* ``bayes-cl``: the same, plus natural-parameter accumulation (as ``ivon-prior``): each
  experience's posterior is also the next one's weight-space prior. The functional
  plugin runs first at the end of an experience, so its kernel uses the posterior
  of the experience, before accumulation resets the Hessian.

The plugin, the tau convention and the selections are documented in
``cl_bayes.avalanche.fromp_plugin``; the maths in ``cl_bayes.fromp``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from avalanche.training.plugins import SupervisedPlugin
from avalanche.training.supervised import Naive

from cl_bayes.avalanche.bayes_strategies import IVONParams, IVONPriorParams, ivon_strategy
from cl_bayes.avalanche.fromp_plugin import (
    ANCHORS,
    BLOCK_ESTIMATORS,
    ESTIMATORS,
    SELECTIONS,
    TERM_AT,
    FunctionalRegularisationPlugin,
)
from cl_bayes.avalanche.ivon_strategy import NaturalParameterAccumulation
from cl_bayes.avalanche.strategies import BuildContext, register, with_plugins
from cl_bayes.fromp import KERNEL_FORMS, check_positive_int
from cl_bayes.laplace import DiagonalLaplace


def _check_term(p) -> None:
    """The functional term's settings shared by every FROMP variant (tau, kernel, eps, memory_size)."""
    if not p.tau >= 0:
        raise ValueError(f"tau must be non-negative, got {p.tau}")
    if p.kernel not in KERNEL_FORMS:
        raise ValueError(f"kernel must be one of {', '.join(KERNEL_FORMS)}, got {p.kernel!r}")
    if not p.eps > 0:
        raise ValueError(f"eps must be positive, got {p.eps}")
    if p.memory_size < 1:
        raise ValueError(f"memory_size must be >= 1, got {p.memory_size}")


@dataclass
class FunctionalParams:
    """FROMP's hyper-parameters, shared by ``ivon-fromp`` and ``bayes-cl`` (a mixin)."""

    tau: float = 1e-3  # weight of the functional prior, FROMP's convention (fromp_plugin docstring); specs tune it
    kernel: str = "block"  # FROMP kernel: block (per class, across points), full (per point) or identity (L2)
    eps: float = 1e-3  # jitter added to the kernel's diagonal (FROMP: 1e-5, unstable with IVON's samples)
    memory_size: int = 40  # memorable examples kept per experience (class-balanced)
    selection: str = "sensitivity"  # how they are chosen: sensitivity, lambda (FROMP's), random or herding
    estimator: str = "last_layer"  # sensitivity's variance estimator: last_layer, exact or samples
    posterior: str = "ivon"  # the kernel's covariance: ivon (the optimizer's) or laplace (FROMP's Laplace-GGN)
    prior_precision: float = 1e-3  # posterior = "laplace": delta of Sigma^-1 = delta + sum GGN
    anchor: str = "experience"  # experience: each task keeps its own posterior; latest: re-anchor (FROMP)
    term_at: str = "mean"  # evaluate the term at the posterior mean, or at the sampled network (docs/BISECTION.md)
    term_curvature: bool = True  # the term's Hessian at its anchors joins IVON's preconditioner (term_at mean)
    stiffness_margin: float | None = 4.0  # scale that curvature until the term's stiffest mode is this far from the
    # momentum's stability bound (cl_bayes.fromp.stable_curvature_scale; None: never scale)
    stiffness_guard: float | None = 0.5  # within an experience, raise that scale when a step's secant stiffness
    # exceeds this fraction of the bound (the term's Hessian at the current weights; None: never)
    block_size: int | None = None  # split each experience's memory into kernel blocks of this many points (None: one)
    blocks_per_step: int | None = None  # blocks per step (None: exact; sampled holds split, not permuted: BISECTION 8)
    per_experience: bool = True  # blocks_per_step of *each* past experience's blocks per step (stratified draw)
    block_estimator: str = "scaled"  # the sampled gradient: scaled (drawn blocks, weighted) or saga (collapsed)
    refresh_every: int | None = None  # exact term every k steps, its diagonal quadratic model between (None: each)

    def __post_init__(self):
        if self.block_estimator not in BLOCK_ESTIMATORS:
            raise ValueError(
                f"block_estimator must be one of {', '.join(BLOCK_ESTIMATORS)}, got {self.block_estimator!r}"
            )
        for name in ("block_size", "blocks_per_step"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        if not isinstance(self.per_experience, bool):
            raise ValueError(f"per_experience must be true or false, got {self.per_experience!r}")
        if self.stiffness_guard is not None and not 0.0 < self.stiffness_guard <= 1.0:
            raise ValueError(f"stiffness_guard must be in (0, 1] or null, got {self.stiffness_guard!r}")
        if not isinstance(self.term_curvature, bool):
            raise ValueError(f"term_curvature must be true or false, got {self.term_curvature!r}")
        if self.posterior not in ("ivon", "laplace"):
            raise ValueError(f"posterior must be ivon or laplace, got {self.posterior!r}")
        if not self.prior_precision > 0:
            raise ValueError(f"prior_precision must be positive, got {self.prior_precision}")
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {', '.join(ANCHORS)}, got {self.anchor!r}")
        if self.term_at not in TERM_AT:
            raise ValueError(f"term_at must be one of {', '.join(TERM_AT)}, got {self.term_at!r}")
        _check_term(self)
        if self.refresh_every is not None and (isinstance(self.refresh_every, bool) or self.refresh_every < 1):
            raise ValueError(f"refresh_every must be a positive int or null, got {self.refresh_every!r}")
        if self.refresh_every is not None and self.blocks_per_step is not None:
            raise ValueError("refresh_every and blocks_per_step are two ways to cheapen the term: set one")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")


@dataclass
class IVONFROMPParams(FunctionalParams, IVONParams):
    pass


@dataclass
class BayesCLParams(FunctionalParams, IVONPriorParams):
    pass


def functional_plugin(ctx: BuildContext) -> FunctionalRegularisationPlugin:
    p = ctx.params
    laplace = DiagonalLaplace(prior_precision=p.prior_precision) if p.posterior == "laplace" else None
    return FunctionalRegularisationPlugin(
        tau=p.tau, memory_size=p.memory_size, kernel=p.kernel, eps=p.eps, selection=p.selection,
        estimator=p.estimator, seed=ctx.config.seed, laplace=laplace, anchor=p.anchor, term_at=p.term_at,
        term_curvature=p.term_curvature, stiffness_margin=p.stiffness_margin, stiffness_guard=p.stiffness_guard,
        block_size=p.block_size,
        blocks_per_step=p.blocks_per_step, per_experience=p.per_experience, block_estimator=p.block_estimator,
        refresh_every=p.refresh_every,
    )


@register("ivon-fromp", IVONFROMPParams, "IVON + FROMP's functional prior over a sensitivity-chosen memory")
def _ivon_fromp(ctx: BuildContext):
    return ivon_strategy(ctx, functional_plugin(ctx))


@register(
    "bayes-cl", BayesCLParams,
    "IVON + natural-parameter accumulation + FROMP's functional prior over a sensitivity-chosen memory",
)
def _bayes_cl(ctx: BuildContext):
    p = ctx.params
    # Order matters: the functional plugin reads the experience's posterior before accumulation changes it.
    accumulation = NaturalParameterAccumulation(keep_hess=p.keep_hess, temper=p.temper, debias_hess=p.debias_hess)
    return ivon_strategy(ctx, functional_plugin(ctx), accumulation)


# --- FROMP as published: Adam + Laplace ------------------------------------------


@dataclass
class FROMPParams:
    """FROMP's hyper-parameters as in the paper and its code (values per benchmark in the specs)."""

    tau: float = 10.0  # weight of the functional term, FROMP's convention (fromp_plugin docstring)
    kernel: str = "block"  # FROMP kernel: block (per class, across points), full (per point) or identity (L2)
    eps: float = 1e-5  # jitter added to the kernel's diagonal (FROMP's)
    memory_size: int = 40  # memorable examples kept per experience (class-balanced)
    selection: str = "lambda"  # how they are chosen: lambda (FROMP), random (FRORP), sensitivity needs IVON
    prior_precision: float = 1e-3  # delta of the Laplace posterior, Sigma^-1 = delta + sum GGN
    max_grad_norm: float | None = 1.0  # clip the gradient's norm (tau * FROMP's grad_clip_norm); None: no clipping
    anchor: str = "latest"  # latest: re-anchor past tasks at the latest posterior (FROMP); experience: keep

    def __post_init__(self):
        _check_term(self)
        if self.selection not in ("lambda", "random", "herding"):
            raise ValueError(f"selection must be lambda, random or herding with Adam, got {self.selection!r}")
        if not self.prior_precision > 0:
            raise ValueError(f"prior_precision must be positive, got {self.prior_precision}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or null, got {self.max_grad_norm}")
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {', '.join(ANCHORS)}, got {self.anchor!r}")


@dataclass
class FRORPParams(FROMPParams):
    selection: str = "random"  # FRORP: class-balanced random memorable points


class GradientNormClipping(SupervisedPlugin):
    """Hook ``after_backward``: scale the gradient so its global norm is at most ``max_norm``."""

    def __init__(self, max_norm: float):
        super().__init__()
        if not max_norm > 0:
            raise ValueError(f"max_norm must be positive, got {max_norm}")
        self.max_norm = float(max_norm)

    def after_backward(self, strategy, **kwargs):
        torch.nn.utils.clip_grad_norm_(strategy.model.parameters(), self.max_norm)


def _fromp(ctx: BuildContext):
    p = ctx.params
    fromp = FunctionalRegularisationPlugin(
        tau=p.tau, memory_size=p.memory_size, kernel=p.kernel, eps=p.eps, selection=p.selection,
        seed=ctx.config.seed, laplace=DiagonalLaplace(prior_precision=p.prior_precision), anchor=p.anchor,
    )
    # Order: the term joins the loss in before_backward; clipping acts on the full gradient after it.
    plugins = [fromp] if p.max_grad_norm is None else [fromp, GradientNormClipping(p.max_grad_norm)]
    return Naive(optimizer=ctx.adam(), plugins=with_plugins(ctx, *plugins), **ctx.template_args())


register("fromp", FROMPParams, "FROMP as published (Pan et al., 2020): Adam + Laplace-GGN kernel, lambda memory")(
    _fromp
)
register("frorp", FRORPParams, "FRORP: FROMP with a class-balanced random memory (the paper's ablation)")(_fromp)
