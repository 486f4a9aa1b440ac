"""Natural-parameter accumulation across experiences (the posterior of t is the prior of t + 1).

IVON's posterior after experience t is q_t = N(m_t, diag(1 / lambda_t)), where

    lambda_t = ess_t * (h_t + delta_t) = ess_t * h_t + prior_precision_t

(``IVON.precision``): delta_t = prior_precision_t / ess_t is the prior precision per
example, h_t the per-example Hessian of the experience's mean loss, so ess_t * h_t is the
data's contribution. In natural parameters (eta1, eta2) = (lambda m, -lambda / 2),
Bayes' rule with Gaussian (or Gaussian-approximated) likelihood terms *adds* natural
parameters, so taking the posterior of t as the prior of t + 1,

    prior_mean_{t+1} = m_t,     prior_precision_{t+1} = lambda_t,

gives after T experiences

    eta_T = eta_0 + sum_{t=1..T} c_t,    c_t = eta(q_t) - eta(prior_t)

(``contribution``): each experience adds its own term, exactly like batch Bayes on the
union of the data when the likelihoods are Gaussian (conjugate linear regression; the test
suite checks this to 1e-6). ``temper`` in (0, inf) multiplies the carried precision, and
so every natural parameter of the new prior: temper < 1 forgets (a tempered posterior),
temper = 1 is plain Bayes.

The data's part. IVON's h starts at ``hess_init`` and moves towards the data's Hessian at
rate 1 - beta2: with beta2 = 0.99999 and 4,690 steps (permuted MNIST, paper protocol) it is
still 95 % hess_init, so ess_t * h_t is mostly ess_t * hess_init, a uniform pull to m_t that
the data never asked for. ``debias_hess`` carries ess_t * ``IVON.data_hess`` instead (h with
its initial value removed, Adam's bias correction): weights the data constrained become
stiff, weights it never touched (never-lit pixels) keep the old prior.

Hessian at the boundary. ``keep_hess=False`` resets h to each group's ``hess_init``, so the
new posterior starts as ess_{t+1} * hess_init + lambda_t: the data of t are counted once,
in the prior. ``keep_hess=True`` keeps h_t as a warm start; until h adapts (with beta2 near
1 that is slow) the precision ess_{t+1} * h_t + lambda_t counts the old data a second time.

``next_ess`` sets the optimizer's ``ess`` for the next experience after the prior is set;
the prior *precision* stays fixed under that change (see ``cl_bayes.ivon``). Pure torch.
"""

from __future__ import annotations

import math

from torch import Tensor

from cl_bayes.ivon import IVON
from cl_bayes.posterior import DiagonalGaussian

__all__ = ["carry_posterior_to_prior", "contribution"]


def carry_posterior_to_prior(
    optimizer: IVON,
    *,
    keep_hess: bool,
    temper: float = 1.0,
    next_ess: float | None = None,
    debias_hess: bool = False,
) -> DiagonalGaussian:
    """End of an experience: prior <- posterior (precision times ``temper``); returns the new prior.

    prior_mean <- m_t, prior_precision <- temper * (ess_t * h_t + prior_precision_t); then
    h <- hess_init unless ``keep_hess``; then ess <- ``next_ess`` if given. With
    ``debias_hess`` the data's part uses ``IVON.data_hess`` (h without what is left of its
    initial value) in place of h_t. Call it after the last ``step()`` of the experience,
    outside ``sampled_params``.
    """
    for name, value in (("temper", temper), ("next_ess", 1.0 if next_ess is None else next_ess)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    posterior = optimizer.posterior
    precision = posterior.precision
    if debias_hess:
        precision = optimizer.data_hess.mul_(optimizer.ess).add_(optimizer.prior_precision)
    if not keep_hess:  # first: h may be negative where delta is large, and the new delta is larger still
        optimizer.reset_hess()
    optimizer.set_prior(mean=posterior.mean, precision=temper * precision)
    if next_ess is not None:
        optimizer.ess = next_ess
    return optimizer.prior


def contribution(posterior: DiagonalGaussian, prior: DiagonalGaussian) -> tuple[Tensor, Tensor]:
    """c = eta(posterior) - eta(prior): what an experience's data added, in natural parameters."""
    post1, post2 = posterior.natural_parameters
    prior1, prior2 = prior.natural_parameters
    return post1 - prior1, post2 - prior2
