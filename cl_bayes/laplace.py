"""A diagonal Laplace-GGN posterior: FROMP's posterior (Pan et al., NeurIPS 2020, Sec. 3).

After training on experiences 1..t with a deterministic optimizer (Adam) to the
weights ``mu_t``, the Laplace approximation with the diagonal generalised
Gauss-Newton (GGN) matrix of the softmax cross-entropy is

    q_t(w) = N(mu_t, Sigma_t),
    Sigma_t^{-1} = delta I + sum_{s <= t} sum_{i in D_s} diag( J(x_i)^T Lambda(x_i) J(x_i) ),

with ``J(x) = d f(w, x) / d w`` the Jacobian of the logits at the weights of the
experience's end and ``Lambda(x) = diag(p) - p p^T`` the softmax Hessian (over the
allowed classes only when a class mask is given). ``delta`` is the prior
precision. ``fit`` adds one experience's GGN: fitting again accumulates, so after
t experiences the precision holds every experience's data, as in FROMP's code
(its ``update_fisher`` adds into one running sum).

Exact diagonal of the GGN, cheaply. Since ``Lambda = sum_c p_c (e_c - p)(e_c - p)^T``
and ``J^T (p - e_c)`` is the gradient ``g_c`` of the cross-entropy with label c,

    diag(J^T Lambda J) = sum_c p_c g_c (.) g_c,

a p-weighted sum over the allowed classes of squared *per-example* gradients. For
``nn.Linear`` layers the per-example weight gradient is the outer product
``d_i a_i^T`` of the output gradient and the input, so the sum over examples of its
square is ``(d (.) d)^T (a (.) a)``: one ordinary batched backward pass per class
(``method="linear"``: C backward passes per batch, no per-example tensor). Any other
model uses per-example Jacobians (``method="jacobian"``, ``cl_bayes.jacobians``:
O(N C P) flops, chunked). ``method="auto"`` picks ``linear`` when every trainable
parameter belongs to an ``nn.Linear`` used once per forward pass.

Pure torch: no optimizer and no Avalanche here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor, nn

from cl_bayes.jacobians import (
    check_class_mask,
    iter_jacobian_chunks,
    masked_log_softmax,
    masked_softmax,
    trainable_parameters,
)
from cl_bayes.posterior import DiagonalGaussian

Method = Literal["auto", "linear", "jacobian"]
METHODS = ("auto", "linear", "jacobian")


def _linear_layers(model: nn.Module) -> list[nn.Linear] | None:
    """The model's nn.Linear layers if they hold every trainable parameter, else None."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    owned = {id(p) for m in layers for p in m.parameters() if p.requires_grad}
    trainable = [p for _, p in trainable_parameters(model)]
    if not layers or len(owned) != len(trainable) or any(id(p) not in owned for p in trainable):
        return None
    return layers


def _softmax_hessian_diag_linear(
    model: nn.Module, layers: list[nn.Linear], x: Tensor, mask: Tensor | None
) -> Tensor | None:
    seen: dict[int, tuple[Tensor, Tensor]] = {}

    def hook(module, inputs, output):
        if id(module) in seen:
            raise RuntimeError("an nn.Linear is used twice in one forward pass: use method='jacobian'")
        seen[id(module)] = (inputs[0], output)

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    if logits.ndim != 2:
        raise ValueError(f"model must return (N, C) logits, got shape {tuple(logits.shape)}")
    if len(seen) != len(layers) or any(seen[id(m)][0].ndim != 2 for m in layers):
        return None  # a layer unused, or applied over extra dimensions: not one outer product per example
    check_class_mask(mask, tuple(logits.shape))
    probs = masked_softmax(logits, mask).detach()
    log_probs = masked_log_softmax(logits, mask)
    outputs = [seen[id(m)][1] for m in layers]
    squares = {id(p): torch.zeros_like(p) for m in layers for p in m.parameters()}
    classes = [int(c) for c in torch.nonzero(probs.sum(0) > 0).flatten()]
    for k, c in enumerate(classes):
        # d/dz of sum_i sqrt(p_ic) * CE(z_i, c) = sqrt(p_ic) (p_i - e_c): row i squared carries p_ic g_c^2.
        loss = -(probs[:, c].sqrt() * log_probs[:, c]).sum()
        grads = torch.autograd.grad(loss, outputs, retain_graph=k < len(classes) - 1)
        for m, d in zip(layers, grads, strict=True):
            a = seen[id(m)][0].detach()
            d2 = d.reshape(-1, d.shape[-1]).square()
            squares[id(m.weight)] += d2.T @ a.reshape(-1, a.shape[-1]).square()
            if m.bias is not None:
                squares[id(m.bias)] += d2.sum(0)
    return torch.cat([squares[id(p)].reshape(-1) for _, p in trainable_parameters(model)])


def _softmax_hessian_diag_jacobian(model: nn.Module, x: Tensor, mask: Tensor | None) -> Tensor:
    with torch.no_grad():
        probs = masked_softmax(model(x), mask)
    if mask is None:
        mask = torch.ones(probs.shape, dtype=torch.bool, device=probs.device)
    total = None
    for s, jac in iter_jacobian_chunks(model, x, output="logits", class_mask=mask):
        p = probs[s]
        lam = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        part = torch.einsum("ncp,ncd,ndp->p", jac, lam, jac)
        total = part if total is None else total + part
    return total


def diagonal_ggn(
    model: nn.Module, x: Tensor, *, class_mask: Tensor | None = None, method: Method = "auto"
) -> Tensor:
    """sum_i diag(J(x_i)^T Lambda(x_i) J(x_i)) at the model's weights, flat (P,). See the module docstring."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if x.shape[0] == 0:
        raise ValueError("x has no examples")
    layers = _linear_layers(model) if method in ("auto", "linear") else None
    if method == "linear" and layers is None:
        raise ValueError("method='linear' needs every trainable parameter in an nn.Linear")
    with torch.enable_grad():
        if layers is not None:
            out = _softmax_hessian_diag_linear(model, layers, x, class_mask)
            if out is not None:
                return out.detach()
            if method == "linear":
                raise ValueError("method='linear' needs each nn.Linear applied once to (N, features) inputs")
        return _softmax_hessian_diag_jacobian(model, x, class_mask).detach()


class DiagonalLaplace:
    """Running diagonal Laplace-GGN posterior: ``fit`` after each experience, then ``posterior(model)``.

    ``posterior_precision = prior_precision + ggn`` where ``ggn`` sums the diagonal GGN
    of every example passed to ``fit`` so far (fitting again accumulates).
    """

    def __init__(self, *, prior_precision: float, method: Method = "auto"):
        if not prior_precision > 0:
            raise ValueError(f"prior_precision must be positive, got {prior_precision}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.prior_precision = float(prior_precision)
        self.method = method
        self.ggn: Tensor | None = None  # accumulated diagonal GGN, flat (P,)
        self.n_data = 0  # examples fitted so far

    @torch.no_grad()
    def fit(self, model: nn.Module, batches: Iterable[tuple[Tensor, Tensor | None]]) -> Tensor:
        """Add ``sum_i diag(J^T Lambda J)`` over ``batches`` of (x, class_mask or None); returns that sum."""
        added = None
        for x, mask in batches:
            part = diagonal_ggn(model, x, class_mask=mask, method=self.method)
            added = part if added is None else added + part
            self.n_data += x.shape[0]
        if added is None:
            raise ValueError("no data to fit the Laplace approximation on")
        self.ggn = added.clone() if self.ggn is None else self.ggn + added
        return added

    @property
    def posterior_precision(self) -> Tensor:
        if self.ggn is None:
            raise ValueError("the Laplace approximation has not been fitted")
        return self.ggn + self.prior_precision

    @property
    def posterior_variance(self) -> Tensor:
        return self.posterior_precision.reciprocal()

    def posterior(self, model: nn.Module) -> DiagonalGaussian:
        """N(current weights, diag(1 / posterior_precision))."""
        mean = torch.cat([p.detach().reshape(-1) for _, p in trainable_parameters(model)])
        precision = self.posterior_precision
        if precision.shape != mean.shape:
            raise ValueError(f"fitted on {precision.numel()} parameters, model has {mean.numel()}")
        return DiagonalGaussian(mean=mean.clone(), precision=precision.to(mean))
