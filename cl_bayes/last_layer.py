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

Retraining the output layer (``retrain_output_layer``, the ``head-retrain`` what-if estimator).
The Newton step above is the memory-perturbation answer for a *small* perturbation. Removing a
whole class is not small: the data that remain for its task may be separable (one class
left), so the remaining data's GGN is nearly zero in the removed class's directions, only the
prior holds the step, and its size swings by orders of magnitude from seed to seed (what-if,
quick protocol, classes 3 and 7, seeds 0-2, ``results/whatif/quick/split-mnist/ivon-prior/*-last-layer.json``:
mean held-out NLL change estimated +0.4 to +32, true +0.4 to +0.8). Retraining from scratch
without the group is a finite run, not an optimum. So the
second estimator keeps the body at the posterior mean, takes the features ``phi`` of the
remaining data once, and *retrains only the output layer* from its initial weights on those
fixed features, with the strategy's own optimizer settings (IVON: lr, ess per experience,
hess_init, beta1, beta2, weight decay, samples; natural-parameter accumulation between
experiences for ``ivon-prior``), experience after experience, ``epochs`` each. It is the run
that retraining would do if the body did not move: a softmax regression on F + 1 inputs
instead of the network, so it costs one forward pass over the remaining data of the rows'
experiences and a few hundred small steps.

Pure torch, no Avalanche import.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from cl_bayes.jacobians import masked_log_softmax, masked_softmax, trainable_parameters, unflatten


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


# --- retraining the output layer on fixed features ------------------------------------


@dataclass(frozen=True)
class HeadTraining:
    """How ``retrain_output_layer`` trains: the strategy's IVON settings (``cl_bayes.ivon.IVON``)."""

    lr: float  # IVON's learning rate (constant, or the start of each experience's cosine)
    epochs: int  # epochs per experience
    batch_size: int  # mini-batch size
    hess_init: float = 1.0  # IVON's initial Hessian
    beta1: float = 0.9  # IVON's momentum
    beta2: float = 0.99999  # IVON's Hessian averaging
    weight_decay: float = 1e-4  # IVON's prior precision per example (the first prior)
    mc_samples: int = 1  # posterior samples per step
    clip_radius: float = math.inf  # IVON's element-wise clipping
    ess: float | None = None  # fixed effective sample size; None: each experience's size, as IVONStrategy
    lr_schedule: str = "constant"  # "constant" or "cosine" (cl_bayes.schedules), restarted per experience
    accumulate: bool = False  # carry each experience's posterior to the next prior (ivon-prior)
    keep_hess: bool = False  # with accumulate: cl_bayes.natural.carry_posterior_to_prior's settings
    temper: float = 1.0
    debias_hess: bool = False
    seed: int = 0  # the mini-batch order and IVON's noise

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def retrain_output_layer(
    weight: Tensor,
    bias: Tensor | None,
    experiences: Sequence[tuple[Tensor, Tensor, Tensor | None]],
    training: HeadTraining,
) -> tuple[Tensor, Tensor | None]:
    """(weight, bias) of the output layer retrained from ``(weight, bias)`` on fixed features.

    ``experiences``: in training order, one ``(phi, y, class_mask)`` per experience: the output
    layer's inputs (n, F), labels (n,) and allowed classes (n, C) or None. An experience with no
    examples is skipped, as retraining skips it. Each experience is trained for ``epochs`` epochs of
    mini-batches (a seeded permutation) with IVON on the mean cross-entropy over the allowed classes;
    IVON's posterior carries over, and with ``accumulate`` it becomes the next experience's prior.
    The inputs are not changed; the global torch generator is saved and restored.
    """
    from cl_bayes.ivon import IVON
    from cl_bayes.natural import carry_posterior_to_prior
    from cl_bayes.schedules import check_schedule, lr_at

    check_schedule(training.lr_schedule)
    n_out, n_in = weight.shape
    if bias is not None and bias.shape != (n_out,):
        raise ValueError(f"bias must be ({n_out},), got {tuple(bias.shape)}")
    for phi, y, mask in experiences:
        if phi.ndim != 2 or phi.shape[1] != n_in or y.shape != (phi.shape[0],):
            raise ValueError(f"each experience needs phi (n, {n_in}) and y (n,), got {tuple(phi.shape)} and "
                             f"{tuple(y.shape)}")
        if mask is not None and mask.shape != (phi.shape[0], n_out):
            raise ValueError(f"class_mask must be (n, {n_out}), got {tuple(mask.shape)}")
    experiences = [e for e in experiences if len(e[1]) > 0]
    if not experiences:
        return weight.detach().clone(), None if bias is None else bias.detach().clone()

    # IVON draws its noise from the global generator: seed it for this run, restore it after (fork_rng)
    cuda = [weight.device] if weight.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(training.seed)
        head = nn.Linear(n_in, n_out, bias=bias is not None).to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            head.weight.copy_(weight)
            if bias is not None:
                head.bias.copy_(bias)
        order = torch.Generator().manual_seed(training.seed + 1)
        optimizer = IVON(head.parameters(), lr=training.lr, ess=float(training.ess or len(experiences[0][1])),
                         hess_init=training.hess_init, beta1=training.beta1, beta2=training.beta2,
                         weight_decay=training.weight_decay, mc_samples=training.mc_samples,
                         clip_radius=training.clip_radius)
        for phi, y, mask in experiences:
            n = len(y)
            optimizer.ess = float(training.ess or n)
            steps_per_epoch = -(-n // training.batch_size)
            total, step = training.epochs * steps_per_epoch, 0
            for _ in range(training.epochs):
                perm = torch.randperm(n, generator=order).to(phi.device)
                for start in range(0, n, training.batch_size):
                    idx = perm[start : start + training.batch_size]
                    part_mask = None if mask is None else mask[idx]
                    for _ in range(training.mc_samples):
                        with optimizer.sampled_params(train=True):
                            optimizer.zero_grad()
                            logp = masked_log_softmax(head(phi[idx]), part_mask)
                            loss = -logp.gather(-1, y[idx].long().unsqueeze(-1)).mean()
                            if not torch.isfinite(loss):
                                raise ValueError(f"non-finite loss ({loss.item()}) retraining the output layer")
                            loss.backward()
                    for group in optimizer.param_groups:
                        group["lr"] = lr_at(training.lr_schedule, training.lr, step, total)
                    optimizer.step()
                    step += 1
            if training.accumulate:
                carry_posterior_to_prior(optimizer, keep_hess=training.keep_hess, temper=training.temper,
                                         debias_hess=training.debias_hess)
    return head.weight.detach(), None if bias is None else head.bias.detach()
