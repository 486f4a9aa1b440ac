"""Merging separately trained models: natural parameters, weight averages, task arithmetic, Fisher averages.

Every model t = 1..T is trained from the same starting point on its own data. The functions
here combine them element-wise; each takes tensors of one common shape (flat parameter
vectors, or one tensor per parameter: call once per tensor), keyword arguments only.

* ``merge_gaussians``: the posteriors q_t = N(m_t, diag(1 / lambda_t)) were each found
  from the same prior p0 = N(m0, diag(1 / lambda0)). In natural parameters
  (eta1, eta2) = (lambda m, -lambda / 2) Bayes' rule adds the data's terms, and q_t holds
  p0 once, so the posterior of all the data is the product of the q_t divided by the prior
  repeated T - 1 times:

      lambda = lambda0 + sum_t (lambda_t - lambda0),
      lambda m = lambda0 m0 + sum_t (lambda_t m_t - lambda0 m0).

  Exact for conjugate Gaussian models whose posterior precision is diagonal (the tests:
  Bayesian linear regression with orthogonal features per chunk); otherwise the
  diagonal-Gaussian approximation of each q_t is what gets merged (Daheim et al., ICLR 2024).
* ``weight_average``: sum_t c_t theta_t / sum_t c_t (equal c_t by default).
* ``task_arithmetic``: theta0 + alpha * sum_t (theta_t - theta0) (Ilharco et al., ICLR 2023).
* ``fisher_weighted_average``: sum_t F_t theta_t / sum_t F_t with each F_t floored at
  ``floor`` (Matena & Raffel, NeurIPS 2022); the floor makes a weight no model's Fisher
  sees the plain average instead of 0 / 0. With lambda0 = 0 and lambda_t = F_t it is
  ``merge_gaussians``.

Pure torch: no optimizer and no Avalanche here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["fisher_weighted_average", "merge_gaussians", "task_arithmetic", "weight_average"]


def _check_models(name: str, tensors: Sequence[Tensor], shape: torch.Size | None = None) -> torch.Size:
    """At least one tensor, all of one shape (``shape`` when given); returns that shape."""
    if isinstance(tensors, Tensor) or len(tensors) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of tensors")
    expected = tensors[0].shape if shape is None else shape
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
        if t.shape != expected:
            raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}, expected {tuple(expected)}")
    return expected


def _check_nonnegative(name: str, t: Tensor) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite")
    if (t < 0).any():
        raise ValueError(f"{name} must be >= 0")


def _as_like(name: str, value: Tensor | float, like: Tensor) -> Tensor:
    """``value`` as a tensor of ``like``'s shape (a scalar is broadcast); ValueError otherwise."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.dim() == 0:
        return value.expand(like.shape)
    if value.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(like.shape)}")
    return value


def merge_gaussians(
    *,
    means: Sequence[Tensor],
    precisions: Sequence[Tensor],
    prior_mean: Tensor | float,
    prior_precision: Tensor | float,
) -> tuple[Tensor, Tensor]:
    """(mean, precision) of prod_t q_t / p0^(T-1) for diagonal Gaussians q_t = N(means[t], 1 / precisions[t]).

    ``prior_mean`` and ``prior_precision`` (tensors of the models' shape, or scalars) are the
    prior p0 every q_t was found from. Precisions must be >= 0, and the merged precision > 0.
    """
    shape = _check_models("means", means)
    _check_models("precisions", precisions, shape)
    if len(means) != len(precisions):
        raise ValueError(f"got {len(means)} means and {len(precisions)} precisions")
    prior_mean = _as_like("prior_mean", prior_mean, means[0])
    prior_precision = _as_like("prior_precision", prior_precision, means[0])
    _check_nonnegative("prior_precision", prior_precision)
    for i, p in enumerate(precisions):
        _check_nonnegative(f"precisions[{i}]", p)
    prior_eta1 = prior_precision * prior_mean
    precision = prior_precision.clone()
    eta1 = prior_eta1.clone()
    for m, p in zip(means, precisions, strict=True):
        precision += p - prior_precision
        eta1 += p * m - prior_eta1
    if not (precision > 0).all():
        raise ValueError(
            "the merged precision is not positive everywhere (a posterior precision below the prior's: "
            "were the posteriors found from this prior?)"
        )
    return eta1 / precision, precision


def weight_average(*, weights: Sequence[Tensor], coefficients: Sequence[float] | None = None) -> Tensor:
    """sum_t c_t weights[t] / sum_t c_t; equal coefficients when None (the plain average)."""
    _check_models("weights", weights)
    if coefficients is None:
        coefficients = [1.0] * len(weights)
    if len(coefficients) != len(weights):
        raise ValueError(f"got {len(weights)} weights and {len(coefficients)} coefficients")
    if any(not c >= 0 for c in coefficients) or not sum(coefficients) > 0:
        raise ValueError(f"coefficients must be >= 0 with a positive sum, got {list(coefficients)}")
    total = sum(coefficients)
    out = torch.zeros_like(weights[0])
    for w, c in zip(weights, coefficients, strict=True):
        out.add_(w, alpha=c / total)
    return out


def task_arithmetic(*, base: Tensor, weights: Sequence[Tensor], alpha: float) -> Tensor:
    """base + alpha * sum_t (weights[t] - base): the task vectors added to the shared starting point."""
    _check_models("weights", weights, base.shape)
    out = base.clone()
    for w in weights:
        out.add_(w - base, alpha=alpha)
    return out


def fisher_weighted_average(*, weights: Sequence[Tensor], fishers: Sequence[Tensor], floor: float = 1e-8) -> Tensor:
    """sum_t F_t weights[t] / sum_t F_t with F_t = max(fishers[t], floor), element-wise.

    Fishers (diagonal, one per model) must be >= 0; ``floor`` > 0 keeps the denominator away from 0.
    """
    shape = _check_models("weights", weights)
    _check_models("fishers", fishers, shape)
    if len(weights) != len(fishers):
        raise ValueError(f"got {len(weights)} weights and {len(fishers)} fishers")
    if not floor > 0:
        raise ValueError(f"floor must be > 0, got {floor}")
    numerator = torch.zeros_like(weights[0])
    denominator = torch.zeros_like(weights[0])
    for i, (w, f) in enumerate(zip(weights, fishers, strict=True)):
        _check_nonnegative(f"fishers[{i}]", f)
        f = f.clamp_min(floor)
        numerator += f * w
        denominator += f
    return numerator / denominator
