"""Per-example Jacobians of a network's outputs and the kernels J Sigma J^T.

For a model ``f(w, x) -> (C,)`` (logits over all C classes) and the flat
parameter vector ``w`` (``[p for p in model.parameters() if p.requires_grad]``
order, the order of our posteriors), the per-example Jacobian is

    J(x) = d f(w, x) / d w        shape (C, P).

With ``output="probs"`` the Jacobian is that of the softmax outputs instead,
``J_p(x) = (diag(p) - p p^T) J(x)`` (FROMP regularises softmax outputs). With a
boolean ``class_mask`` (N, C) (True = class allowed, task-incremental
benchmarks), masked logits are treated as absent: the softmax is over the
allowed classes only and every row of a Jacobian, block or kernel that belongs
to a masked class is exactly zero.

For a diagonal covariance ``Sigma = diag(variance)`` we need

    V(x)       = J(x) Sigma J(x)^T                (C, C)    per example
    v(x)       = diag V(x)                        (C,)      per-class variance
    K_c[i, j]  = J_c(x_i) Sigma J_c(x_j)^T        (M, M)    per class c

All are computed from vectorised Jacobians (``torch.func``: ``vmap`` over
examples of ``jacrev`` through ``functional_call``), a chunk of examples at a
time, so at most ``chunk_size * C * P`` Jacobian entries exist at once.

Cost, N examples, C outputs, P parameters, F = cost of one forward pass of
one example: Jacobians O(N C F) time (one reverse pass per output, vectorised);
``jsj_blocks`` adds O(N C^2 P) and ``jsj_diagonal`` O(N C P) flops; the
cross-example ``class_kernels`` O(M^2 C P) flops, holding all M examples'
Jacobian rows when they fit in ``max_elements`` (else recomputing block pairs).
Measured (one CPU thread, float32, 784-256-256-10 MLP, P = 270k): ~4 ms per
example for its (10, P) Jacobian.

The model is evaluated in its current mode (train/eval) and, per example, as
a batch of one: BatchNorm in training mode is not supported (use eval mode).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

Output = Literal["logits", "probs"]

DEFAULT_MAX_JACOBIAN_ELEMENTS = 2**22  # 16 MiB of float32 per chunk (larger was slower on CPU)
DEFAULT_MAX_KERNEL_ELEMENTS = 2**28  # Jacobian rows held at once by class_kernels (1 GiB f32; FROMP on
# permuted MNIST, 200 points x 10 classes x 90k parameters, needs 712 MiB: recomputing block pairs was ~10x slower)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs in flat-vector order (requires_grad only)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def flat_parameters(model: nn.Module) -> Tensor:
    """The model's trainable parameters as one detached flat vector."""
    params = [p.detach().reshape(-1) for _, p in trainable_parameters(model)]
    if not params:
        raise ValueError("model has no trainable parameters")
    return torch.cat(params)


def unflatten(model: nn.Module, flat: Tensor) -> dict[str, Tensor]:
    """Split a flat vector into {name: tensor} views shaped like the parameters."""
    named = trainable_parameters(model)
    numels = [p.numel() for _, p in named]
    if flat.ndim != 1 or flat.numel() != sum(numels):
        raise ValueError(f"flat parameter vector must have shape ({sum(numels)},), got {tuple(flat.shape)}")
    return {n: t.view(p.shape) for (n, p), t in zip(named, flat.split(numels), strict=True)}


def check_class_mask(class_mask: Tensor | None, shape: tuple[int, ...]) -> Tensor | None:
    """Validate an optional boolean (N, C) mask with at least one allowed class per row."""
    if class_mask is None:
        return None
    if class_mask.dtype != torch.bool or tuple(class_mask.shape) != tuple(shape):
        raise ValueError(
            f"class_mask must be a bool tensor of shape {tuple(shape)}, got "
            f"{class_mask.dtype} {tuple(class_mask.shape)}"
        )
    if not bool(class_mask.any(dim=-1).all()):
        raise ValueError("class_mask allows no class for some example")
    return class_mask


def masked_softmax(logits: Tensor, class_mask: Tensor | None = None) -> Tensor:
    """Softmax over the allowed classes; masked classes get probability exactly 0."""
    if class_mask is None:
        return torch.softmax(logits, dim=-1)
    return torch.softmax(logits.masked_fill(~class_mask, float("-inf")), dim=-1)


def masked_log_softmax(logits: Tensor, class_mask: Tensor | None = None) -> Tensor:
    """Log-softmax over the allowed classes; masked entries are set to 0 (not -inf)."""
    if class_mask is None:
        return torch.log_softmax(logits, dim=-1)
    out = torch.log_softmax(logits.masked_fill(~class_mask, float("-inf")), dim=-1)
    return out.masked_fill(~class_mask, 0.0)


def model_outputs(
    model: nn.Module,
    x: Tensor,
    *,
    params: Tensor | None = None,
    output: Output = "logits",
    class_mask: Tensor | None = None,
) -> Tensor:
    """Batched outputs (N, C) at the model's weights or at a flat vector ``params``."""
    logits = model(x) if params is None else functional_call(model, unflatten(model, params), (x,))
    if logits.ndim != 2:
        raise ValueError(f"model must return (N, C) logits, got shape {tuple(logits.shape)}")
    check_class_mask(class_mask, tuple(logits.shape))
    if output == "logits":
        return logits
    if output == "probs":
        return masked_softmax(logits, class_mask)
    raise ValueError(f"output must be 'logits' or 'probs', got {output!r}")


def _single_output_fn(model: nn.Module, output: Output) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """f(flat, x_i, mask_i) -> (C,) for one example, for vmap/jacrev."""
    if output not in ("logits", "probs"):
        raise ValueError(f"output must be 'logits' or 'probs', got {output!r}")

    def f(flat: Tensor, xi: Tensor, mask_i: Tensor) -> Tensor:
        logits = functional_call(model, unflatten(model, flat), (xi.unsqueeze(0),)).squeeze(0)
        if output == "probs":
            return torch.softmax(logits.masked_fill(~mask_i, float("-inf")), dim=-1)
        return logits * mask_i  # masked logits absent: zero rows in J

    return f


def default_chunk_size(num_outputs: int, num_params: int) -> int:
    """Examples per chunk so a chunk holds at most DEFAULT_MAX_JACOBIAN_ELEMENTS entries."""
    return max(1, DEFAULT_MAX_JACOBIAN_ELEMENTS // max(1, num_outputs * num_params))


def iter_jacobian_chunks(
    model: nn.Module,
    x: Tensor,
    *,
    params: Tensor | None = None,
    output: Output = "logits",
    class_mask: Tensor | None = None,
    chunk_size: int | None = None,
) -> Iterator[tuple[slice, Tensor]]:
    """Yield (slice of examples, Jacobians (n, C, P)) chunk by chunk.

    Jacobians are taken at ``params`` (flat) or, by default, the model's weights.
    """
    if x.shape[0] == 0:
        raise ValueError("x has no examples")
    flat = flat_parameters(model) if params is None else params.detach()
    with torch.no_grad():
        num_outputs = model_outputs(model, x[:1], params=flat).shape[-1]
    if class_mask is None:
        class_mask = torch.ones(x.shape[0], num_outputs, dtype=torch.bool, device=x.device)
    check_class_mask(class_mask, (x.shape[0], num_outputs))
    if chunk_size is None:
        chunk_size = default_chunk_size(num_outputs, flat.numel())
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    jac = vmap(jacrev(_single_output_fn(model, output)), in_dims=(None, 0, 0))
    for start in range(0, x.shape[0], chunk_size):
        s = slice(start, min(start + chunk_size, x.shape[0]))
        yield s, jac(flat, x[s], class_mask[s])


def per_example_jacobians(
    model: nn.Module,
    x: Tensor,
    *,
    params: Tensor | None = None,
    output: Output = "logits",
    class_mask: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """All per-example Jacobians, shape (N, C, P). Memory O(N C P): prefer the reducers."""
    chunks = iter_jacobian_chunks(model, x, params=params, output=output, class_mask=class_mask, chunk_size=chunk_size)
    return torch.cat([j for _, j in chunks])


def _check_variance(variance: Tensor, model: nn.Module) -> Tensor:
    num = sum(p.numel() for _, p in trainable_parameters(model))
    if variance.ndim != 1 or variance.numel() != num:
        raise ValueError(f"variance must have shape ({num},), got {tuple(variance.shape)}")
    if not bool((variance >= 0).all()):
        raise ValueError("variance must be non-negative")
    return variance.detach()


def jsj_blocks(
    model: nn.Module,
    x: Tensor,
    *,
    variance: Tensor,
    params: Tensor | None = None,
    output: Output = "logits",
    class_mask: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-example V(x_i) = J_i diag(variance) J_i^T, shape (N, C, C). O(N C^2 P) flops."""
    variance = _check_variance(variance, model)
    out = []
    for _, j in iter_jacobian_chunks(
        model, x, params=params, output=output, class_mask=class_mask, chunk_size=chunk_size
    ):
        out.append(torch.einsum("ncp,p,ndp->ncd", j, variance, j))
    return torch.cat(out)


def jsj_diagonal(
    model: nn.Module,
    x: Tensor,
    *,
    variance: Tensor,
    params: Tensor | None = None,
    output: Output = "logits",
    class_mask: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-class variances v_ic = J_ic diag(variance) J_ic^T, shape (N, C). O(N C P) flops."""
    variance = _check_variance(variance, model)
    out = []
    for _, j in iter_jacobian_chunks(
        model, x, params=params, output=output, class_mask=class_mask, chunk_size=chunk_size
    ):
        out.append(torch.einsum("ncp,p->nc", j.square(), variance))
    return torch.cat(out)


def _scaled_rows(model, x, mask, used, std, kwargs) -> Tensor:
    """Jacobian rows of the ``used`` classes times sqrt(variance), (n, C', P).

    Written chunk by chunk into one preallocated tensor: concatenating fresh chunk
    copies costs several times the Jacobians themselves on CPUs (page faults).
    """
    idx = torch.nonzero(used).flatten()
    out = None
    for s, j in iter_jacobian_chunks(model, x, class_mask=mask, **kwargs):
        if out is None:
            out = j.new_empty((x.shape[0], len(idx), j.shape[-1]))
        torch.mul(j.index_select(1, idx), std, out=out[s])
    return out


def class_jacobian_rows(
    model: nn.Module,
    x: Tensor,
    *,
    used: Tensor,
    params: Tensor | None = None,
    output: Output = "logits",
    class_mask: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-example Jacobian rows of the classes where ``used`` (C,) is True: (N, C', P), preallocated."""
    kwargs = dict(params=params, output=output, chunk_size=chunk_size)
    return _scaled_rows(model, x, class_mask, used, 1.0, kwargs)


def class_kernels(
    model: nn.Module,
    x: Tensor,
    *,
    variance: Tensor,
    params: Tensor | None = None,
    output: Output = "logits",
    class_mask: Tensor | None = None,
    chunk_size: int | None = None,
    max_elements: int = DEFAULT_MAX_KERNEL_ELEMENTS,
) -> Tensor:
    """Per-class kernels across examples, K[c, i, j] = J_c(x_i) diag(variance) J_c(x_j)^T.

    Shape (C, M, M); zero for classes that no example allows. O(M^2 C' P) flops
    for the C' classes allowed somewhere. The Jacobian rows of those classes
    for all M examples are held at once if they fit in ``max_elements``;
    otherwise the examples are split into blocks of half that size and the
    Jacobians of a block pair are recomputed (n_blocks (n_blocks + 1) / 2
    block evaluations instead of n_blocks).
    """
    variance = _check_variance(variance, model)
    std = variance.sqrt()
    m = x.shape[0]
    with torch.no_grad():
        num_outputs = model_outputs(model, x[:1], params=params).shape[-1]
    if class_mask is None:
        class_mask = torch.ones(m, num_outputs, dtype=torch.bool, device=x.device)
    check_class_mask(class_mask, (m, num_outputs))
    used = class_mask.any(dim=0)
    n_used = int(used.sum())
    kwargs = dict(params=params, output=output, chunk_size=chunk_size)
    kernel = x.new_zeros(num_outputs, m, m, dtype=variance.dtype)
    if m * n_used * variance.numel() <= max_elements:
        ja = _scaled_rows(model, x, class_mask, used, std, kwargs)
        kernel[used] = torch.einsum("icp,jcp->cij", ja, ja)
        return kernel
    block = max(1, max_elements // (2 * n_used * variance.numel()))
    for a in range(0, m, block):
        sa = slice(a, min(a + block, m))
        ja = _scaled_rows(model, x[sa], class_mask[sa], used, std, kwargs)
        for b in range(a, m, block):
            sb = slice(b, min(b + block, m))
            jb = ja if b == a else _scaled_rows(model, x[sb], class_mask[sb], used, std, kwargs)
            k_ab = torch.einsum("icp,jcp->cij", ja, jb)
            kernel[used, sa, sb] = k_ab
            kernel[used, sb, sa] = k_ab.transpose(1, 2)
    return kernel
