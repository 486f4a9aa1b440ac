"""Functional regularisation of the memorable past (FROMP) with the IVON posterior.

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

from cl_bayes.avalanche.bayes_strategies import IVONParams, IVONPriorParams, ivon_strategy
from cl_bayes.avalanche.fromp_plugin import ESTIMATORS, SELECTIONS, FunctionalRegularisationPlugin
from cl_bayes.avalanche.ivon_strategy import NaturalParameterAccumulation
from cl_bayes.avalanche.strategies import BuildContext, register
from cl_bayes.fromp import KERNEL_FORMS


@dataclass
class FunctionalParams:
    """FROMP's hyper-parameters, shared by ``ivon-fromp`` and ``bayes-cl`` (a mixin)."""

    tau: float = 1e-3  # weight of the functional prior, FROMP's convention (fromp_plugin docstring); specs tune it
    kernel: str = "block"  # FROMP kernel: block (per class, across points), full (per point) or identity (L2)
    eps: float = 1e-3  # jitter added to the kernel's diagonal (FROMP: 1e-5, unstable with IVON's samples)
    memory_size: int = 40  # memorable examples kept per experience (class-balanced)
    selection: str = "sensitivity"  # how they are chosen: sensitivity, lambda (FROMP's), random or herding
    estimator: str = "last_layer"  # sensitivity's variance estimator: last_layer, exact or samples

    def __post_init__(self):
        if not self.tau >= 0:
            raise ValueError(f"tau must be non-negative, got {self.tau}")
        if self.kernel not in KERNEL_FORMS:
            raise ValueError(f"kernel must be one of {', '.join(KERNEL_FORMS)}, got {self.kernel!r}")
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        if self.memory_size < 1:
            raise ValueError(f"memory_size must be >= 1, got {self.memory_size}")
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
    return FunctionalRegularisationPlugin(
        tau=p.tau, memory_size=p.memory_size, kernel=p.kernel, eps=p.eps, selection=p.selection,
        estimator=p.estimator, seed=ctx.config.seed,
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
    return ivon_strategy(ctx, functional_plugin(ctx), NaturalParameterAccumulation(keep_hess=p.keep_hess,
                                                                                   temper=p.temper))
