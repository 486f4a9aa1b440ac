r"""Memory-perturbation equation: sensitivity of a model to its training examples.

Nickl, Xu, Tailor, Moellenhoff & Khan (NeurIPS 2023), "The Memory-Perturbation
Equation: Understanding Model's Sensitivity to Data".

Setting. A Gaussian posterior ``q = N(m, Sigma)`` over the flat parameters
(``DiagonalGaussian``; our IVON optimizer's ``optimizer.posterior``) fitted to

    L(w) = sum_j  omega * l_j(w)  +  prior(w),      l_j = -log softmax(f(w, x_j))_{y_j}

where ``omega`` is the weight of one example's log-likelihood in the posterior:
1 for a Bayes/Laplace posterior, ``ess / n_train`` for IVON (which targets
``exp(-ess * mean loss)``).  Per example, at the posterior mean, with logits
``f = f(m, x)`` and Jacobian ``J = df/dw`` (C x P):

    e   = softmax(f) - onehot(y)                 prediction error       (C,)
    Lam = diag(p) - p p^T,  lam = p - p^2        softmax Hessian, its diagonal
    v   = diag(J Sigma J^T)                      per-class prediction variance

Natural parameters of a Gaussian add over examples (``posterior.py``): the
posterior is the prior times one Gaussian "site" per example, and the GLM
(linearised network) site of example j has natural parameters

    lambda_j = ( omega (H_j m - g_j),  -omega H_j / 2 ),   g_j = J_j^T e_j,  H_j = J_j^T Lam_j J_j.

MPE: removing a set G of examples subtracts their sites,
``lambda^{\G} = lambda - sum_{j in G} lambda_j``. With the diagonal of ``H_j``
(a diagonal posterior has diagonal sites), writing ``s = precision``,

    s^{\G} = s - omega sum_G diag(H_j)
    m^{\G} = (s m - omega sum_G (diag(H_j) m - g_j)) / s^{\G}
           = m + omega (s^{\G})^{-1} sum_G g_j                              (1)

which is exactly one (diagonal) Newton step on the loss without G from m,
since the full gradient vanishes at m (for a variational posterior E_q[grad]
vanishes; evaluating J, e, Lam at the mean is the usual delta approximation,
and an approximate precision is floored, see ``whatif_remove``). Held-out predictions follow from the
network at ``m^{\G}`` or its linearisation ``f(m) + J_* (m^{\G} - m)`` (a JVP).

Leave-one-out (G = {i}), to first order (``Sigma^{\i} ~ Sigma``), at x_i itself:

    f(m^{\i}, x_i) - f(m, x_i) ~ omega J_i Sigma J_i^T e_i ~ omega v_i * e_i   (2)

so ``f + omega v * e`` estimates the leave-one-out logits, and the paper's
sensitivity of example i is ``S_i = sum_c |e_ic lam_ic v_ic|`` (large error,
large curvature, large uncertainty = removing it moves the model most).

Estimators of ``v`` (N examples, C classes, P parameters, D penultimate
features, F = cost of a forward pass of one example; timings: a 784-256-256-10
MLP (P = 270k), N = 256, float32, one CPU thread):

* ``exact``: per-example Jacobians, O(N C F) time + O(N C P) flops, memory of
  one chunk of Jacobians. Measured ~1.2 s.
* ``last_layer``: only the last ``nn.Linear`` (weight W, bias b) is uncertain;
  its Jacobian is closed form, df_c/dW_cd = h_d, so
  ``v_c = sum_d Var(W_cd) h_d^2 + Var(b_c)``: one forward pass, O(N C D).
  Measured ~2 ms. Exact for a linear model; an underestimate otherwise.
* ``samples``: ``v_c = Var_{w ~ q} f_c(w, x)`` over S posterior samples: S
  forward passes, O(S N F), Monte-Carlo error ~ v sqrt(2 / S); it is the
  predictive spread, which equals diag(J Sigma J^T) only for a linear model. Measured ~0.15 s
  for S = 64.

``whatif_remove`` costs one Jacobian pass over the group (O(|G| C F) +
O(|G| C P) for the GGN diagonal) and one JVP over the held-out set: ~1.2 s for
|G| = 256 on the MLP above.

With a ``class_mask`` (task-incremental) e, lam, v and softmax are over the
allowed classes only and are zero on masked classes.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from cl_bayes.jacobians import (
    check_class_mask,
    iter_jacobian_chunks,
    masked_log_softmax,
    masked_softmax,
    model_outputs,
    trainable_parameters,
    unflatten,
)
from cl_bayes.posterior import DiagonalGaussian

Estimator = Literal["exact", "last_layer", "samples"]


@dataclass(frozen=True)
class MemoryPerturbation:
    """Per-example MPE quantities at the posterior mean; all (N, C) but ``sensitivity`` (N,)."""

    logits: Tensor
    probs: Tensor
    error: Tensor  # e = p - onehot(y)
    curvature: Tensor  # lam = p - p^2
    variance: Tensor  # v = diag(J Sigma J^T)
    loo_logits: Tensor  # f + omega * v * e
    sensitivity: Tensor  # S = sum_c |e lam v|


@dataclass(frozen=True)
class WhatIfRemoval:
    """Estimated effect of removing a group of training examples, eq. (1)."""

    delta_mean: Tensor  # m^{\G} - m, (P,)
    precision: Tensor  # s^{\G}, (P,)
    logits_before: Tensor  # held-out (H, C)
    logits_after: Tensor
    probs_before: Tensor
    probs_after: Tensor
    nll_before: Tensor | None  # mean held-out NLL (scalar), if heldout_y given
    nll_after: Tensor | None


def example_weight(*, ess: float | None = None, n_train: int | None = None) -> float:
    """omega: 1 for a Bayes posterior, ess / n_train for an IVON posterior."""
    if (ess is None) != (n_train is None):
        raise ValueError("give both ess and n_train (IVON posterior) or neither (omega = 1)")
    if ess is None:
        return 1.0
    if ess <= 0 or n_train <= 0:
        raise ValueError(f"ess and n_train must be positive, got {ess} and {n_train}")
    return float(ess) / float(n_train)


def _check_posterior(model: nn.Module, posterior: DiagonalGaussian) -> None:
    num = sum(p.numel() for _, p in trainable_parameters(model))
    if posterior.mean.ndim != 1 or posterior.mean.numel() != num:
        raise ValueError(f"posterior has {posterior.mean.numel()} parameters, model has {num} trainable ones")


def _error_and_probs(logits: Tensor, y: Tensor, class_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """(e, p) over the allowed classes; checks that every label is allowed."""
    n, c = logits.shape
    if y.shape != (n,) or y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be an integer tensor of shape ({n},), got {tuple(y.shape)}")
    if bool((y < 0).any()) or bool((y >= c).any()):
        raise ValueError(f"labels must be in [0, {c})")
    y = y.long()
    if class_mask is not None and not bool(class_mask[torch.arange(n), y].all()):
        raise ValueError("some label is a masked (disallowed) class")
    p = masked_softmax(logits, class_mask)
    return p - torch.nn.functional.one_hot(y, c).to(p.dtype), p


def _last_linear(model: nn.Module) -> nn.Linear:
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise ValueError("the last_layer estimator needs an nn.Linear output layer")
    return layers[-1]


def _last_layer_variance(
    model: nn.Module, posterior: DiagonalGaussian, x: Tensor, last_layer: nn.Linear | None
) -> tuple[Tensor, Tensor]:
    """(logits, v) with v_c = sum_d Var(W_cd) h_d^2 + Var(b_c); one forward pass."""
    layer = _last_linear(model) if last_layer is None else last_layer
    offsets, start = {}, 0
    for _, p in trainable_parameters(model):
        offsets[id(p)] = slice(start, start + p.numel())
        start += p.numel()
    if id(layer.weight) not in offsets:
        raise ValueError("the last linear layer's weight is not trainable")
    seen: dict[str, Tensor] = {}

    def hook(_module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
        seen["h"], seen["out"] = inputs[0], out

    handle = layer.register_forward_hook(hook)
    try:
        logits = model_outputs(model, x, params=posterior.mean.detach())
    finally:
        handle.remove()
    if "h" not in seen or seen["out"] is not logits or seen["h"].ndim != 2:
        raise ValueError("the last nn.Linear's (N, D) -> (N, C) output must be the model's output")
    variance = posterior.variance.detach()
    var_w = variance[offsets[id(layer.weight)]].view(layer.weight.shape)
    v = seen["h"].square() @ var_w.T
    if layer.bias is not None and id(layer.bias) in offsets:
        v = v + variance[offsets[id(layer.bias)]]
    return logits, v


def _sampled_variance(
    model: nn.Module,
    posterior: DiagonalGaussian,
    x: Tensor,
    num_samples: int,
    generator: torch.Generator | None,
) -> Tensor:
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2, got {num_samples}")
    mean, std = posterior.mean.detach(), posterior.std.detach()
    samples = []
    for _ in range(num_samples):
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        samples.append(model_outputs(model, x, params=mean + std * noise))
    return torch.stack(samples).var(dim=0)


@torch.no_grad()
def _forward_variance(model, posterior, x, estimator, num_samples, generator, last_layer):
    if estimator == "last_layer":
        return _last_layer_variance(model, posterior, x, last_layer)
    logits = model_outputs(model, x, params=posterior.mean.detach())
    return logits, _sampled_variance(model, posterior, x, num_samples, generator)


def prediction_variance(
    model: nn.Module,
    posterior: DiagonalGaussian,
    *,
    x: Tensor,
    class_mask: Tensor | None = None,
    estimator: Estimator = "exact",
    num_samples: int = 64,
    generator: torch.Generator | None = None,
    last_layer: nn.Linear | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(logits at the mean, per-class variance v = diag(J Sigma J^T)), both (N, C).

    See the module docstring for the estimators and their cost. Zero on masked classes.
    """
    _check_posterior(model, posterior)
    if estimator == "exact":
        with torch.no_grad():
            logits = model_outputs(model, x, params=posterior.mean.detach())
        check_class_mask(class_mask, tuple(logits.shape))
        variance = posterior.variance.detach()
        parts = [
            torch.einsum("ncp,p->nc", j.square(), variance)
            for _, j in iter_jacobian_chunks(
                model,
                x,
                params=posterior.mean.detach(),
                class_mask=class_mask,
                chunk_size=chunk_size,
            )
        ]
        return logits, torch.cat(parts)
    if estimator not in ("last_layer", "samples"):
        raise ValueError(f"estimator must be 'exact', 'last_layer' or 'samples', got {estimator!r}")
    logits, v = _forward_variance(model, posterior, x, estimator, num_samples, generator, last_layer)
    check_class_mask(class_mask, tuple(logits.shape))
    return logits, v if class_mask is None else v * class_mask


def memory_perturbation(
    model: nn.Module,
    posterior: DiagonalGaussian,
    *,
    x: Tensor,
    y: Tensor,
    class_mask: Tensor | None = None,
    estimator: Estimator = "exact",
    ess: float | None = None,
    n_train: int | None = None,
    num_samples: int = 64,
    generator: torch.Generator | None = None,
    last_layer: nn.Linear | None = None,
    chunk_size: int | None = None,
) -> MemoryPerturbation:
    """Per-example error, curvature, variance, leave-one-out logits (2) and sensitivity S."""
    logits, v = prediction_variance(
        model,
        posterior,
        x=x,
        class_mask=class_mask,
        estimator=estimator,
        num_samples=num_samples,
        generator=generator,
        last_layer=last_layer,
        chunk_size=chunk_size,
    )
    omega = example_weight(ess=ess, n_train=n_train)
    e, p = _error_and_probs(logits, y, class_mask)
    lam = p - p.square()
    return MemoryPerturbation(
        logits=logits,
        probs=p,
        error=e,
        curvature=lam,
        variance=v,
        loo_logits=logits + omega * v * e,
        sensitivity=(e * lam * v).abs().sum(dim=-1),
    )


GroupMethod = Literal["fast", "jacobian"]


@contextlib.contextmanager
def _weights_at(model: nn.Module, flat: Tensor):
    """The model's trainable weights set to ``flat`` inside the block, restored after (even if it raises)."""
    params = [p for _, p in trainable_parameters(model)]
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, t in zip(params, unflatten(model, flat).values(), strict=True):
                p.copy_(t)
        yield model
    finally:
        with torch.no_grad():
            for p, t in zip(params, saved, strict=True):
                p.copy_(t)


def group_contribution(
    model: nn.Module,
    posterior: DiagonalGaussian,
    *,
    x: Tensor,
    y: Tensor,
    class_mask: Tensor | None = None,
    chunk_size: int | None = None,
    method: GroupMethod = "fast",
) -> tuple[Tensor, Tensor]:
    """(sum_G J^T e, sum_G diag(J^T Lam J)) at the posterior mean, both (P,).

    The gradient and GGN-diagonal of the group's (unweighted) loss. ``fast`` (default):
    the gradient is one backward pass of the group's summed cross-entropy (J^T e is its
    per-example gradient) and the GGN diagonal is ``cl_bayes.laplace.diagonal_ggn``
    (one backward pass per class present for an MLP of nn.Linear layers, per-example
    Jacobians otherwise): O(C) passes over the group. ``jacobian``: per-example Jacobians
    for both, O(|G| C F) + O(|G| C P) flops (the reference; same values to float error).
    """
    from cl_bayes.laplace import diagonal_ggn  # laplace imports nothing of this module

    if method not in ("fast", "jacobian"):
        raise ValueError(f"method must be 'fast' or 'jacobian', got {method!r}")
    _check_posterior(model, posterior)
    mean = posterior.mean.detach()
    if method == "fast":
        with _weights_at(model, mean):
            with torch.enable_grad():
                logits = model(x)
                check_class_mask(class_mask, tuple(logits.shape))
                _error_and_probs(logits.detach(), y, class_mask)  # validates the labels
                loss = -masked_log_softmax(logits, class_mask).gather(-1, y.long().unsqueeze(-1)).sum()
                params = [p for _, p in trainable_parameters(model)]
                grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
            ggn = diagonal_ggn(model, x, class_mask=class_mask).to(mean.dtype)
        return grad.detach(), ggn
    with torch.no_grad():
        logits = model_outputs(model, x, params=mean)
    check_class_mask(class_mask, tuple(logits.shape))
    e, p = _error_and_probs(logits, y, class_mask)
    grad, ggn = torch.zeros_like(mean), torch.zeros_like(mean)
    for s, j in iter_jacobian_chunks(model, x, params=mean, class_mask=class_mask, chunk_size=chunk_size):
        grad += torch.einsum("ncp,nc->p", j, e[s])
        # diag(J^T (diag(p) - p p^T) J) = sum_c p_c J_c^2 - (sum_c p_c J_c)^2
        ggn += torch.einsum("ncp,nc->p", j.square(), p[s])
        ggn -= torch.einsum("ncp,nc->np", j, p[s]).square().sum(dim=0)
    return grad, ggn


def whatif_remove(
    model: nn.Module,
    posterior: DiagonalGaussian,
    *,
    group_x: Tensor,
    group_y: Tensor,
    heldout_x: Tensor,
    heldout_y: Tensor | None = None,
    group_class_mask: Tensor | None = None,
    heldout_class_mask: Tensor | None = None,
    ess: float | None = None,
    n_train: int | None = None,
    linearise: bool = True,
    min_precision_fraction: float = 1e-3,
    chunk_size: int | None = None,
    method: GroupMethod = "fast",
) -> WhatIfRemoval:
    """Held-out logits/probs/NLL had the group (x, y) been left out of training, eq. (1).

    No retraining: a gradient and a GGN diagonal over the group (``group_contribution``), then one JVP (``linearise``,
    the MPE estimate) or one forward pass at m^{\\G} over the held-out data.
    The reduced precision is floored at ``min_precision_fraction * precision``
    (an approximate posterior's precision need not exceed the group's share).
    """
    if not 0 < min_precision_fraction <= 1:
        raise ValueError(f"min_precision_fraction must be in (0, 1], got {min_precision_fraction}")
    omega = example_weight(ess=ess, n_train=n_train)
    grad, ggn = group_contribution(
        model, posterior, x=group_x, y=group_y, class_mask=group_class_mask, chunk_size=chunk_size, method=method
    )
    s = posterior.precision.detach()
    s_new = torch.maximum(s - omega * ggn, min_precision_fraction * s)
    delta = omega * grad / s_new
    return removal_predictions(model, posterior.mean.detach(), delta, precision=s_new, heldout_x=heldout_x,
                               heldout_y=heldout_y, heldout_class_mask=heldout_class_mask, linearise=linearise)


def removal_predictions(
    model: nn.Module,
    mean: Tensor,
    delta: Tensor,
    *,
    precision: Tensor,
    heldout_x: Tensor,
    heldout_y: Tensor | None = None,
    heldout_class_mask: Tensor | None = None,
    linearise: bool = True,
) -> WhatIfRemoval:
    """Held-out predictions at ``mean`` and at ``mean + delta`` (or its linearisation: one JVP)."""

    def f(flat: Tensor) -> Tensor:
        return functional_call(model, unflatten(model, flat), (heldout_x,))

    with torch.no_grad(), warnings.catch_warnings():
        # torch's forward-mode AD scripts its decompositions once, with a FutureWarning.
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        if linearise:
            before, tangent = jvp(f, (mean,), (delta,))
            after = before + tangent
        else:
            before, after = f(mean), f(mean + delta)
    return removal_from_logits(before, after, delta, precision=precision, heldout_y=heldout_y,
                               heldout_class_mask=heldout_class_mask)


def removal_from_logits(
    before: Tensor,
    after: Tensor,
    delta: Tensor,
    *,
    precision: Tensor,
    heldout_y: Tensor | None = None,
    heldout_class_mask: Tensor | None = None,
) -> WhatIfRemoval:
    """The ``WhatIfRemoval`` of held-out logits before and after the removal step ``delta``."""
    check_class_mask(heldout_class_mask, tuple(before.shape))
    p_before = masked_softmax(before, heldout_class_mask)
    p_after = masked_softmax(after, heldout_class_mask)
    nll_before = nll_after = None
    if heldout_y is not None:
        _error_and_probs(before, heldout_y, heldout_class_mask)  # validates the labels
        idx = heldout_y.long().unsqueeze(-1)
        nll_before = -masked_log_softmax(before, heldout_class_mask).gather(-1, idx).mean()
        nll_after = -masked_log_softmax(after, heldout_class_mask).gather(-1, idx).mean()
    return WhatIfRemoval(
        delta_mean=delta,
        precision=precision,
        logits_before=before,
        logits_after=after,
        probs_before=p_before,
        probs_after=p_after,
        nll_before=nll_before,
        nll_after=nll_after,
    )
