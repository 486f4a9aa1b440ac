"""VCL: variational continual learning with a mean-field Gaussian posterior.

Nguyen, Li, Bui & Turner (ICLR 2018), "Variational Continual Learning".
Implemented from the paper's equations; pure torch, no Avalanche here (the glue
is ``cl_bayes.avalanche.vcl_strategy``).

The approximate posterior over the flat trainable-parameter vector ``w`` (the
order of ``cl_bayes.jacobians.trainable_parameters``) is a mean-field Gaussian

    q(w) = N(w; mu, diag(sigma^2)),   sigma = exp(log_std),

trained by Bayes by Backprop: a sample is the reparametrised

    w = mu + sigma * eps,   eps ~ N(0, I),

so Monte-Carlo estimates of E_q[.] are differentiable in (mu, log_std).

Experience t, with training set D_t of N_t examples, starts from the prior
q_{t-1} (for t = 1, p(w) = N(0, prior_var I)) and maximises the ELBO

    L_t(q) = sum_{n in D_t} E_q[log p(y_n | w, x_n)] - KL(q || q_{t-1}).

We minimise it in *mean form* (the negative ELBO divided by N_t), as in
mini-batch training with a batch B:

    l_t(q) = 1/|B| sum_{n in B} 1/S sum_{s=1..S} -log p(y_n | w_s, x_n)
             + KL(q || q_{t-1}) / N_t,              w_s = mu + sigma * eps_s,

an unbiased estimate of -L_t(q) / N_t (S = ``mc_samples``). The posterior of
experience t, frozen, is the prior of experience t + 1:
q_t ~= p(w | D_1..D_t) is obtained from q_{t-1} and D_t alone.

KL between diagonal Gaussians, in closed form (summed over parameters):

    KL(N(m_q, v_q) || N(m_p, v_p)) = 1/2 sum_i [ log(v_p,i / v_q,i) + (v_q,i + (m_q,i - m_p,i)^2) / v_p,i - 1 ].

Coreset VCL (the paper's Algorithm 1): before experience t a coreset C_t is
taken from D_t (here class-balanced at random); the *propagated* posterior

    q~_t = argmin_q KL(q || q~_{t-1} p(D_t \\ C_t | w) / Z)

is trained on D_t without C_t with prior q~_{t-1}, and is what the next
experience starts from. Only for prediction, q_t is q~_t refined on the union of
all coresets, C_1 u ... u C_t, with q~_t as its prior.

Prediction is the Monte-Carlo Bayesian model average
``p(y | x) ~= 1/K sum_k softmax(f(w_k, x))``, w_k ~ q.

Mean-field caveat (what the linear-regression test shows): for a linear model
with Gaussian likelihood the exact posterior is Gaussian with precision
``Lambda = Lambda_0 + X^T X / s^2``, and the mean-field optimum has the exact
mean and variances ``1 / diag(Lambda)``. Propagating that diagonal Gaussian as
the next prior drops the off-diagonal part of ``X_1^T X_1``, so sequential VCL
equals the joint (mean-field) posterior only when each chunk's ``X_k^T X_k`` is
diagonal (independent features); otherwise the correlations are lost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cl_bayes.posterior import DiagonalGaussian


def gaussian_kl(q_mean: Tensor, q_var: Tensor, p_mean: Tensor, p_var: Tensor, *, reduce: bool = True) -> Tensor:
    """KL(N(q_mean, diag q_var) || N(p_mean, diag p_var)), summed (or per entry with ``reduce=False``)."""
    per_entry = 0.5 * (torch.log(p_var) - torch.log(q_var) + (q_var + (q_mean - p_mean).square()) / p_var - 1.0)
    return per_entry.sum() if reduce else per_entry


def gaussian_kl_log_std(q_mean: Tensor, q_log_std: Tensor, p_mean: Tensor, p_var: Tensor) -> Tensor:
    """The same KL, summed, per entry, with q given by its log standard deviation (exact for tiny variances)."""
    q_var = torch.exp(2.0 * q_log_std)
    return 0.5 * (torch.log(p_var) - 2.0 * q_log_std + (q_var + (q_mean - p_mean).square()) / p_var - 1.0)


def isotropic_prior(num: int, prior_var: float, *, like: Tensor) -> DiagonalGaussian:
    """VCL's first prior N(0, prior_var I) over ``num`` parameters."""
    if not prior_var > 0:
        raise ValueError(f"prior_var must be positive, got {prior_var}")
    return DiagonalGaussian(mean=like.new_zeros(num), precision=like.new_full((num,), 1.0 / prior_var))


def sample_weights(mean: Tensor, log_std: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """One reparametrised sample ``mean + exp(log_std) * eps`` (differentiable in both)."""
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return mean + torch.exp(log_std) * eps


def vcl_objective(nll: Tensor, kl: Tensor, n_data: int) -> Tensor:
    """The negative ELBO in mean form: mean NLL over the batch (and samples) + KL / N_t."""
    if n_data < 1:
        raise ValueError(f"n_data must be >= 1, got {n_data}")
    return nll + kl / n_data


@dataclass
class MeanFieldGaussian:
    """q(w) = N(mean, diag(exp(log_std)^2)): the trainable variational posterior.

    ``mean`` and ``log_std`` are flat tensors of the same shape; in training they
    require grad. ``frozen()`` returns a detached ``DiagonalGaussian`` (a prior).
    """

    mean: Tensor
    log_std: Tensor

    def __post_init__(self) -> None:
        if self.mean.shape != self.log_std.shape or self.mean.ndim != 1:
            raise ValueError(
                f"mean and log_std must be flat and of the same shape, got "
                f"{tuple(self.mean.shape)} and {tuple(self.log_std.shape)}"
            )

    @classmethod
    def initial(cls, mean: Tensor, init_std: float) -> MeanFieldGaussian:
        """A posterior at ``mean`` with every standard deviation ``init_std``."""
        if not init_std > 0:
            raise ValueError(f"init_std must be positive, got {init_std}")
        return cls(mean=mean, log_std=torch.full_like(mean, math.log(init_std)))

    @property
    def std(self) -> Tensor:
        return torch.exp(self.log_std)

    @property
    def variance(self) -> Tensor:
        return torch.exp(2.0 * self.log_std)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        return sample_weights(self.mean, self.log_std, generator=generator)

    def kl(self, prior: DiagonalGaussian, mask: Tensor | None = None) -> Tensor:
        """KL(q || prior), summed over the parameters (only those where ``mask`` is True)."""
        per_entry = gaussian_kl_log_std(self.mean, self.log_std, prior.mean, prior.variance)
        return per_entry.sum() if mask is None else per_entry[mask].sum()

    def frozen(self) -> DiagonalGaussian:
        """A detached copy as a ``DiagonalGaussian`` (precision = exp(-2 log_std))."""
        return DiagonalGaussian(mean=self.mean.detach().clone(), precision=torch.exp(-2.0 * self.log_std.detach()))
