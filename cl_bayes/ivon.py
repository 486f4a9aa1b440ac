"""IVON: Improved Variational Online Newton, written from the paper's equations.

Shen et al., "Variational Learning is Effective for Large Deep Networks", ICML 2024,
Algorithm 1, generalised to a Gaussian prior N(m0, diag(1 / prior_precision)) with a
per-parameter mean and precision.

The posterior is q = N(m, diag(sigma^2)) with

    sigma^2 = 1 / (lambda * (h + delta)),      delta = prior_precision / lambda,

where lambda is the effective sample size ``ess`` (the training-set size for a Bayesian
posterior), h is the per-example Hessian estimate and delta is the prior precision *per
example*. One step, for a loss that is the *mean* over a mini-batch:

    for i in 1..S (mc_samples):
        eps_i ~ N(0, sigma^2);  g_i = grad at theta = m + eps_i;  hhat_i = g_i * eps_i / sigma^2
    ghat, hhat = averages over the S samples
    g <- beta1 g + (1 - beta1) ghat                                           (momentum)
    h <- beta2 h + (1 - beta2) hhat + 0.5 (1 - beta2)^2 (h - hhat)^2 / (h + delta)
    m <- m - alpha * clip((g / (1 - beta1^t) + delta (m - m0)) / (h + delta), clip_radius)

With m0 = 0 and delta = weight_decay this is the paper's (and ``ivon-opt``'s) update.
Conventions shared with ``ivon-opt`` 0.1.3 so that it can serve as a test oracle:

* ``rescale_lr``: alpha = lr * (hess_init + weight_decay) (the constructor's values of the
  parameter group), so the first steps have size ~lr whatever hess_init is;
* ``debias``: the momentum is divided by 1 - beta1^t (t counts all steps); off: by 1;
* ``clip_radius``: element-wise clipping of the preconditioned direction;
* the noise is drawn group by group, one ``normal_`` call per parameter group, from the
  global torch generator.

The prior. ``weight_decay`` is delta at construction: the prior starts as N(0, 1 / (ess *
weight_decay)). After that the prior is held as (``prior_mean``, ``prior_precision``),
*total* precision, and ``set_prior`` changes it. Setting ``ess`` keeps ``prior_precision``
fixed, so delta = prior_precision / ess changes, and the posterior precision
ess * (h + delta) = ess * h + prior_precision weighs the prior the same whatever the size
of the data set. (A group's ``weight_decay`` is afterwards used only for ``rescale_lr``.)

Storage. The trainable parameters (``requires_grad`` at construction, in the order given,
over all groups) become views into one flat tensor, the posterior mean. Hess, momentum and
prior are flat buffers in that order and live on the optimizer, *not* in ``self.state``,
so Avalanche's ``reset_optimizer``/``update_optimizer(reset_state=True)``, which replace
``self.state``, leave the whole posterior, the momentum and the step count intact. The
parameter set is fixed: a parameter whose size changes, or a new trainable parameter in
the groups, raises a ValueError at the next sampling. This module is pure torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from cl_bayes.ivon_fused import fused_group_update
from cl_bayes.posterior import DiagonalGaussian

__all__ = [
    "IVON",
    "hessian_estimate",
    "hessian_update",
    "mean_update",
    "momentum_update",
    "posterior_std",
]


# --------------------------------------------------------------------------- equations
#
# One function per line of Algorithm 1. Each is pure by default (it allocates its result);
# the optimizer passes ``out`` (which may be the state being updated) and ``work`` (scratch
# tensors shaped like the inputs) so that a step allocates nothing: fresh multi-megabyte
# tensors cost page faults, which measured several times the arithmetic itself.

Work = tuple[Tensor, Tensor] | None


def posterior_std(hess: Tensor, delta: Tensor, ess: float, *, out: Tensor | None = None) -> Tensor:
    """sigma = 1 / sqrt(lambda * (h + delta)); a sample is m + eps with eps = sigma * z, z ~ N(0, I)."""
    return torch.add(hess, delta, out=out).mul_(ess).rsqrt_()


def hessian_estimate(grad_times_z: Tensor, sigma: Tensor, *, out: Tensor | None = None) -> Tensor:
    """hhat = g * eps / sigma^2 = g * z / sigma (reparametrisation/Price estimator)."""
    return torch.div(grad_times_z, sigma, out=out)


def momentum_update(g: Tensor, ghat: Tensor, beta1: float, *, out: Tensor | None = None) -> Tensor:
    """g <- beta1 g + (1 - beta1) ghat."""
    return torch.lerp(g, ghat, 1.0 - beta1, out=out)


def hessian_update(
    h: Tensor, hhat: Tensor, delta: Tensor, beta2: float, *, out: Tensor | None = None, work: Work = None
) -> Tensor:
    """h <- beta2 h + (1 - beta2) hhat + 0.5 (1 - beta2)^2 (h - hhat)^2 / (h + delta).

    The last term (the paper's Riemannian correction) keeps the precision positive: for any
    hhat, h' + delta >= (h + delta) / 2 > 0. (h itself can turn negative when delta > h.)
    beta2 = 1 freezes h.
    """
    w1, w2 = work if work is not None else (None, None)
    correction = torch.sub(h, hhat, out=w1).square_()
    h_plus_delta = torch.add(h, delta, out=w2)
    return torch.lerp(h, hhat, 1.0 - beta2, out=out).addcdiv_(correction, h_plus_delta, value=0.5 * (1.0 - beta2) ** 2)


def mean_update(
    m: Tensor,
    g: Tensor,
    h: Tensor,
    delta: Tensor,
    prior_mean: Tensor,
    lr: float,
    debias: float,
    clip_radius: float,
    *,
    curvature: Tensor | None = None,
    out: Tensor | None = None,
    work: Work = None,
) -> Tensor:
    """m <- m - lr * clip((g / debias + delta (m - m0)) / (h + delta + c), clip_radius).

    c (``curvature``, default 0) is the diagonal curvature of loss terms of the mean
    (``IVON.mean_curvature``). Computed as
    m - (lr / debias) * clip((g + debias delta (m - m0)) / (h + delta + c), debias * clip_radius),
    the same number with fewer passes over memory.
    """
    w1, w2 = work if work is not None else (None, None)
    numerator = torch.sub(m, prior_mean, out=w1)
    numerator = torch.addcmul(g, delta, numerator, value=debias, out=w1)
    h_plus_delta = torch.add(h, delta, out=w2)
    if curvature is not None:
        h_plus_delta.add_(curvature)
    if math.isfinite(clip_radius):
        direction = numerator.div_(h_plus_delta).clamp_(-debias * clip_radius, debias * clip_radius)
        return torch.sub(m, direction, alpha=lr / debias, out=out)
    return torch.addcdiv(m, numerator, h_plus_delta, value=-lr / debias, out=out)


# --------------------------------------------------------------------------- validation


def _check_hyperparameters(
    *,
    lr: float,
    hess_init: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    clip_radius: float,
    where: str = "",
) -> None:
    checks = [
        ("lr", lr, math.isfinite(lr) and lr >= 0.0, "a finite number >= 0"),
        ("hess_init", hess_init, math.isfinite(hess_init) and hess_init > 0.0, "a finite number > 0"),
        ("beta1", beta1, 0.0 <= beta1 < 1.0, "in [0, 1)"),
        ("beta2", beta2, 0.0 <= beta2 <= 1.0, "in [0, 1] (1 freezes the Hessian)"),
        ("weight_decay", weight_decay, math.isfinite(weight_decay) and weight_decay >= 0.0, "a finite number >= 0"),
        ("clip_radius", clip_radius, clip_radius > 0.0, "> 0 (inf: no clipping)"),
    ]
    for name, value, ok, expected in checks:
        if not ok:
            raise ValueError(f"IVON: {name} must be {expected}, got {value!r}{where}")


def _uniform_value(values: Tensor) -> float | None:
    """The common value of a 1-d tensor as a Python float, or None when its entries differ (0.0 if empty)."""
    if values.numel() == 0:
        return 0.0
    low, high = torch.aminmax(values)
    return float(low) if bool(low == high) else None


def _check_ess(ess: float) -> float:
    if isinstance(ess, bool) or not isinstance(ess, (int, float)) or not (math.isfinite(ess) and ess > 0):
        raise ValueError(f"IVON: ess (effective sample size) must be a finite number > 0, got {ess!r}")
    return float(ess)


# --------------------------------------------------------------------------- optimizer

_GROUP_KEYS = ("lr", "hess_init", "beta1", "beta2", "weight_decay", "clip_radius")


class IVON(torch.optim.Optimizer):
    """IVON with a diagonal Gaussian prior; see the module docstring for the maths.

    Training step (S = ``mc_samples``), by hand or with a closure::

        for _ in range(S):
            with opt.sampled_params(train=True):
                opt.zero_grad(); loss_fn(model(x), y).backward()
        opt.step()
        # or: opt.step(closure) with closure = zero_grad, forward, backward, return loss

    Bayesian model average: ``with torch.no_grad(), opt.sampled_params(): model(x)``, repeated.

    The loss must be the *mean* over the batch (ess supplies the data-set size). Construct with
    the ``ess`` of the first experience: the initial prior precision is ess * weight_decay, and
    a later ``opt.ess = n`` keeps that precision (use ``set_prior`` to choose it explicitly).
    Checkpoint the model's ``state_dict`` (the mean) together with this optimizer's.

    Speed options (both off by default): ``antithetic=True`` draws the noise in pairs z, -z (half
    the Gaussian draws, which are a third of a step on an MLP; it changes the results);
    ``fused=True`` runs the update as one compiled loop (``cl_bayes.ivon_fused``; the same results to
    float rounding, seconds of compilation once per process; falls back to this eager step with a
    warning where ``torch.compile`` is unavailable).
    """

    def __init__(
        self,
        params,
        *,
        lr: float,
        ess: float,
        hess_init: float = 1.0,
        beta1: float = 0.9,
        beta2: float = 0.99999,
        weight_decay: float = 1e-4,
        mc_samples: int = 1,
        clip_radius: float = math.inf,
        rescale_lr: bool = True,
        debias: bool = True,
        antithetic: bool = False,
        skip_zero_grad: bool = False,
        fused: bool = False,
    ) -> None:
        _check_hyperparameters(
            lr=lr, hess_init=hess_init, beta1=beta1, beta2=beta2, weight_decay=weight_decay, clip_radius=clip_radius
        )
        self._ess = _check_ess(ess)
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"IVON: mc_samples must be an integer >= 1, got {mc_samples!r}")
        self.mc_samples = mc_samples
        self.rescale_lr = bool(rescale_lr)
        self.debias = bool(debias)
        self.antithetic = bool(antithetic)
        self.skip_zero_grad = bool(skip_zero_grad)
        self.fused = bool(fused)  # the update as one compiled loop (cl_bayes.ivon_fused), where it applies
        self._flat: Tensor | None = None  # set last: add_param_group is closed from then on
        defaults = dict(
            lr=lr, hess_init=hess_init, beta1=beta1, beta2=beta2, weight_decay=weight_decay, clip_radius=clip_radius
        )
        super().__init__(params, defaults)
        self._build_layout()

    def add_param_group(self, param_group: dict) -> None:
        if self._flat is not None:
            raise RuntimeError("IVON: the flat posterior is fixed at construction; give all parameter groups then")
        for key in ("ess", "mc_samples"):
            if key in param_group:
                raise ValueError(f"IVON: {key} is global, not a per-group setting")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyperparameters(
            **{k: group[k] for k in _GROUP_KEYS}, where=f" (parameter group {len(self.param_groups) - 1})"
        )

    def _build_layout(self) -> None:
        params, group_of, slices, start = [], [], [], 0
        for gi, group in enumerate(self.param_groups):
            trainable = [p for p in group["params"] if p.requires_grad]
            params += trainable
            group_of += [gi] * len(trainable)
            end = start + sum(p.numel() for p in trainable)
            slices.append(slice(start, end))
            start = end
        if not params:
            raise ValueError("IVON: no parameter with requires_grad=True")
        if len({(p.dtype, p.device) for p in params}) > 1:
            raise ValueError("IVON: all parameters must share one dtype and one device")
        if not params[0].dtype.is_floating_point:
            raise ValueError(f"IVON: parameters must be floating point, got {params[0].dtype}")
        self._params: tuple[Tensor, ...] = tuple(params)
        self._group_of = tuple(group_of)
        self._group_slices: tuple[slice, ...] = tuple(slices)
        self._numels = tuple(p.numel() for p in params)
        self._offsets = tuple(sum(self._numels[:i]) for i in range(len(params)))
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        self._flat = flat
        for i in range(len(params)):
            self._link(i)
        self._hess = self._per_group("hess_init")
        self._hess_origin = self._hess.clone()  # h when it was last set, and the steps since (data_hess)
        self._hess_steps = 0
        self._hess_skipped = torch.zeros_like(flat)  # skip_zero_grad: steps since then that left h alone
        self._momentum = torch.zeros_like(flat)
        self._prior_mean = torch.zeros_like(flat)
        self._prior_precision = self._per_group("weight_decay").mul_(self._ess)
        self._step_count = 0
        # Per-step scratch (see "The fused step" in the module docstring). Two noise buffers: z is
        # drawn into ``_noise``; the first recorded sample turns it into g * z in place (unless
        # antithetic, which keeps z), and the two swap roles so the next draw cannot clobber it.
        self._noise = torch.empty_like(flat)
        self._gz = torch.empty_like(flat)
        self._sample = torch.empty_like(flat)  # m + sigma * z: the weights point here inside sampled_params
        self._grad_sum = torch.empty_like(flat)
        self._work = torch.empty_like(flat)  # a later sample's flat gradient
        self._root = torch.empty_like(flat)  # h + delta after a step, then r = sqrt(h + delta) once sampling
        self._root_state = "stale"  # "stale": recompute from h; "sum": holds h + delta; "root": holds r
        self._mean_views = [self._view(flat, i) for i in range(len(params))]
        self._sample_views = [self._view(self._sample, i) for i in range(len(params))]
        self._sign = 1.0  # the current sample's noise sign (antithetic: -1 for the second of a pair)
        self._gz_sign = 1.0  # the first recorded sample's sign: _gz holds it times sum_k sign_k g_k z_k
        self._negate_next = False  # antithetic: the next draw reuses -z
        self._gz_pending = False  # fused: the first sample's g * z is not formed yet (z still in _noise)
        self._count = 0
        self._active = [True] * len(params)
        self._mean_grad: Tensor | None = None  # add_mean_gradient's sum since the last step (allocated on use)
        self._has_mean_grad = False
        self._mean_curvature: Tensor | None = None  # c of the mean update (None: 0)
        self._sampling = False
        self._commit()

    def _per_group(self, key: str) -> Tensor:
        out = torch.empty_like(self._flat)
        for group, sl in zip(self.param_groups, self._group_slices, strict=True):
            out[sl] = group[key]
        return out

    def _view(self, buffer: Tensor, i: int) -> Tensor:
        """Parameter i's part of a flat buffer, shaped like the parameter."""
        return buffer[self._offsets[i] : self._offsets[i] + self._numels[i]].view(self._params[i].shape)

    def _link(self, i: int) -> None:
        """Make parameter i a view into the flat mean (copying its current value there)."""
        p = self._params[i]
        view = self._view(self._flat, i)
        if p.data_ptr() != view.data_ptr():
            view.copy_(p.detach())
            p.data = view
        if hasattr(self, "_mean_views"):  # a parameter reshaped in place keeps its numel: new views
            self._mean_views[i], self._sample_views[i] = view, self._view(self._sample, i)

    def _commit(
        self,
        *,
        hess: Tensor | None = None,
        prior_mean: Tensor | None = None,
        prior_precision: Tensor | None = None,
        ess: float | None = None,
    ) -> None:
        """The one place h, prior and ess change: validate, assign, recompute delta = prior_precision / ess."""
        if self._count:
            raise RuntimeError("IVON: gradient samples are pending; call step() before changing ess, hess or prior")
        ess = self._ess if ess is None else _check_ess(ess)
        new_hess = self._hess if hess is None else hess
        new_precision = self._prior_precision if prior_precision is None else prior_precision
        delta = new_precision / ess
        if not (new_hess + delta > 0).all():
            raise ValueError("IVON: hess + prior_precision / ess (the precision per example) must be > 0")
        if hess is not None:
            self._hess_origin.copy_(hess)
            self._hess_steps = 0
            self._hess_skipped.zero_()
        for buffer, value in (
            (self._hess, hess),
            (self._prior_mean, prior_mean),
            (self._prior_precision, prior_precision),
        ):
            if value is not None:
                buffer.copy_(value)
        self._ess, self._delta = ess, delta
        # Per group: delta as a Python number where it is uniform (the prior built from weight_decay),
        # else None; and whether the prior mean is 0 there. Both only save passes in the step.
        self._delta_scalar = tuple(_uniform_value(delta[sl]) for sl in self._group_slices)
        self._zero_prior_mean = tuple(not bool(self._prior_mean[sl].any()) for sl in self._group_slices)
        self._root_state = "stale"  # the noise scale is recomputed at the next sampling

    def _check_layout(self) -> None:
        """Fail loudly if the parameters changed; relink those whose storage was replaced."""
        trainable = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        if len(trainable) != len(self._params) or any(p is not q for p, q in zip(trainable, self._params, strict=True)):
            members = [{id(p) for p in group["params"]} for group in self.param_groups]
            moved = len(members) != len(self._group_slices) or any(
                id(p) not in members[gi] for p, gi in zip(self._params, self._group_of, strict=True)
            )
            if moved:
                raise ValueError("IVON: a parameter left its group; the flat posterior needs a fixed parameter set")
            known = {id(p) for p in self._params}
            new = [tuple(p.shape) for p in trainable if id(p) not in known]
            if new:
                raise ValueError(
                    f"IVON: new trainable parameter(s) of shapes {new} in the groups; "
                    "the flat posterior is fixed at construction"
                )
        for i, p in enumerate(self._params):
            if p.numel() != self._numels[i]:
                raise ValueError(
                    f"IVON: parameter {i} changed size from {self._numels[i]} to {p.numel()} elements; "
                    "IVON keeps flat posterior buffers, so heads must not grow (use fixed heads)"
                )
            if p.data_ptr() != self._flat.data_ptr() + self._offsets[i] * self._flat.element_size():
                if p.dtype != self._flat.dtype or p.device != self._flat.device:
                    raise ValueError("IVON: a parameter changed dtype or device; create a new optimizer")
                self._link(i)

    # ------------------------------------------------------------------ sampling

    @contextmanager
    def sampled_params(self, train: bool = False) -> Iterator[None]:
        """Put a posterior sample m + eps into the weights; restore the mean on exit, always.

        With ``train=True`` the gradients present when the body ends (call ``backward``
        inside) are recorded, with eps, for the next ``step()``. A body that raises records
        nothing. Parameters whose ``.grad`` is None are skipped by that step.

        The sample lives in a buffer of its own: inside the body each parameter's ``.data``
        is a view of it, and on exit it is the view of the mean again (nothing is copied, so
        the mean is restored exactly). Keep no reference to a parameter's ``.data`` across
        the body.
        """
        if self._sampling:
            raise RuntimeError("IVON: sampled_params is not re-entrant")
        self._check_layout()
        with torch.no_grad():
            root = self._noise_scale()
            sign = self._draw_noise()
            # sigma = 1 / sqrt(ess (h + delta)) = 1 / (sqrt(ess) r): the sample is m + z / r / sqrt(ess)
            torch.addcdiv(self._flat, self._noise, root, value=sign / math.sqrt(self._ess), out=self._sample)
        self._sign = sign
        self._sampling = True
        try:
            for p, view in zip(self._params, self._sample_views, strict=True):
                p.data = view
            yield
            if train:
                self._record_sample()
        finally:
            for p, view in zip(self._params, self._mean_views, strict=True):
                p.data = view
            self._sampling = False

    def _noise_scale(self) -> Tensor:
        """r = sqrt(h + delta), from the sum the last step left, or from h after h, ess or prior changed."""
        if self._root_state == "stale":
            torch.add(self._hess, self._delta, out=self._root)
        if self._root_state != "root":
            self._root.sqrt_()
            self._root_state = "root"
        return self._root

    def _draw_noise(self) -> float:
        """z ~ N(0, I) into ``_noise``, one ``normal_`` per group in order (ivon-opt's RNG order); its sign.

        Antithetic: every second draw reuses the previous z with the sign -1 and draws nothing.
        """
        if self._negate_next and self.antithetic:
            self._negate_next = False
            return -1.0
        self._form_gz()  # a pending g * z needs this z
        for sl in self._group_slices:
            self._noise[sl].normal_()
        self._negate_next = self.antithetic
        return 1.0

    @torch.no_grad()
    def _record_sample(self) -> None:
        grads = [p.grad for p in self._params]
        if any(g is not None and g.is_sparse for g in grads):
            raise RuntimeError("IVON does not support sparse gradients")
        first = self._count == 0
        if first:
            self._active = [g is not None for g in grads]
        else:
            self._active = [a and g is not None for a, g in zip(self._active, grads, strict=True)]
        flat_grads = [
            (g if g is not None else torch.zeros_like(p)).reshape(-1) for p, g in zip(self._params, grads, strict=True)
        ]
        if first:
            torch.cat(flat_grads, out=self._grad_sum)
            self._gz_sign = self._sign
            self._gz_pending = True  # g * z: formed by the fused update, or by _form_gz when needed earlier
            if not self.fused:
                self._form_gz()
        else:
            self._form_gz()
            torch.cat(flat_grads, out=self._work)
            self._grad_sum.add_(self._work)
            self._gz.addcmul_(self._work, self._noise, value=self._sign * self._gz_sign)
        self._count += 1

    def _form_gz(self) -> None:
        """g * z of the first recorded sample into ``_gz`` (if not done yet)."""
        if not self._gz_pending:
            return
        self._gz_pending = False
        if self.antithetic:  # z is needed again by the next draw
            torch.mul(self._grad_sum, self._noise, out=self._gz)
        else:  # g * z in place; the next draw goes to the other buffer
            self._noise.mul_(self._grad_sum)
            self._noise, self._gz = self._gz, self._noise

    @torch.no_grad()
    def add_mean_gradient(self, grads) -> None:
        """Add the gradient of a term of the posterior *mean* to the next step's ghat only.

        A loss term R(m) evaluated at the mean (not at the sampled weights) has a gradient
        that does not depend on the noise: in the variational objective E_q[l(theta)] + R(m)
        its natural-gradient contribution to the precision is zero. Recorded with the
        sample's gradient it would enter hhat = g * z / sigma as zero-mean noise of size
        |grad R| / sigma (it neither helped nor hurt accuracy in docs/BISECTION.md, step 2,
        row m1: this is the exact update, at one evaluation per step). Here it joins the momentum (the mean
        update) and nothing else. ``grads`` follows the order of the trainable parameters
        (``params``); None entries count as zero. Call between samples, before ``step()``.
        """
        grads = list(grads)
        if len(grads) != len(self._params):
            raise ValueError(f"IVON: add_mean_gradient needs {len(self._params)} gradients, got {len(grads)}")
        if self._mean_grad is None:
            self._mean_grad = torch.zeros_like(self._flat)
        for g, p, offset, n in zip(grads, self._params, self._offsets, self._numels, strict=True):
            if g is None:
                continue
            if g.shape != p.shape:
                raise ValueError(f"IVON: a mean gradient of shape {tuple(g.shape)} for a parameter of {tuple(p.shape)}")
            self._mean_grad[offset : offset + n].add_(g.reshape(-1))
        self._has_mean_grad = True

    # ------------------------------------------------------------------ update

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One IVON update from the samples recorded since the last step.

        With a closure (zero_grad, forward, backward, return the loss), it is first called
        ``mc_samples`` times, each inside ``sampled_params(train=True)``; returns the mean loss.
        """
        if self._sampling:
            raise RuntimeError("IVON: call step() after leaving sampled_params")
        loss = None
        if closure is not None:
            losses = []
            for _ in range(self.mc_samples):
                with self.sampled_params(train=True), torch.enable_grad():
                    losses.append(closure())
            loss = sum(losses) / len(losses)
        if self._count == 0:
            raise RuntimeError(
                "IVON: no gradient sample recorded; run backward inside sampled_params(train=True) or pass a closure"
            )
        self._update()
        return loss

    def _update(self) -> None:
        """The fused step: the equations of the module docstring, in few passes over the flat buffers.

        With r = sqrt(h + delta) (this step's noise scale), e = h - hhat, c2 = 0.5 (1 - beta2)^2:
        hhat = sqrt(ess) r * mean(sign g z); h' = h - (1 - beta2) e + c2 (e / r)^2 (as 1 / r^2 =
        1 / (h + delta)); then h' + delta is kept in r's buffer, for the mean's update and, after
        one sqrt, the next step's noise.
        """
        self._step_count += 1
        self._hess_steps += 1
        count, root = self._count, self._root
        ghat = self._grad_sum
        if count > 1:
            ghat.div_(count)
        unseen = torch.eq(ghat, 0.0) if self.skip_zero_grad else None  # before the mean's term joins ghat
        fuse = self.fused and unseen is None
        if self._gz_pending and (self._has_mean_grad or not fuse or any(g["beta2"] >= 1.0 for g in self.param_groups)):
            self._form_gz()  # the fused update forms g * z from ghat only when ghat is the sample's gradient
        from_noise, gz = self._gz_pending, self._gz
        if self._has_mean_grad:  # a term of the mean: momentum only, no curvature
            ghat.add_(self._mean_grad)
            self._mean_grad.zero_()
            self._has_mean_grad = False
        kept = [(i, self._snapshot(i)) for i, active in enumerate(self._active) if not active]
        # skip_zero_grad: where every sample's data gradient is exactly 0 (the batch's loss does not depend on
        # the parameter: an input that is 0 in the whole batch, an output masked out), hhat = 0 is no
        # observation of the curvature, and h keeps its value instead of decaying towards 0.
        if unseen is not None:
            self._hess_skipped.add_(unseen)
        hhat_scale = self._gz_sign * math.sqrt(self._ess) / count
        for gi, (group, sl) in enumerate(zip(self.param_groups, self._group_slices, strict=True)):
            if sl.start == sl.stop:
                continue
            beta1, beta2 = group["beta1"], group["beta2"]
            hess, mean, momentum = self._hess[sl], self._flat[sl], self._momentum[sl]
            r, g, e = root[sl], ghat[sl], gz[sl]
            delta = self._delta[sl] if self._delta_scalar[gi] is None else self._delta_scalar[gi]
            if fuse and beta2 < 1.0:
                scalars = torch.tensor(
                    [hhat_scale, beta1, beta2, self.step_size(group),
                     1.0 - beta1**self._step_count if self.debias else 1.0, group["clip_radius"]],
                    dtype=mean.dtype, device=mean.device,
                )
                source = self._noise[sl] if from_noise else e
                curvature = None if self._mean_curvature is None else self._mean_curvature[sl]
                if fused_group_update(hess, mean, momentum, g, source, r, self._delta[sl], self._prior_mean[sl],
                                      scalars, curvature=curvature, from_noise=from_noise):
                    continue
                if from_noise:  # no compiler: the eager update below, with g * z formed now
                    self._form_gz()
                    from_noise, gz = False, self._gz
                    e = gz[sl]
            torch.addcmul(hess, e, r, value=-hhat_scale, out=e)  # e = h - hhat
            momentum.lerp_(g, 1.0 - beta1)
            if beta2 < 1.0:
                old = hess.clone() if unseen is not None else None
                hess.add_(e, alpha=-(1.0 - beta2))
                hess.addcmul_(e.div_(r), e, value=0.5 * (1.0 - beta2) ** 2)
                if old is not None:
                    torch.where(unseen[sl], old, hess, out=hess)
            h_plus_delta = torch.add(hess, delta, out=r)
            lr = self.step_size(group)
            debias = 1.0 - beta1**self._step_count if self.debias else 1.0
            # numerator g + debias delta (m - m0), in e's buffer
            if self._zero_prior_mean[gi]:
                offset = mean
            else:
                offset = torch.sub(mean, self._prior_mean[sl], out=e)
            if isinstance(delta, float):
                numerator = torch.add(momentum, offset, alpha=debias * delta, out=e)
            else:
                numerator = torch.addcmul(momentum, delta, offset, value=debias, out=e)
            denominator = h_plus_delta
            if self._mean_curvature is not None:
                denominator = torch.add(h_plus_delta, self._mean_curvature[sl], out=g)
            clip_radius = group["clip_radius"]
            if math.isfinite(clip_radius):
                direction = numerator.div_(denominator).clamp_(-debias * clip_radius, debias * clip_radius)
                mean.sub_(direction, alpha=lr / debias)
            else:
                mean.addcdiv_(numerator, denominator, value=-lr / debias)
        self._gz_pending = False
        self._root_state = "sum"
        for i, values in kept:
            for buffer, value in zip((self._flat, self._hess, self._momentum), values, strict=True):
                buffer[self._slice(i)] = value
        if kept:
            self._root_state = "stale"
        self._count = 0

    def _slice(self, i: int) -> slice:
        return slice(self._offsets[i], self._offsets[i] + self._numels[i])

    def _snapshot(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        sl = self._slice(i)
        return self._flat[sl].clone(), self._hess[sl].clone(), self._momentum[sl].clone()

    # ------------------------------------------------------------------ posterior

    def step_size(self, group: dict) -> float:
        """alpha of a parameter group's mean update: lr, times hess_init + weight_decay with ``rescale_lr``."""
        return group["lr"] * (group["hess_init"] + group["weight_decay"]) if self.rescale_lr else group["lr"]

    @property
    def params(self) -> tuple[Tensor, ...]:
        """The parameters in flat order (constructor order, requires_grad ones only)."""
        return self._params

    @property
    def ess(self) -> float:
        return self._ess

    @ess.setter
    def ess(self, value: float) -> None:
        """Set lambda; the *total* prior precision stays fixed, so delta = prior_precision / ess changes."""
        self._commit(ess=value)

    @property
    def mean(self) -> Tensor:
        """Posterior mean m (a flat copy; the mean, not the sample, inside sampled_params)."""
        return self._flat.detach().clone()

    @property
    def hess(self) -> Tensor:
        """Per-example Hessian estimate h (flat copy)."""
        return self._hess.clone()

    @hess.setter
    def hess(self, value: Tensor | float) -> None:
        """Set h (flat); h + delta must be > 0 so that the precision is."""
        self._commit(hess=self._as_flat("hess", value))

    @property
    def data_hess(self) -> Tensor:
        """The data's per-example Hessian, debiased: h without its initial value, clamped at 0 (flat).

        After T steps from h0 (the value h was last set to), h_T = beta2^T h0 + (1 - beta2^T) hbar,
        where hbar is the beta2-weighted average of the estimates hhat (up to the update's
        O((1 - beta2)^2) correction). With beta2 near 1 and a few thousand steps, h_T is still
        mostly h0 (0.99999^4690 = 0.95: permuted MNIST's paper protocol), so the posterior
        precision ess * (h_T + delta) is mostly ess * hess_init, not the data. This returns
        hbar = (h_T - beta2^T h0) / (1 - beta2^T), Adam's bias correction applied to the
        Hessian, and 0 where that is negative (a precision cannot be). Before any step, and
        where beta2 = 1 (h frozen), h itself. Steps that skip a parameter (no gradient) still count,
        except, with ``skip_zero_grad``, the steps that left its h alone.
        """
        if self._hess_steps == 0:
            return self._hess.clone().clamp_min_(0.0)
        out = self._hess.clone()
        for group, sl in zip(self.param_groups, self._group_slices, strict=True):
            if self.skip_zero_grad:  # per parameter: the steps that updated its h
                decay = torch.pow(group["beta2"], self._hess_steps - self._hess_skipped[sl])
                updated = decay < 1.0
                tiny = torch.finfo(out.dtype).tiny
                debiased = (out[sl] - decay * self._hess_origin[sl]) / (1.0 - decay).clamp_min(tiny)
                out[sl] = torch.where(updated, debiased, 0.0)  # never updated: no data seen, no data curvature
                continue
            decay = group["beta2"] ** self._hess_steps
            if decay < 1.0:
                out[sl].sub_(self._hess_origin[sl], alpha=decay).div_(1.0 - decay)
        return out.clamp_min_(0.0)

    def reset_hess(self) -> None:
        """h <- hess_init of each parameter group."""
        self._commit(hess=self._per_group("hess_init"))

    @property
    def precision(self) -> Tensor:
        """Posterior precision lambda * (h + delta) = ess * h + prior_precision."""
        return (self._hess + self._delta).mul_(self._ess)

    @property
    def variance(self) -> Tensor:
        return self.precision.reciprocal_()

    @property
    def posterior(self) -> DiagonalGaussian:
        return DiagonalGaussian(mean=self.mean, precision=self.precision)

    @property
    def natural_parameters(self) -> tuple[Tensor, Tensor]:
        """(precision * mean, -precision / 2) of the posterior."""
        return self.posterior.natural_parameters

    @property
    def prior_mean(self) -> Tensor:
        return self._prior_mean.clone()

    @property
    def prior_precision(self) -> Tensor:
        """Total prior precision (not per example): delta = prior_precision / ess."""
        return self._prior_precision.clone()

    @property
    def prior(self) -> DiagonalGaussian:
        return DiagonalGaussian(mean=self.prior_mean, precision=self.prior_precision)

    @property
    def mean_curvature(self) -> Tensor:
        """c: diagonal curvature, per example (h's units), of loss terms of the mean; 0 by default.

        A term R(m) of the posterior mean (``add_mean_gradient``) has no curvature in the
        variational objective, so it is not in h; but its stiffness matters to the mean's
        step. ``mean_update`` divides by h + delta + c, a Newton step on the data *and* the
        term, so the term cannot make the step unstable whatever its weight. The posterior
        (sigma, ``precision``) is unchanged.
        """
        if self._mean_curvature is None:
            return torch.zeros_like(self._flat)
        return self._mean_curvature.clone()

    @mean_curvature.setter
    def mean_curvature(self, value: Tensor | float | None) -> None:
        self._mean_curvature = None if value is None else self._as_flat("mean curvature", value, nonnegative=True)

    def set_prior(self, mean: Tensor | float | None = None, precision: Tensor | float | None = None) -> None:
        """Set the prior N(mean, 1 / precision): flat tensors (or scalars), *total* precision >= 0."""
        self._commit(
            prior_mean=None if mean is None else self._as_flat("prior mean", mean),
            prior_precision=None
            if precision is None
            else self._as_flat("prior precision", precision, nonnegative=True),
        )

    def _as_flat(self, name: str, value: Tensor | float, nonnegative: bool = False) -> Tensor:
        value = torch.as_tensor(value).detach()
        if value.dim() == 0:
            value = value.expand(self._flat.shape)
        if value.shape != self._flat.shape:
            raise ValueError(f"IVON: {name} must have shape {tuple(self._flat.shape)}, got {tuple(value.shape)}")
        value = value.to(self._flat)
        if not torch.isfinite(value).all():
            raise ValueError(f"IVON: {name} must be finite")
        if nonnegative and not (value >= 0).all():
            raise ValueError(f"IVON: {name} must be >= 0")
        return value

    # ------------------------------------------------------------------ checkpoints

    def __getstate__(self) -> dict:
        """Pickle everything (torch's Optimizer keeps only defaults, state and param_groups): the posterior
        lives in the flat buffers, and the parameters stay views into the mean when pickled together."""
        return self.__dict__.copy()

    def state_dict(self) -> dict:
        """torch's optimizer state dict plus the posterior buffers under "ivon" (the mean is the model's)."""
        state = super().state_dict()
        state["ivon"] = {
            "hess": self._hess.clone(),
            "momentum": self._momentum.clone(),
            "prior_mean": self._prior_mean.clone(),
            "prior_precision": self._prior_precision.clone(),
            "ess": self._ess,
            "step": self._step_count,
            "hess_origin": self._hess_origin.clone(),
            "hess_steps": self._hess_steps,
            "hess_skipped": self._hess_skipped.clone(),
            "skip_zero_grad": self.skip_zero_grad,
            "mc_samples": self.mc_samples,
            "rescale_lr": self.rescale_lr,
            "debias": self.debias,
            "antithetic": self.antithetic,
            "mean_curvature": None if self._mean_curvature is None else self._mean_curvature.clone(),
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        if "ivon" not in state_dict:
            raise ValueError("IVON: not an IVON state dict (no 'ivon' entry)")
        ivon = state_dict.pop("ivon")
        hess, momentum = self._as_flat("hess", ivon["hess"]), self._as_flat("momentum", ivon["momentum"])
        prior_mean = self._as_flat("prior mean", ivon["prior_mean"])
        prior_precision = self._as_flat("prior precision", ivon["prior_precision"], nonnegative=True)
        super().load_state_dict(state_dict)
        self._count = 0
        self._commit(hess=hess, prior_mean=prior_mean, prior_precision=prior_precision, ess=ivon["ess"])
        self._momentum.copy_(momentum)
        self._step_count = int(ivon["step"])
        if "hess_origin" in ivon:  # state dicts written before data_hess: debias from the loaded h
            self._hess_origin.copy_(self._as_flat("hess origin", ivon["hess_origin"]))
            self._hess_steps = int(ivon["hess_steps"])
        if "hess_skipped" in ivon:
            self._hess_skipped.copy_(self._as_flat("hess skipped", ivon["hess_skipped"]))
        self.skip_zero_grad = bool(ivon.get("skip_zero_grad", False))
        self.mc_samples = int(ivon["mc_samples"])
        self.rescale_lr, self.debias = bool(ivon["rescale_lr"]), bool(ivon["debias"])
        self.antithetic = bool(ivon.get("antithetic", False))
        self._negate_next = False  # a loaded optimizer starts a fresh pair
        self.mean_curvature = ivon.get("mean_curvature")
