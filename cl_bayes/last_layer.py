r"""Group removal with a dense last-layer GGN: the ``last-layer`` what-if estimator.

The memory-perturbation step of ``cl_bayes.sensitivity.whatif_remove`` divides by the
posterior's *diagonal* precision. After a short IVON run that precision is still close to
``ess * hess_init`` everywhere, so the step for a removed group is a plain gradient step
through every shared weight and overshoots on examples the group never touched. This
module takes the other road the memory-perturbation equation allows: keep the body (all
layers but the last ``nn.Linear``) at the posterior mean, and do the removal for the
output layer with its *dense* GGN over the remaining data (a last-layer Laplace
approximation; Nickl et al., NeurIPS 2023, eq. (1) with a last-layer posterior).

Notation. The output layer computes ``z = W phi + b`` from the body's features ``phi``;
with ``phit = [phi, 1]`` the parameters of output row c are ``theta_c = [w_c, b_c]``, so
``d z_c / d theta_{c'} = [c = c'] phit``. For one example with softmax probabilities p
(over its allowed classes) and error ``e = p - onehot(y)``:

    gradient         g_n = e_n (x) phit_n                       (row c: e_{n,c} phit_n)
    GGN              G_n = Lam_n (x) phit_n phit_n^T,   Lam_n = diag(p_n) - p_n p_n^T.

The posterior over theta without the group G, at the fixed body, is Gaussian with

    precision   S^{\G} = P_0 + omega sum_{n not in G} G_n          (P_0: the prior precision)
    mean        theta^{\G} = theta + omega (S^{\G})^{-1} sum_{n in G} g_n,

one Newton step of the remaining data's objective from the current mean (where the
whole data's gradient vanishes, the remaining data's gradient is minus the group's).
omega is the weight of one example (``ess / n_train`` for IVON).

Rows. Only output rows in R, the classes allowed for some example of the group, get a
non-zero gradient. An example whose allowed classes miss R adds nothing to the R x R
block, and (with task masks, where every example's classes are one task's) no example
couples R to another row, so solving on R alone is exact there. For a shared head R is
every row. Cost: one forward pass over the group and over the remaining examples that
touch R, and ``O(n (|R| F)^2)`` flops for the block (F: the layer's inputs + 1).

Pure torch, no Avalanche import.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from cl_bayes.jacobians import masked_softmax, trainable_parameters, unflatten


def output_layer(model: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear`` (its output layer)."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise ValueError("the last-layer estimator needs an nn.Linear output layer")
    return layers[-1]


def output_layer_slices(model: nn.Module, layer: nn.Linear) -> tuple[slice, slice | None]:
    """Where the layer's weight (row-major) and bias sit in the flat trainable-parameter vector."""
    found: dict[str, slice] = {}
    offset = 0
    for _, p in trainable_parameters(model):
        if p is layer.weight:
            found["weight"] = slice(offset, offset + p.numel())
        elif layer.bias is not None and p is layer.bias:
            found["bias"] = slice(offset, offset + p.numel())
        offset += p.numel()
    if "weight" not in found:
        raise ValueError("the output layer's weight is not a trainable parameter")
    return found["weight"], found.get("bias")


def features_and_logits(model: nn.Module, layer: nn.Linear, flat: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(phit = [phi, 1], logits) of the model with weights ``flat`` on ``x`` (no gradient)."""
    captured = []
    hook = layer.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
    try:
        with torch.no_grad():
            logits = functional_call(model, unflatten(model, flat), (x,))
    finally:
        hook.remove()
    phi = captured[-1].reshape(len(x), -1)
    ones = phi.new_ones(len(phi), 1) if layer.bias is not None else phi.new_zeros(len(phi), 0)
    return torch.cat([phi, ones], dim=1), logits


def _errors(logits: Tensor, y: Tensor, class_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    p = masked_softmax(logits, class_mask)
    return p - torch.nn.functional.one_hot(y.long(), p.shape[1]).to(p.dtype), p


def ggn_block(phit: Tensor, probs: Tensor, rows: Tensor) -> Tensor:
    """sum_n Lam_n[R, R] (x) phit_n phit_n^T as a dense (|R| F, |R| F) matrix, rows-major (row c, then feature)."""
    n, f = phit.shape
    p = probs[:, rows]  # (n, r)
    r = p.shape[1]
    diag = torch.einsum("nc,ni,nj->cij", p, phit, phit)  # sum_n p_c phit phit^T, per row c
    u = (p.unsqueeze(2) * phit.unsqueeze(1)).reshape(n, r * f)  # p_c phit, stacked over c
    block = -(u.T @ u)
    for c in range(r):
        block[c * f:(c + 1) * f, c * f:(c + 1) * f] += diag[c]
    return block


def last_layer_removal(
    model: nn.Module,
    mean: Tensor,
    *,
    group_x: Tensor,
    group_y: Tensor,
    rest_x: Tensor,
    rest_y: Tensor,
    prior_precision: Tensor | float,
    omega: float = 1.0,
    group_class_mask: Tensor | None = None,
    rest_class_mask: Tensor | None = None,
    chunk_size: int = 4096,
) -> Tensor:
    """theta^{\\G} - theta as a flat (P,) vector (zero outside the output layer's rows R).

    ``prior_precision``: P_0, a scalar or a flat (P,) tensor (only the output layer's entries are read).
    """
    if not omega > 0:
        raise ValueError(f"omega must be positive, got {omega}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    mean = mean.detach()
    layer = output_layer(model)
    w_slice, b_slice = output_layer_slices(model, layer)
    n_out, n_in = layer.weight.shape

    phit_g, logits_g = features_and_logits(model, layer, mean, group_x)
    e_g, _ = _errors(logits_g, group_y, group_class_mask)
    allowed = torch.ones(n_out, dtype=torch.bool) if group_class_mask is None else group_class_mask.any(dim=0)
    rows = torch.nonzero(allowed.cpu()).flatten().to(mean.device)
    f = phit_g.shape[1]
    rhs = (e_g[:, rows].T @ phit_g).reshape(-1)  # sum_G g_n on rows R

    block = torch.zeros(len(rows) * f, len(rows) * f, dtype=mean.dtype, device=mean.device)
    touches = slice(None) if rest_class_mask is None else rest_class_mask[:, rows].any(dim=1)
    rx, ry = rest_x[touches], rest_y[touches]
    rmask = None if rest_class_mask is None else rest_class_mask[touches]
    for start in range(0, len(ry), chunk_size):
        part = slice(start, start + chunk_size)
        phit, logits = features_and_logits(model, layer, mean, rx[part])
        _, p = _errors(logits, ry[part], None if rmask is None else rmask[part])
        block += ggn_block(phit, p, rows)

    # P_0 on the same (row, feature) order: weight entries w[c, :n_in], then bias b[c].
    if torch.is_tensor(prior_precision) and prior_precision.ndim > 0:
        w_prior = prior_precision[w_slice].reshape(n_out, n_in)[rows]
        parts = [w_prior] + ([prior_precision[b_slice][rows].unsqueeze(1)] if b_slice is not None else [])
        p0 = torch.cat(parts, dim=1).reshape(-1).to(mean.dtype)
    else:
        p0 = torch.full((len(rows) * f,), float(prior_precision), dtype=mean.dtype, device=mean.device)
    if not bool((p0 > 0).all()):
        raise ValueError("prior_precision must be positive on the output layer")
    precision = omega * block + torch.diag(p0)
    step = (omega * torch.linalg.solve(precision, rhs.unsqueeze(1))).squeeze(1).reshape(len(rows), f)

    delta = torch.zeros_like(mean)
    w_delta = delta[w_slice].view(n_out, n_in)
    w_delta[rows] = step[:, :n_in]
    if b_slice is not None:
        delta[b_slice][rows] = step[:, n_in]
    return delta


def last_layer_logits(model: nn.Module, mean: Tensor, delta: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(logits at ``mean``, logits at ``mean + delta``) for a ``delta`` that moves only the output layer.

    Exact, with one forward pass: the body's features do not change, and the logits are linear in the
    output layer (so the linearisation and the network agree).
    """
    layer = output_layer(model)
    w_slice, b_slice = output_layer_slices(model, layer)
    outside = torch.ones_like(delta, dtype=torch.bool)
    outside[w_slice] = False
    if b_slice is not None:
        outside[b_slice] = False
    if bool(delta[outside].any()):
        raise ValueError("delta moves parameters outside the output layer")
    phit, before = features_and_logits(model, layer, mean.detach(), x)
    step = delta[w_slice].view(layer.weight.shape)
    if b_slice is not None:
        step = torch.cat([step, delta[b_slice].unsqueeze(1)], dim=1)
    return before, before + phit @ step.T.to(phit.dtype)
