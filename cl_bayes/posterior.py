"""Diagonal Gaussian posteriors over a flat parameter vector, in natural form.

A diagonal Gaussian N(mean, diag(1 / precision)) has natural parameters

    eta1 = precision * mean          (precision-weighted mean)
    eta2 = -precision / 2

and natural parameters *add* under Bayes' rule with conjugate (Gaussian)
likelihood terms. That is what makes continual learning with a variational
posterior simple: the posterior after experience t is the prior of t + 1
(VCL; the Bayesian learning rule), so after T experiences

    lambda_T = lambda_0 + sum_t contribution_t.

This module is pure torch: no optimizer and no Avalanche here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class DiagonalGaussian:
    """N(mean, diag(1 / precision)) over a flat parameter vector."""

    mean: Tensor  # flat, one entry per parameter
    precision: Tensor  # flat, same shape as mean, strictly positive

    def __post_init__(self) -> None:
        if self.mean.shape != self.precision.shape:
            raise ValueError(
                f"mean and precision must have the same shape, got "
                f"{tuple(self.mean.shape)} and {tuple(self.precision.shape)}"
            )

    @property
    def variance(self) -> Tensor:
        return self.precision.reciprocal()

    @property
    def std(self) -> Tensor:
        return self.precision.rsqrt()

    @property
    def natural_parameters(self) -> tuple[Tensor, Tensor]:
        """(eta1, eta2) = (precision * mean, -precision / 2)."""
        return self.precision * self.mean, -0.5 * self.precision

    @classmethod
    def from_natural(cls, eta1: Tensor, eta2: Tensor) -> DiagonalGaussian:
        precision = -2.0 * eta2
        return cls(mean=eta1 / precision, precision=precision)

    def multiply(self, other: DiagonalGaussian) -> DiagonalGaussian:
        """Product of two Gaussians (up to normalisation): natural parameters add."""
        a1, a2 = self.natural_parameters
        b1, b2 = other.natural_parameters
        return DiagonalGaussian.from_natural(a1 + b1, a2 + b2)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(
            self.mean.shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device
        )
        return self.mean + noise * self.std

    def detach(self) -> DiagonalGaussian:
        return DiagonalGaussian(self.mean.detach().clone(), self.precision.detach().clone())
