"""FROMP: functional regularisation of memorable past.

Pan, Swaroop, Immer, Eschenhagen, Turner & Khan (NeurIPS 2020), "Continual
Deep Learning by Functional Regularisation of Memorable Past". Implemented
from the paper.

After experience s, with Gaussian posterior ``q_s = N(mu_s, Sigma_s)`` (a
``DiagonalGaussian``: our IVON posterior, with no separate Fisher pass, or
FROMP's own diagonal Laplace-GGN posterior, ``cl_bayes.laplace``) and a memory
of M memorable inputs ``X_s`` (``memory.py``), the linearised network defines a
Gaussian process over the softmax outputs ``p(w, x)`` with

    mean      m_s = p(mu_s, X_s)                                     (M, C)
    kernel    K_s = J_s Sigma_s J_s^T + eps I,   J_s = d p(w, X_s) / d w |_{mu_s}

(Jacobians of the *softmax outputs*: the regularised quantity). While training
experience t > s the loss gains the functional prior term

    R(w) = tau / 2 * sum_{s < t} (m_s(w) - m_s)^T K_s^{-1} (m_s(w) - m_s),
    m_s(w) = p(w, X_s),

whose gradient is ``tau sum_s J_s(w)^T K_s^{-1} (m_s(w) - m_s)``. FROMP's paper
and code anchor every past task at the *latest* posterior instead: at experience
t, m_s and K_s are those of q_{t-1} (``reanchor`` recomputes them all; O(t) kernel
builds per experience). K_s^{-1} is
fixed (computed once per experience), so the gradient is obtained by
differentiating R directly: one forward pass over all memories and one
backward pass per step, cost O(M_total F) like a replay batch, instead of one
backward pass per output (M C of them, ``reference_gradient_jacobian_loop``).

Kernel forms:

* ``block`` (FROMP): block-diagonal over classes, for each class c an M x M
  kernel ``K_c[i, j] = J_c(x_i) Sigma J_c(x_j)^T + eps delta_ij``; C inverses
  of M x M. Building it costs O(M^2 C P) flops + the Jacobians, once.
* ``full``: points independent, for each point a C x C kernel
  ``J(x_i) Sigma J(x_i)^T + eps I``; M inverses of C x C, O(M C^2 P) once.
  (Softmax outputs sum to one, so this C x C kernel has rank <= C - 1: eps
  matters; the residual is orthogonal to the null direction.)
* ``identity``: K = I, the FROMP-L2 ablation: ``tau/2 ||m_s(w) - m_s||^2``.

Measured (one CPU thread, float32, 784-256-256-10 MLP with P = 270k, 4 past
tasks of 40 memorable points each, 2 allowed classes per task): ``add_task``
~0.4 s (block), ~0.2 s (full); one regularised step (forward + backward over
the 160 memory points) ~3 ms for every form, against ~150 ms for the
per-output Jacobian loop (320 backward passes). Class-incremental, 10 classes,
M = 40: ``add_task`` (block) ~1 s.

Task-incremental masks: the softmax is over the memory's allowed classes;
masked classes have zero residual, zero Jacobian, and their kernel rows and
columns are replaced by those of the identity, so they contribute nothing.

Sampled term (``block_size``; ``draw``, ``__call__(blocks=, weights=)``, ``SagaGradient``). Exact
FROMP touches every memorable point at every step: at experience 10 of permuted MNIST, 1,800
points, ~10 batches' worth of forward and backward. With ``block_size`` each experience's
memory is split once, when it is added, into blocks of at most ``block_size`` points
(strided, so that each block keeps the memory's class balance), each with its own kernel
and inverse: the kernel becomes block-diagonal over blocks, an approximation (exact when
``block_size`` >= the memory size) that drops the cross-block correlations of K. A step
then evaluates the blocks of one draw (``draw``): k of each experience's q blocks, weighted
q / k (``per_experience``, stratified: every past experience's function is held at every
step), or k of all n blocks weighted n / k. Either way the weighted sum is unbiased for the
blocked term, value and gradient; equal-sized blocks are evaluated in one batched product.
``SagaGradient`` is SAGA's variance-reduced estimate of the gradient.

Stability of the sampled term (``stable_curvature_scale(blocks_per_step=)``). A drawn block
weighted q acts on the mean's step as a *random* gain, q A_b one step and nothing the next;
IVON's momentum step, stable up to a per-step stiffness of 38 for a fixed gain, is stable in
mean square only up to 3.8 when the gain comes 1 step in 2 (``sampled_stability_bound``,
``random_gain_stiffness``). The curvature scale gamma is therefore chosen for the draws'
random gain, not for A; with it the stratified term holds split MNIST like the exact term,
while scaled to A's stiffness alone every sampled variant drifted and exploded
(docs/BISECTION.md, steps 4 and 8). The price is a larger gamma (hundreds instead of ~1-10),
which slows the mean in the directions the memory pins down: on permuted MNIST the new
permutations are learnt worse and one seed collapsed, so the exact term stays the default.

The memories are evaluated in the model's current mode as one batch (beware
of BatchNorm in training mode: it would use the memory's batch statistics).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from cl_bayes.jacobians import (
    check_class_mask,
    class_jacobian_rows,
    class_kernels,
    iter_jacobian_chunks,
    jsj_blocks,
    masked_softmax,
    model_outputs,
    trainable_parameters,
)
from cl_bayes.posterior import DiagonalGaussian

KernelForm = Literal["block", "full", "identity"]
KERNEL_FORMS = ("block", "full", "identity")


@dataclass(frozen=True)
class MemorableTask:
    """One past experience's functional prior (all tensors detached)."""

    inputs: Tensor  # X_s, (M, ...)
    class_mask: Tensor  # (M, C) bool, True = allowed
    probs: Tensor  # m_s = softmax outputs at the posterior mean, (M, C)
    kernel: Tensor | None  # block: (C, M, M); full: (M, C, C); identity: None
    kernel_inverse: Tensor | None  # same shape as kernel
    anchor: Tensor  # mu_s, the flat posterior mean at which m_s and K_s were computed (P,)


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_form(form: str) -> None:
    if form not in KERNEL_FORMS:
        raise ValueError(f"kernel form must be one of {KERNEL_FORMS}, got {form!r}")


def _identity_on_masked(kernel: Tensor, allowed: Tensor, eps: float) -> Tensor:
    """kernel (B, n, n) with allowed (B, n): add eps I, masked rows/cols -> identity."""
    keep = allowed.unsqueeze(-1) & allowed.unsqueeze(-2)
    eye = torch.eye(kernel.shape[-1], dtype=kernel.dtype, device=kernel.device)
    masked_diag = torch.diag_embed((~allowed).to(kernel.dtype))
    return kernel * keep + eps * eye + masked_diag


def fromp_kernel(
    model: nn.Module,
    posterior: DiagonalGaussian,
    *,
    x: Tensor,
    form: KernelForm = "block",
    class_mask: Tensor | None = None,
    eps: float = 1e-5,
    chunk_size: int | None = None,
) -> Tensor | None:
    """K = J Sigma J^T + eps I of the softmax outputs at the posterior mean, in ``form``.

    block: (C, M, M); full: (M, C, C); identity: None (K = I).
    """
    _check_form(form)
    if eps < 0:
        raise ValueError(f"eps must be non-negative, got {eps}")
    if form == "identity":
        return None
    mean, variance = posterior.mean.detach(), posterior.variance.detach()
    kwargs = dict(variance=variance, params=mean, output="probs", chunk_size=chunk_size)
    if form == "block":
        kernel = class_kernels(model, x, class_mask=class_mask, **kwargs)
        allowed = torch.ones(kernel.shape[:2], dtype=torch.bool, device=kernel.device)
        if class_mask is not None:
            allowed = class_mask.T
        return _identity_on_masked(kernel, allowed, eps)
    kernel = jsj_blocks(model, x, class_mask=class_mask, **kwargs)
    allowed = torch.ones(kernel.shape[:2], dtype=torch.bool, device=kernel.device)
    if class_mask is not None:
        allowed = class_mask
    return _identity_on_masked(kernel, allowed, eps)


def _inverse(kernel: Tensor) -> Tensor:
    """Batched SPD inverse via Cholesky, in float64, symmetrised."""
    chol, info = torch.linalg.cholesky_ex(kernel.double())
    if bool((info != 0).any()):
        raise ValueError("FROMP kernel is not positive definite: increase eps")
    inv = torch.cholesky_inverse(chol)
    return (0.5 * (inv + inv.transpose(-1, -2))).to(kernel.dtype)


def apply_kernel_inverse(residual: Tensor, kernel_inverse: Tensor | None, form: KernelForm) -> Tensor:
    """K^{-1} r for a residual r of shape (..., M, C), in the layout of ``form``; (..., M, C).

    Leading dimensions batch over blocks (``kernel_inverse`` (..., C, M, M) for block, (..., M, C, C) for full).
    """
    _check_form(form)
    if form == "identity":
        return residual
    if form == "block":
        # (K_c^{-1} r_c)_i as a broadcast product and sum: the same numbers as einsum("cij,jc->ic"), whose batched
        # matrix-vector product was ~5x slower on CPU (benchmarks/test_fromp_speed.py: the exact step 12.95 -> 11.78 ms)
        return (kernel_inverse * residual.transpose(-1, -2).unsqueeze(-2)).sum(-1).transpose(-1, -2)
    return torch.einsum("...icd,...id->...ic", kernel_inverse, residual)


class FunctionalPrior:
    """FROMP regulariser: ``add_task`` after each experience, ``prior(model)`` while training.

    ``prior(model)`` returns ``tau/2 sum_s r_s^T K_s^{-1} r_s`` (differentiable;
    zero before any task) from one forward pass over all memories.
    """

    def __init__(
        self,
        *,
        tau: float,
        kernel: KernelForm = "block",
        eps: float = 1e-5,
        chunk_size: int | None = None,
        block_size: int | None = None,
    ) -> None:
        _check_form(kernel)
        if block_size is not None:
            check_positive_int("block_size", block_size)
        if tau < 0:
            raise ValueError(f"tau must be non-negative, got {tau}")
        if eps < 0 or (eps == 0 and kernel != "identity"):
            raise ValueError(f"eps must be positive, got {eps}")
        self.tau = float(tau)
        self.kernel = kernel
        self.eps = float(eps)
        self.chunk_size = chunk_size
        self.block_size = block_size
        self.tasks: list[MemorableTask] = []  # one per kernel block: an experience's memory, or a block of it
        self.experiences: list[list[int]] = []  # per add_task call (an experience): the indices of its blocks
        self.version = 0  # counts re-anchorings (SagaGradient's table is then stale)
        self._curvatures: list[Tensor | None] = []  # per task: diag(J^T K^-1 J) at its anchor, when asked
        self._inputs: Tensor | None = None  # all memories, concatenated
        self._mask: Tensor | None = None

    def __len__(self) -> int:
        """The number of kernel blocks (of experiences, without ``block_size``); 0 before any task."""
        return len(self.tasks)

    @torch.no_grad()
    def _memorable_task(
        self, model: nn.Module, posterior: DiagonalGaussian, x: Tensor, class_mask: Tensor | None
    ) -> MemorableTask:
        """X_s, m_s = p(mu, X_s) and K_s^{-1} under ``posterior``; Jacobians computed here, once."""
        num = sum(p.numel() for _, p in trainable_parameters(model))
        if posterior.mean.ndim != 1 or posterior.mean.numel() != num:
            raise ValueError(f"posterior has {posterior.mean.numel()} parameters, model has {num} trainable ones")
        if x.shape[0] == 0:
            raise ValueError("memory has no examples")
        x = x.detach()
        logits = model_outputs(model, x, params=posterior.mean.detach())
        if class_mask is None:
            class_mask = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
        check_class_mask(class_mask, tuple(logits.shape))
        if self.tasks and logits.shape[1] != self.tasks[0].probs.shape[1]:
            raise ValueError("all memories must have the same number of classes")
        with torch.enable_grad():
            kernel = fromp_kernel(
                model,
                posterior,
                x=x,
                form=self.kernel,
                class_mask=class_mask,
                eps=self.eps,
                chunk_size=self.chunk_size,
            )
        return MemorableTask(
            inputs=x,
            class_mask=class_mask.clone(),
            probs=masked_softmax(logits, class_mask),
            kernel=kernel,
            kernel_inverse=None if kernel is None else _inverse(kernel),
            anchor=posterior.mean.detach().clone(),
        )

    def add_task(
        self,
        model: nn.Module,
        posterior: DiagonalGaussian,
        x: Tensor,
        *,
        class_mask: Tensor | None = None,
    ) -> list[MemorableTask]:
        """Store memory X_s with m_s = p(mu_s, X_s) and K_s^{-1} under the posterior of experience s.

        Returns the stored blocks: one, or ceil(M / block_size) with ``block_size``; block b
        holds the points b, b + B, b + 2B, ... of ``x``.
        """
        n = x.shape[0]
        count = 1 if self.block_size is None or n <= self.block_size else -(-n // self.block_size)
        added = []
        for b in range(count):
            rows = slice(b, None, count)
            mask = None if class_mask is None else class_mask[rows]
            added.append(self._memorable_task(model, posterior, x[rows], mask))
        self.experiences.append(list(range(len(self.tasks), len(self.tasks) + count)))
        self.tasks += added
        self._curvatures += [None] * count
        self._inputs = torch.cat([t.inputs for t in self.tasks])
        self._mask = torch.cat([t.class_mask for t in self.tasks])
        return added

    def draw_blocks(self, count: int, generator: torch.Generator | None = None) -> list[int]:
        """``count`` distinct block indices, uniformly at random (all of them if count >= len(self))."""
        check_positive_int("count", count)
        if count >= len(self.tasks):
            return list(range(len(self.tasks)))
        return torch.randperm(len(self.tasks), generator=generator)[:count].sort().values.tolist()

    def draw(
        self, count: int, generator: torch.Generator | None = None, *, per_experience: bool = False
    ) -> tuple[list[int], list[float]]:
        """(blocks, weights) for one step's unbiased estimate sum_b weight_b * term_b of the blocked term.

        Uniform: ``count`` of the n blocks (``draw_blocks``), each weighted n / count.
        ``per_experience``: ``count`` of each experience's q blocks, weighted q / count, so that
        every past experience's function is held at every step (stratified sampling).
        """
        check_positive_int("count", count)
        if not per_experience:
            blocks = self.draw_blocks(count, generator)
            return blocks, [len(self.tasks) / len(blocks)] * len(blocks)
        blocks, weights = [], []
        for group in self.experiences:
            k = min(count, len(group))
            picks = range(len(group)) if k == len(group) else torch.randperm(len(group), generator=generator)[:k]
            blocks += sorted(group[int(i)] for i in picks)
            weights += [len(group) / k] * k
        return blocks, weights

    def reanchor(self, model: nn.Module, posterior: DiagonalGaussian) -> None:
        """Recompute every stored task's m_s and K_s^{-1} under ``posterior`` (FROMP's m_{t-1,s}, K_{t-1,s}).

        FROMP's objective at experience t regularises towards the predictions of the
        latest posterior q_{t-1} at every past memory, with q_{t-1}'s covariance in the
        kernel, instead of keeping each task's values from the end of its own experience.
        """
        old, self.tasks = self.tasks, []
        self.version += 1
        for task in old:
            self.tasks.append(self._memorable_task(model, posterior, task.inputs, task.class_mask))
        self._curvatures = [None] * len(self.tasks)

    def curvature(self, model: nn.Module, *, at: Tensor | None = None) -> Tensor:
        """diag of R's Hessian at the anchors: tau * sum_s diag(J_s^T K_s^{-1} J_s), flat (P,).

        ``at``: the same Gauss-Newton diagonal with every J_s at these flat weights instead of the
        task's anchor (not cached): where the term is stiff once the weights have moved.

        At its anchor mu_s a task's residual is zero, so there the Hessian of
        tau/2 r^T K^-1 r is exactly its Gauss-Newton part tau J_s^T K_s^{-1} J_s (J_s of the
        softmax outputs at mu_s). It is the term's stiffness in weight space, large where
        the old posterior was certain about the memorable outputs. Computed once per task
        (cached until ``reanchor``): one more Jacobian pass over the memory, and
        O(M^2 C' P) flops for the block kernel.
        """
        total = None
        for s, task in enumerate(self.tasks):
            if at is not None:
                part = _task_curvature(model, task, self.kernel, self.chunk_size, at=at)
            else:
                if self._curvatures[s] is None:
                    self._curvatures[s] = _task_curvature(model, task, self.kernel, self.chunk_size)
                part = self._curvatures[s]
            total = part.clone() if total is None else total.add_(part)
        if total is None:
            num = sum(p.numel() for _, p in trainable_parameters(model))
            return torch.zeros(num, device=next(iter(model.parameters())).device)
        return total.mul_(self.tau)

    def residuals(
        self, model: nn.Module, params: dict[str, Tensor] | None = None, *, blocks: list[int] | None = None
    ) -> list[Tensor]:
        """r_s = m_s(w) - m_s per block (all, or those in ``blocks``), from one forward pass.

        ``params`` ({name: tensor}) evaluates the network at other weights (``functional_call``).
        """
        if not self.tasks:
            return []
        if blocks is None:
            tasks, inputs, mask = self.tasks, self._inputs, self._mask
        else:
            tasks = [self.tasks[b] for b in blocks]
            inputs = torch.cat([t.inputs for t in tasks])
            mask = torch.cat([t.class_mask for t in tasks])
        logits = model(inputs) if params is None else functional_call(model, params, (inputs,))
        probs = masked_softmax(logits, mask)
        sizes = [t.inputs.shape[0] for t in tasks]
        return [p - t.probs for p, t in zip(probs.split(sizes), tasks, strict=True)]

    def block_terms(
        self, model: nn.Module, blocks: list[int] | None = None, *, params: dict[str, Tensor] | None = None
    ) -> list[Tensor]:
        """tau/2 r_b^T K_b^{-1} r_b for each block (all, or ``blocks``), from one forward pass.

        K_b^{-1} is fixed and symmetric, so the gradient of r^T K^{-1} r / 2 w.r.t. r is
        v = K^{-1} r. One product per block, on the detached residual, gives the value and that
        gradient: r . v - r_detached . v / 2 has value r^T K^{-1} r / 2 and gradient v, and
        autograd never multiplies by K^{-1} again (half the kernel traffic of differentiating
        the product). Its first derivatives are exact; its second derivatives are not R's.
        """
        tasks = self.tasks if blocks is None else [self.tasks[b] for b in blocks]
        out = []
        for r, t in zip(self.residuals(model, params, blocks=blocks), tasks, strict=True):
            fixed = r.detach()
            v = apply_kernel_inverse(fixed, t.kernel_inverse, self.kernel)
            out.append(self.tau * ((r * v).sum() - 0.5 * (fixed * v).sum()))
        return out

    def _check_blocks(self, blocks: list[int]) -> None:
        if not blocks or len(set(blocks)) != len(blocks) or not all(0 <= b < len(self.tasks) for b in blocks):
            raise ValueError(f"blocks must be distinct indices in [0, {len(self.tasks)}), got {blocks!r}")

    def __call__(
        self, model: nn.Module, params: dict[str, Tensor] | None = None, *, blocks: list[int] | None = None,
        weights: list[float] | None = None,
    ) -> Tensor:
        """The term over all blocks, or its estimate over ``blocks``: sum_b weight_b term_b.

        Without ``weights`` each drawn block weighs len(self) / len(blocks) (unbiased for uniform
        draws); ``draw`` returns the weights of its draws.
        """
        if not self.tasks:
            param = next(iter(model.parameters()))
            return param.new_zeros(())
        if blocks is None:
            return sum(self.block_terms(model, params=params))
        self._check_blocks(blocks)
        if weights is None:
            weights = [len(self.tasks) / len(blocks)] * len(blocks)
        if len(weights) != len(blocks):
            raise ValueError(f"{len(weights)} weights for {len(blocks)} blocks")
        tasks = [self.tasks[b] for b in blocks]
        if self.kernel != "identity" and len({t.inputs.shape[0] for t in tasks}) == 1:
            return self._batched_sum(model, tasks, weights, params)
        return sum(w * t for w, t in zip(weights, self.block_terms(model, blocks, params=params), strict=True))

    def _batched_sum(
        self, model: nn.Module, tasks: list[MemorableTask], weights: list[float], params: dict[str, Tensor] | None
    ) -> Tensor:
        """sum_b weight_b tau/2 r_b^T K_b^{-1} r_b for blocks of one size: one batched kernel product.

        The same value and gradient as ``block_terms`` (r . v - r_detached . v / 2 with v = K^{-1} r
        detached), without a Python loop over the blocks: what a sampled step draws (equal blocks
        of every experience) costs one forward pass and one batched kernel product.
        """
        inputs = torch.cat([t.inputs for t in tasks])
        mask = torch.cat([t.class_mask for t in tasks])
        logits = model(inputs) if params is None else functional_call(model, params, (inputs,))
        n, size = len(tasks), tasks[0].inputs.shape[0]
        r = (masked_softmax(logits, mask) - torch.cat([t.probs for t in tasks])).view(n, size, -1)
        fixed = r.detach()
        v = apply_kernel_inverse(fixed, torch.stack([t.kernel_inverse for t in tasks]), self.kernel)
        w = torch.tensor(weights, dtype=r.dtype, device=r.device).view(n, 1, 1)
        return self.tau * (w * (r * v - 0.5 * fixed * v)).sum()


class SagaGradient:
    """The term's gradient from ``blocks_per_step`` blocks per step, unbiased, with SAGA's variance reduction.

    Defazio, Bach & Lacoste-Julien (NeurIPS 2014). A table keeps each block's gradient when
    it was last evaluated, g_b; a step draws n of the B blocks and returns

        sum_b g_b + B / n * sum_{b drawn} (grad_b(w) - g_b),        then g_b <- grad_b(w),

    whose expectation over the draw is sum_b grad_b(w), the exact (blocked) gradient, and
    whose variance vanishes as the weights settle (plain B / n scaling, ``FunctionalPrior(blocks=)``,
    has the variance of the blocks' spread). Measured: it does not make the sampled term
    usable; on split MNIST it collapses, also with the random-gain curvature scale: its table's
    stale gradients are a delayed feedback that the per-step analysis does not cover
    (docs/BISECTION.md, steps 4 and 8). The plugin's default is the weighted draw instead.
    A block enters the table with g_b = 0, exact at its anchor,
    where the residual is zero; ``reanchor`` (new anchors at the current weights) zeroes the
    table again. The value returned is the same estimator applied to the block values.
    Memory: one flat gradient per block (B x P floats).
    """

    def __init__(
        self, prior: FunctionalPrior, *, blocks_per_step: int, generator: torch.Generator | None = None,
        per_experience: bool = False,
    ):
        check_positive_int("blocks_per_step", blocks_per_step)
        self.prior = prior
        self.blocks_per_step = blocks_per_step
        self.per_experience = bool(per_experience)  # blocks_per_step of each experience's blocks (FunctionalPrior.draw)
        self.generator = generator
        self._grads: Tensor | None = None  # (B, P)
        self._values: Tensor | None = None  # (B,)
        self._sum: Tensor | None = None  # (P,): sum_b g_b, kept up to date (not re-summed per step)
        self._version = -1

    def _sync(self, num_params: int, like: Tensor) -> None:
        count = len(self.prior)
        if self._version != self.prior.version or self._grads is None:  # re-anchored (or first use): all at anchor
            self._grads = like.new_zeros((count, num_params))
            self._values = like.new_zeros(count)
            self._sum = like.new_zeros(num_params)
            self._version = self.prior.version
        elif self._grads.shape[0] < count:  # new blocks, at their anchor
            extra = count - self._grads.shape[0]
            self._grads = torch.cat([self._grads, like.new_zeros((extra, num_params))])
            self._values = torch.cat([self._values, like.new_zeros(extra)])

    def __call__(self, model: nn.Module, params: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(value, flat gradient w.r.t. ``params``), estimated as above; zeros before any task."""
        num = sum(p.numel() for p in params)
        if not len(self.prior):
            return params[0].new_zeros(()), params[0].new_zeros(num)
        self._sync(num, params[0].detach())
        drawn, scales = self.prior.draw(self.blocks_per_step, self.generator, per_experience=self.per_experience)
        terms = self.prior.block_terms(model, drawn)
        grad = self._sum.clone()
        value = self._values.sum()
        for i, (b, term, scale) in enumerate(zip(drawn, terms, scales, strict=True)):
            parts = torch.autograd.grad(term, params, retain_graph=i + 1 < len(terms), allow_unused=True)
            new = torch.cat([torch.zeros_like(p).reshape(-1) if g is None else g.reshape(-1)
                             for p, g in zip(params, parts, strict=True)])
            change = new - self._grads[b]
            grad.add_(change, alpha=scale)
            self._sum.add_(change)
            value = value + scale * (term.detach() - self._values[b])
            self._grads[b] = new
            self._values[b] = term.detach()
        return value, grad


class RefreshedGradient:
    """The term's gradient evaluated exactly every ``refresh_every`` steps, linearised in between.

    At a refresh step r the term is evaluated at the current weights w_r (value R_r,
    gradient g_r: one forward and backward pass over every memorable point). At the
    following steps, with d = w - w_r and c the term's diagonal curvature (the
    ``curvature`` passed in: ``FunctionalPrior.curvature``, the Hessian's diagonal at the
    anchors, which IVON's mean step already divides by):

        grad R(w) ~ g_r + c * d,        R(w) ~ R_r + g_r . d + d . (c * d) / 2,

    the exact gradient and value of a quadratic model of R around w_r with that diagonal
    Hessian. Between refreshes the term is therefore a quadratic whose curvature is the
    one in the preconditioner (a step along it is a damped Newton step, stable), unlike a
    sampled block scaled by B / n (``SagaGradient``, step 4 of docs/BISECTION.md), whose
    stiffness exceeds the preconditioner's. The error is second order in d plus what the
    diagonal misses of the Hessian; ``refresh_every = 1`` is the exact term. A new task,
    a re-anchoring (``prior.version``) or a change of the parameter count forces a refresh.
    Cost between refreshes: a few element-wise operations on the flat weights.
    """

    def __init__(self, prior: FunctionalPrior, *, refresh_every: int):
        check_positive_int("refresh_every", refresh_every)
        self.prior = prior
        self.refresh_every = refresh_every
        self._since = 0  # steps since the last refresh
        self._key: tuple[int, int, int] | None = None  # (tasks, version, P) at the last refresh
        self._weights: Tensor | None = None  # w_r, flat
        self._grad: Tensor | None = None  # g_r, flat
        self._value: Tensor | None = None  # R_r

    def _due(self, key: tuple[int, int, int]) -> bool:
        return self._key != key or self._since >= self.refresh_every

    def __call__(self, model: nn.Module, params: list[Tensor], curvature: Tensor | None) -> tuple[Tensor, Tensor]:
        """(value, flat gradient w.r.t. ``params``): exact at a refresh, the quadratic model otherwise.

        ``curvature``: flat, one entry per parameter (None or zeros: the stale gradient g_r).
        """
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        if not len(self.prior):
            return flat.new_zeros(()), torch.zeros_like(flat)
        key = (len(self.prior), self.prior.version, flat.numel())
        if self._due(key):
            value = self.prior(model)
            parts = torch.autograd.grad(value, params, allow_unused=True)
            self._grad = torch.cat([torch.zeros_like(p).reshape(-1) if g is None else g.reshape(-1)
                                    for p, g in zip(params, parts, strict=True)])
            self._weights, self._value, self._key, self._since = flat, value.detach(), key, 1
            return self._value, self._grad.clone()
        self._since += 1
        d = flat - self._weights
        if curvature is None:
            return self._value + self._grad @ d, self._grad.clone()
        if curvature.shape != flat.shape:
            raise ValueError(f"curvature must have {flat.numel()} entries, got {tuple(curvature.shape)}")
        cd = curvature * d
        return self._value + self._grad @ d + 0.5 * (d @ cd), self._grad + cd


@torch.no_grad()
def _task_curvature(
    model: nn.Module, task: MemorableTask, form: KernelForm, chunk_size: int | None, *, at: Tensor | None = None
) -> Tensor:
    """diag(J^T K^{-1} J) for one task, at its anchor (or the flat weights ``at``), in the layout of ``form``; (P,)."""
    kwargs = dict(params=task.anchor if at is None else at, output="probs", chunk_size=chunk_size)
    mask = task.class_mask
    out = torch.zeros_like(task.anchor)
    with torch.enable_grad():
        if form == "block":  # sum_c sum_ij K_c^-1[i, j] J_c(x_i) (.) J_c(x_j), class by class
            for c in torch.nonzero(mask.any(dim=0)).flatten().tolist():
                only = torch.zeros(mask.shape[1], dtype=torch.bool, device=mask.device)
                only[c] = True
                rows = class_jacobian_rows(model, task.inputs, used=only, class_mask=mask, **kwargs)[:, 0]
                out += (rows * (task.kernel_inverse[c] @ rows)).sum(0)
            return out
        for s, jac in iter_jacobian_chunks(model, task.inputs, class_mask=mask, **kwargs):
            if form == "full":  # points independent: sum_i J_i^T K_i^-1 J_i
                out += torch.einsum("ncp,ncd,ndp->p", jac, task.kernel_inverse[s], jac)
            else:  # identity
                out += jac.square().sum((0, 1))
    return out


def term_ggn_product(
    prior: FunctionalPrior, model: nn.Module, v: Tensor, *, at: Tensor | None = None, blocks: list[int] | None = None,
    weights: list[float] | None = None,
) -> Tensor:
    """A v with A = tau sum_s J_s^T K_s^{-1} J_s, the term's Gauss-Newton matrix at the anchors; flat (P,).

    ``at``: the Jacobians at these flat weights instead of each task's anchor. ``blocks``: the sum
    over these kernel blocks only (A_b of one drawn block, for the sampled term's stiffness), each
    times its entry of ``weights`` (default 1).

    ``curvature`` is diag(A). Per task one forward-mode product J_s v (a JVP of the memory's
    softmax outputs at the task's anchor) and one reverse-mode product J_s^T u: two passes
    over the memory, nothing of size P x M stored.
    """
    from torch.func import jvp, vjp

    from cl_bayes.jacobians import unflatten

    out = torch.zeros_like(v)
    tasks = prior.tasks if blocks is None else [prior.tasks[b] for b in blocks]
    weights = [1.0] * len(tasks) if weights is None else weights
    for task, weight in zip(tasks, weights, strict=True):
        mask = task.class_mask

        def probs(flat: Tensor, task=task, mask=mask) -> Tensor:
            return masked_softmax(functional_call(model, unflatten(model, flat), (task.inputs,)), mask)

        point = task.anchor if at is None else at
        with warnings.catch_warnings():  # torch's forward-mode AD scripts its decompositions once
            warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
            _, jv = jvp(probs, (point,), (v,))
        u = apply_kernel_inverse(jv * mask, task.kernel_inverse, prior.kernel) * mask
        _, pullback = vjp(probs, point)
        out.add_(pullback(u)[0], alpha=weight)
    return out.mul_(prior.tau)


def block_quadratic_forms(prior: FunctionalPrior, model: nn.Module, v: Tensor) -> Tensor:
    """v^T A_b v for every kernel block b, (n_blocks,): tau (J_b v)^T K_b^{-1} (J_b v), J_b at the block's anchor.

    Forward mode only: one JVP per experience (its blocks share the anchor) over its memory, then
    each block's quadratic form with its inverse kernel; no reverse pass, nothing of size P x M.
    """
    from torch.func import jvp

    from cl_bayes.jacobians import unflatten

    out = torch.zeros(len(prior.tasks), dtype=v.dtype, device=v.device)
    for group in prior.experiences:
        tasks = [prior.tasks[b] for b in group]
        inputs = torch.cat([t.inputs for t in tasks])
        mask = torch.cat([t.class_mask for t in tasks])

        def probs(flat: Tensor, inputs=inputs, mask=mask) -> Tensor:
            return masked_softmax(functional_call(model, unflatten(model, flat), (inputs,)), mask)

        with warnings.catch_warnings():  # torch's forward-mode AD scripts its decompositions once
            warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
            _, jv = jvp(probs, (tasks[0].anchor,), (v,))
        jv = jv * mask
        for b, t, part in zip(group, tasks, jv.split([t.inputs.shape[0] for t in tasks]), strict=True):
            out[b] = prior.tau * (part * apply_kernel_inverse(part, t.kernel_inverse, prior.kernel)).sum()
    return out


def preconditioned_stiffness(
    prior: FunctionalPrior, model: nn.Module, preconditioner: Tensor, *, iters: int = 30, seed: int = 0,
    at: Tensor | None = None, blocks: list[int] | None = None, weights: list[float] | None = None,
) -> float:
    """lambda_max(D^{-1} A) for A of ``term_ggn_product`` (over ``blocks``) and D = ``preconditioner`` (flat, > 0).

    Power iteration on the symmetric D^{-1/2} A D^{-1/2} from a seeded random start; 0 without tasks.
    A step m <- m - alpha D^{-1} grad on the term alone is stable along A's stiffest direction only
    while alpha * lambda_max stays below the momentum's bound (``stable_curvature_scale``).
    """
    return _top_mode(prior, model, preconditioner, iters=iters, seed=seed, at=at, blocks=blocks, weights=weights)[0]


def _top_mode(
    prior: FunctionalPrior, model: nn.Module, preconditioner: Tensor, *, iters: int, seed: int,
    at: Tensor | None = None, blocks: list[int] | None = None, weights: list[float] | None = None,
) -> tuple[float, Tensor]:
    """(lambda_max, its unit eigenvector) of D^{-1/2} A D^{-1/2} by power iteration; (0, x0) without tasks."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(preconditioner.shape, generator=g).to(preconditioner)
    x /= x.norm()
    if not prior.tasks:
        return 0.0, x
    if not (preconditioner > 0).all():
        raise ValueError("the preconditioner must be positive")
    root = preconditioner.rsqrt()
    value = 0.0
    with torch.no_grad():
        for _ in range(iters):
            y = root * term_ggn_product(prior, model, root * x, at=at, blocks=blocks, weights=weights)
            value = float(x @ y)
            norm = y.norm()
            if not norm > 0:
                return 0.0, x
            x = y / norm
    return value, x


def random_gain_stiffness(mean: float, second_moment: float, beta1: float) -> float:
    """The deterministic-equivalent stiffness of a momentum step whose gain G along a mode is random.

    One mode, x = (m, u): u' = beta1 u + (1 - beta1) G m, m' = m - u', i.e. x' = (M0 + G N) x.
    In mean square E[x x^T] evolves by E[(M0 + G N) (x) (M0 + G N)] = M0 (x) M0 + E[G] (M0 (x) N
    + N (x) M0) + E[G^2] N (x) N, so stability depends on the gain's mean and second moment only.
    Returns bound / kappa, kappa the largest factor for which the gains kappa G keep the spectral
    radius below 1 and bound = ``momentum_stability_bound``: a constant gain g gives g, and any
    spread makes the step stiffer than its mean (a block drawn 1 step in q and scaled by q: 38 q /
    ``sampled_stability_bound``). 0 for a zero gain.
    """
    bound = momentum_stability_bound(beta1)
    if not mean >= 0 or second_moment < mean * mean * (1 - 1e-9):
        raise ValueError(f"need mean >= 0 and second moment >= mean^2, got {mean}, {second_moment}")
    if mean == 0.0 and second_moment == 0.0:
        return 0.0
    if second_moment <= mean * mean * (1 + 1e-12):
        return mean
    m0 = torch.tensor([[1.0, -beta1], [0.0, beta1]], dtype=torch.float64)
    n = torch.tensor([[-(1.0 - beta1), 0.0], [1.0 - beta1, 0.0]], dtype=torch.float64)
    cross = torch.kron(m0, n) + torch.kron(n, m0)

    def radius(kappa: float) -> float:
        second = torch.kron(m0, m0) + kappa * mean * cross + kappa * kappa * second_moment * torch.kron(n, n)
        return float(torch.linalg.eigvals(second).abs().max())

    high = bound / mean if mean > 0 else bound / second_moment ** 0.5  # unstable: the mean alone is at the bound
    low = high / 2.0
    while radius(low) >= 1.0:  # bracket: halve until stable (the spread can push kappa far below bound / mean)
        high, low = low, low / 2.0
        if low < 1e-300:
            raise ValueError(f"no stable gain scale for mean {mean}, second moment {second_moment}")
    for _ in range(50):
        mid = (low * high) ** 0.5
        if radius(mid) < 1.0:
            low = mid
        else:
            high = mid
    return bound / low


def momentum_stability_bound(beta1: float) -> float:
    """The largest alpha * lambda for which m <- m - alpha g, g <- beta1 g + (1 - beta1) lambda m is stable.

    The characteristic polynomial z^2 - (1 + beta1 - alpha (1 - beta1) lambda) z + beta1 has both
    roots inside the unit circle iff alpha * lambda < 2 (1 + beta1) / (1 - beta1) (38 at beta1 0.9).
    """
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"beta1 must be in [0, 1), got {beta1}")
    return 2.0 * (1.0 + beta1) / (1.0 - beta1)


def sampled_stability_bound(beta1: float, q: float) -> float:
    """The largest per-draw alpha * lambda for which the momentum step stays stable in mean square when the
    term's gain is q * lambda with probability 1 / q and 0 otherwise (a block drawn 1 in q steps, scaled by q).

    The gain G = q lambda 1 step in q has mean lambda and second moment q lambda^2, so by
    ``random_gain_stiffness`` the step is as stiff as a fixed gain r lambda, r = ``random_gain_stiffness(1, q)``,
    and stable while r lambda alpha < bound: the per-draw bound is q * bound / r. q = 1 is
    ``momentum_stability_bound`` (38 at beta1 0.9); a random gain is far less forgiving: 3.8 at
    q = 2, 2.6 at q = 4, towards 2 as q grows (momentum averages the gain but cannot undo its
    spread). Measured: a sampled term tuned to the deterministic bound drifted and exploded on
    split MNIST (docs/BISECTION.md, step 8).
    """
    bound = momentum_stability_bound(beta1)
    if not q >= 1.0:
        raise ValueError(f"q must be >= 1, got {q}")
    if q == 1.0:
        return bound
    return q * bound / random_gain_stiffness(1.0, float(q), beta1)


def stable_curvature_scale(
    prior: FunctionalPrior,
    model: nn.Module,
    *,
    base: Tensor,
    curvature: Tensor,
    step_size: float,
    beta1: float,
    margin: float = 4.0,
    iters: int = 20,
    seed: int = 0,
    blocks_per_step: int | None = None,
    per_experience: bool = False,
) -> tuple[float, float, float]:
    """(gamma, s_1, s_gamma): the least gamma >= 1 with s_gamma <= bound / ``margin``, where
    s_gamma = step_size * lambda_max((base + gamma c)^{-1} A) and bound = ``momentum_stability_bound``.

    The mean's step divides the term's gradient by ``base + c`` (IVON's h + delta plus
    ``curvature`` c = diag(A)). A diagonal c can be far below the dense, low-rank A in
    A's stiffest direction (lambda_max(c^{-1} A) is ~1e4 for FROMP's term on split MNIST),
    so a step size that is stable at the term's diagonal can still excite that direction:
    s_gamma grows past the bound and the term explodes within a few steps (docs/BISECTION.md,
    step 7). Scaling c by gamma changes only the preconditioner, not the objective or its
    minimum. ``margin`` leaves room for the stiffness to grow as the weights leave the
    anchors (measured: up to 1.8x within an experience). gamma is found by doubling, then
    bisection on log gamma (6 halvings); each s is a power iteration of ``iters`` products.

    ``blocks_per_step`` k (the sampled term: the drawn blocks' sum weighted by ``FunctionalPrior.draw``,
    uniformly k of the n blocks or, with ``per_experience``, k of each experience's q_e blocks): a
    step's term is then a random matrix whose mean is A, and a gain that changes from step to step is
    less stable than its mean (``random_gain_stiffness``; a block drawn 1 step in q and scaled by q
    needs a per-draw stiffness below ``sampled_stability_bound``, 3.8 at q = 2 instead of 38).
    Along a mode u each block b has the gain g_b = step * u^T D^{-1/2} A_b D^{-1/2} u; the step's
    gain is the Horvitz-Thompson sum of its draw, whose mean and variance (sampling without
    replacement within each group, independent groups) give s = ``random_gain_stiffness``. The
    modes checked are A's stiffest and those of the draws taking the j-th block of every group
    (j < 2), each by power iteration; s is the largest. The target is the same bound / ``margin``.
    Measured: tuned to A's stiffness alone, a sampled term drifted and exploded on split MNIST
    (docs/BISECTION.md, step 8).
    """
    if not margin >= 1.0:
        raise ValueError(f"margin must be >= 1, got {margin}")
    if not step_size > 0:
        raise ValueError(f"step_size must be positive, got {step_size}")
    target = momentum_stability_bound(beta1) / margin
    if blocks_per_step is not None:
        check_positive_int("blocks_per_step", blocks_per_step)
    groups = [list(g) for g in prior.experiences] if per_experience else [list(range(len(prior)))]
    sampled = blocks_per_step is not None and bool(prior.tasks) and any(blocks_per_step < len(g) for g in groups)
    if sampled:  # the draws whose stiffest modes are checked: the j-th block of every group, j < 2
        weights = [len(g) / min(blocks_per_step, len(g)) for g in groups]
        draws = [[g[j % len(g)] for g in groups] for j in range(min(2, max(len(g) for g in groups)))]

    def stiffness(gamma: float) -> float:
        preconditioner = base + gamma * curvature
        top, mode = _top_mode(prior, model, preconditioner, iters=iters, seed=seed)
        if not sampled:
            return step_size * top
        modes = [mode] + [
            _top_mode(prior, model, preconditioner, iters=iters, seed=seed, blocks=blocks, weights=weights)[1]
            for blocks in draws
        ]
        root = preconditioner.rsqrt()
        worst = 0.0
        for u in modes:
            mean = variance = 0.0
            with torch.no_grad():
                forms = step_size * block_quadratic_forms(prior, model, root * u).double()
            for g in groups:
                gains = forms[g]
                q, k = len(g), min(blocks_per_step, len(g))
                mean += float(gains.sum())  # E[q / k sum_{drawn} g_b] = sum_b g_b
                if q > 1:
                    variance += q * q * (1.0 - k / q) * float(gains.var()) / k
            worst = max(worst, random_gain_stiffness(max(mean, 0.0), max(mean, 0.0) ** 2 + variance, beta1))
        return worst

    first = stiffness(1.0)
    if first <= target:
        return 1.0, first, first
    low, high = 1.0, 2.0 if not sampled else max(2.0, first / target)  # sampled: s ~ 1 / gamma, jump there
    value = stiffness(high)
    while value > target:
        low, high = high, high * (2.0 if not sampled else max(2.0, value / target))
        if high > 1e8:
            raise ValueError("the term's curvature cannot make its step stable (is c zero in A's stiff directions?)")
        value = stiffness(high)
    for _ in range(6):
        mid = (low * high) ** 0.5
        s_mid = stiffness(mid)
        if s_mid > target:
            low = mid
        else:
            high, value = mid, s_mid
    return high, first, value


def secant_stiffness(*, step_size: float, step: Tensor, gradient_change: Tensor, preconditioner: Tensor) -> float:
    """step_size * (dw . dg) / (dw . D dw): the term's stiffness along the mean's last step dw, from two gradients.

    dg is the change of the term's gradient over that step, so dw . dg = dw^T H dw for the term's
    Hessian H averaged along the step: the full Hessian (the softmax's own curvature and the
    ReLUs' kinks included), not the Gauss-Newton matrix at the anchors that
    ``stable_curvature_scale`` bounds. A Rayleigh quotient of D^{-1/2} H D^{-1/2}, so it is at most
    the stiffest mode's value; negative along directions where the term is concave. 0 for dw = 0.
    """
    weighted = float(step @ (preconditioner * step))
    if not weighted > 0:
        return 0.0
    return step_size * float(step @ gradient_change) / weighted


def restabilising_scale(
    *, gamma: float, stiffness: float, target: float, base_form: float, curvature_form: float
) -> float:
    """The gamma' >= gamma that brings a step's secant stiffness down to ``target``.

    With b = dw . base dw and c = dw . curvature dw the step's stiffness is s = step * (dw . dg) /
    (b + gamma c); the preconditioner base + gamma' c gives s (b + gamma c) / (b + gamma' c), which
    is ``target`` at gamma' = (s / target (b + gamma c) - b) / c. gamma itself when s <= target or
    when the curvature is zero along the step (c = 0: the scale cannot reach it).
    """
    if not target > 0:
        raise ValueError(f"target must be positive, got {target}")
    if stiffness <= target or not curvature_form > 0:
        return gamma
    return max(gamma, (stiffness / target * (base_form + gamma * curvature_form) - base_form) / curvature_form)


def regulariser_gradient(prior: FunctionalPrior, model: nn.Module) -> Tensor:
    """Flat gradient of ``prior(model)`` w.r.t. the trainable parameters (one backward)."""
    params = [p for _, p in trainable_parameters(model)]
    loss = prior(model)
    if not loss.requires_grad:
        return torch.cat([torch.zeros_like(p).reshape(-1) for p in params])
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat(
        [torch.zeros_like(p).reshape(-1) if g is None else g.reshape(-1) for p, g in zip(params, grads, strict=True)]
    )


def reference_gradient_jacobian_loop(prior: FunctionalPrior, model: nn.Module) -> Tensor:
    """Reference: ``tau sum_s J_s^T K_s^{-1} r_s`` with one backward pass per output.

    Builds the Jacobian row d p_c(w, x_i) / d w of every allowed output of every
    memory point explicitly (M C backward passes; the cost FROMP avoids by
    differentiating the quadratic form directly). For tests and timing only.
    """
    params = [p for _, p in trainable_parameters(model)]
    grad = torch.cat([torch.zeros_like(p).reshape(-1) for p in params])
    for task in prior.tasks:
        probs = masked_softmax(model(task.inputs), task.class_mask)
        weights = apply_kernel_inverse((probs - task.probs).detach(), task.kernel_inverse, prior.kernel)
        for i, c in torch.nonzero(task.class_mask).tolist():
            rows = torch.autograd.grad(probs[i, c], params, retain_graph=True, allow_unused=True)
            jac_row = torch.cat(
                [
                    torch.zeros_like(p).reshape(-1) if g is None else g.reshape(-1)
                    for p, g in zip(params, rows, strict=True)
                ]
            )
            grad = grad + weights[i, c] * jac_row
    return prior.tau * grad
