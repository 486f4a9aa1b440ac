"""FROMP inside Avalanche: a thin plugin over ``cl_bayes.fromp.FunctionalPrior``.

``FunctionalRegularisationPlugin`` uses three hooks, in this order within an experience:

1. every training step of experiences 2, 3, ...: the functional prior of all past
   experiences, ``tau / 2 * sum_s r_s^T K_s^{-1} r_s`` (``FunctionalPrior``), evaluated at
   the posterior mean (``term_at="mean"``, the default):

   * ``before_update`` with IVON (``IVONStrategy``): after the step's posterior samples,
     while the weights hold the mean, the term is evaluated once and its gradient goes to
     ``IVON.add_mean_gradient``: into the momentum (the mean's update), not into the
     Hessian estimate. A term of the mean has no curvature in the variational objective;
     recorded with a sample's gradient it would add zero-mean noise ``grad R * z / sigma``
     to IVON's ``hhat`` (``docs/BISECTION.md``). Its value is added to ``strategy.loss``
     for logging. With ``term_curvature`` (the default) the term's Hessian at its anchors,
     ``tau * diag(sum_s J_s^T K_s^{-1} J_s)`` (``FunctionalPrior.curvature``, set in hook 2),
     is IVON's ``mean_curvature``: the mean's step divides by ``h + delta + c``. Without it
     IVON preconditions only by the data's ``h`` and the term, whose curvature in the
     memorable directions is ~``tau * ess * (h + delta)``, makes the step unstable once
     ``lr * tau * ess`` exceeds ~1 (the collapses in the specs' comments and
     ``docs/BISECTION.md``). At the first step of each experience, with ``stiffness_margin``
     (default 4), c is scaled by the least gamma >= 1 that keeps the term's stiffest mode,
     step * lambda_max((h + delta + gamma c)^-1 A) with A the term's dense Gauss-Newton matrix,
     at <= 1 / margin of the momentum's stability bound (``cl_bayes.fromp.stable_curvature_scale``;
     ``curvature_scales`` records gamma per experience). A diagonal c misses A's stiffest
     direction by ~1e4 on split MNIST, which had capped the learning rate (docs/BISECTION.md step 7).
     Within the experience, ``stiffness_guard`` (default 0.5) watches the term's full Hessian at
     the current weights, which A at the anchors does not bound: the secant stiffness of the
     mean's last step, from this step's and the previous step's term gradients
     (``cl_bayes.fromp.secant_stiffness``, a dot product). When it passes that fraction of the
     bound, c grows to max(c, c(w)), its value at the current weights (one Jacobian pass over
     the memory: the stiff step may lie where the anchors' c is ~0, out of gamma's reach), and
     gamma grows if the step is still above bound / margin; a step past the bound is also taken
     back (``guard_events``; the dead-network runs of docs/BISECTION.md step 9). Exact term only.
   * ``before_backward`` otherwise: added to ``strategy.loss`` (one backward pass shared
     with the data loss). With a deterministic optimizer (Adam) the trained weights are
     the mean. ``term_at="network"`` (bisection only) evaluates it there at each IVON
     sample, which penalises the posterior's own spread: at a sample the residual carries
     the noise ``J sigma eps``, amplified by ``K^{-1}`` where the old posterior was
     certain (expected value ``r(m)^T K^-1 r(m) + tr(K^-1 J Sigma J^T)``); measured in
     ``docs/BISECTION.md`` (split MNIST, validation: 98.72 % at the mean against 87.76 %
     at samples with FROMP's anchoring).
2. ``after_training_exp`` (end of each experience): reads the experience's training
   examples, chooses ``memory_size`` of them (class-balanced, ``cl_bayes.memory``) by
   ``selection``, takes the posterior, then ``FunctionalPrior.add_task(net, posterior, x,
   class_mask)`` stores their softmax outputs at the posterior mean and the inverse kernel
   ``K_s^{-1}`` from the posterior covariance. The posterior is

   * IVON's (``optimizer.posterior``, the default), or
   * with ``laplace`` (a ``cl_bayes.laplace.DiagonalLaplace``), FROMP's own: the
     diagonal Laplace-GGN posterior at the network's weights, whose GGN is first
     accumulated over this experience's training data (in this hook, before the
     kernels; FROMP with Adam).

   With ``anchor="latest"`` (FROMP's objective) every past task's outputs and kernel
   are first recomputed under this posterior (``FunctionalPrior.reanchor``), so the
   term pulls towards the latest posterior's predictions; with ``"experience"`` each
   task keeps those of the end of its own experience. It reads the posterior the
   strategy has *at the end of the experience*: list this plugin before any plugin
   that changes the posterior in the same hook (natural-parameter accumulation resets
   IVON's Hessian).

Sampled term (``block_size``, ``blocks_per_step``, ``per_experience``, ``block_estimator``):
each experience's memory is split into kernel blocks of at most ``block_size`` points when it
is added, and each step evaluates one draw (``FunctionalPrior.draw``, a seeded generator of its
own): by default ``blocks_per_step`` blocks of *each* past experience, weighted by its block
count over ``blocks_per_step`` (``per_experience``; False: that many of all blocks), their
weighted sum's gradient (``block_estimator="scaled"``; ``"saga"``: SAGA's table,
``cl_bayes.fromp.SagaGradient``, which collapsed). The curvature scale of hook 1 is then
chosen for the draws' random gain (``stable_curvature_scale(blocks_per_step=)``). None (the
default): every memorable point at every step. Opt-in: on split MNIST it matches the exact
term (99.56 against 99.63 %), on permuted MNIST the larger curvature scale costs accuracy and one
seed of two collapsed (docs/BISECTION.md, step 8; results/ablations/sampled-term/).

Refreshed term (``refresh_every``, IVON at the mean only): the exact term and gradient
every ``refresh_every`` steps, and in between its quadratic model with the term's diagonal
curvature (``cl_bayes.fromp.RefreshedGradient``); a new task forces a refresh.

Scaling of tau (FROMP's convention). The strategy's loss is the *mean* cross-entropy
over the mini-batch, and the plugin adds ``tau / 2 * sum_s r_s^T K_s^{-1} r_s`` to it;
its gradient is ``tau * sum_s J_s^T K_s^{-1} r_s``. That is the relative weight of
FROMP's code (``opt_fromp.step`` uses ``grad(mean loss) / tau + sum_s J^T K^{-1} r``
with Adam, which is invariant to the overall scale), whose tau is the paper's tau
divided by the training-set size N ("scaled by a factor N"). For IVON, whose
posterior targets exp(-ess * loss), the term enters the negative log joint as
``ess * tau / 2 * sum_s r_s^T K_s^{-1} r_s``; since ``K_s = J_s Sigma_s J_s^T`` it
approximates the weight-space prior ``(w - mu_s)^T Sigma_s^{-1} (w - mu_s) / 2`` in the
directions of the memorable outputs when ``tau = 1 / ess`` (the Bayesian weight).

Values. FROMP used tau = 10 (split MNIST) and 0.5 (permuted MNIST) with a Laplace-GGN
covariance and Adam; they do not transfer. The term's curvature in the memorable
directions is about ``tau * ess * (h + delta)`` per class block, against the data's
``h`` that IVON preconditions with, so IVON's step along them scales like
``lr * tau * ess``: when that product is large the run collapses to chance (measured on
split MNIST, quick protocol: at ~6.5, one seed of two; at ~3 with FROMP's eps). Keep it
about 1 or below, and remember that ``ess`` grows with the data. ``strategies/ivon-fromp.toml``
and ``bayes-cl.toml`` hold the values chosen on validation data, with the evidence. The
kernel jitter ``eps`` matters for the same reason: for confidently predicted classes
``J Sigma J^T`` is tiny, FROMP's eps = 1e-5 then weighs the sampled network's (non-linear)
softmax residuals by up to 1e5; eps = 1e-3 bounds that (tau 1e-4 on permuted MNIST collapsed
with 1e-5, not with 1e-3). Independently of FROMP, IVON with beta2 = 0.999 collapses on the
paper protocol of permuted MNIST (see the specs), so the permuted specs use beta2 = 0.99999.

Selection (``selection``): the selectors of ``cl_bayes.avalanche.memory`` (the same as
``ivon-replay``'s), class-balanced, scored at the posterior mean:

* ``sensitivity`` (default): memory-perturbation sensitivity
  ``S_i = sum_c |e_ic lam_ic v_ic|`` under the IVON posterior (variance estimator
  ``estimator``, ``last_layer`` by default: one forward pass);
* ``lambda``: FROMP's own choice, the trace of the softmax Hessian ``sum_c p_c - p_c^2``;
* ``random``: uniform, seeded by ``seed`` and the experience id; (``herding`` also works).

The experience's inputs are read with ``cl_bayes.avalanche.memory.experience_data``
(its tensors straight from the dataset tree; no draw from the global RNG, so with
tau = 0 a run is exactly plain IVON's).

Task-incremental models (``TaskMaskedModel``): memories are scored and regularised on
the plain network with each stored example's class mask (its task's classes), so the
softmax, residuals and kernels are over the task's classes only.

The memories and their kernels are evaluated with the network in eval mode (as in
FROMP; no difference for the MLPs here), and the mode is restored.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
from avalanche.training.plugins import SupervisedPlugin
from torch import Tensor

from cl_bayes.avalanche.memory import SELECTIONS, ExperienceData, Selector, experience_data, make_selector
from cl_bayes.avalanche.models import class_mask, unwrap
from cl_bayes.fromp import (
    FunctionalPrior,
    KernelForm,
    RefreshedGradient,
    SagaGradient,
    check_positive_int,
    momentum_stability_bound,
    restabilising_scale,
    secant_stiffness,
    stable_curvature_scale,
)
from cl_bayes.laplace import DiagonalLaplace

ESTIMATORS = ("last_layer", "exact", "samples")
BLOCK_ESTIMATORS = ("saga", "scaled")  # the sampled term's gradient: SAGA's, or the drawn blocks' weighted sum
ANCHORS = ("experience", "latest")
TERM_AT = ("network", "mean")
LAPLACE_BATCH = 1000  # examples per batch of the Laplace-GGN pass


def gather_inputs(data: ExperienceData, chosen: Tensor) -> Tensor:
    """The inputs of the examples at dataset positions ``chosen`` (distinct), in that order."""
    first = data.blocks[0][0]
    out = first.new_empty((len(chosen), *first.shape[1:]))
    row_of = torch.full((len(data.y),), -1, dtype=torch.long)
    row_of[chosen] = torch.arange(len(chosen))
    for inputs, positions in data.blocks:
        rows = row_of[positions]
        keep = rows >= 0
        out[rows[keep]] = inputs[keep]
    return out


def _optimizer_posterior(strategy):
    posterior = getattr(strategy.optimizer, "posterior", None)
    if posterior is None:
        raise TypeError(
            "FunctionalRegularisationPlugin needs an optimizer with a Gaussian posterior "
            f"(cl_bayes.ivon.IVON) or a Laplace posterior (laplace=...), got {type(strategy.optimizer).__name__}"
        )
    return posterior


@contextmanager
def _eval_mode(net):
    """The network in eval mode for the body (the memories are one batch: no BatchNorm statistics), restored after."""
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


def laplace_batches(strategy, data: ExperienceData, batch_size: int = LAPLACE_BATCH):
    """(x, class mask) batches of every training example of the experience, on the model's device."""
    device = next(unwrap(strategy.model).parameters()).device
    for inputs, positions in data.blocks:
        for s in range(0, len(positions), batch_size):
            pos = positions[s : s + batch_size]
            x = inputs[s : s + batch_size].to(device)
            yield x, class_mask(strategy.model, data.t[pos].to(device), len(x))


class FunctionalRegularisationPlugin(SupervisedPlugin):
    """FROMP's functional prior over a memory chosen at the end of each experience.

    Hooks: ``before_backward`` (adds the term) and ``after_training_exp`` (memory and
    kernel); see the module docstring for their order, the tau convention and the
    selections. ``memory_size`` examples are kept per experience; ``selector`` (a
    ``cl_bayes.avalanche.memory.Selector``) replaces the one named by ``selection``.
    """

    def __init__(
        self,
        *,
        tau: float,
        memory_size: int,
        kernel: KernelForm = "block",
        eps: float = 1e-3,
        selection: str = "sensitivity",
        estimator: str = "last_layer",
        seed: int = 0,
        chunk_size: int | None = None,
        selector: Selector | None = None,
        laplace: DiagonalLaplace | None = None,
        anchor: str = "experience",
        term_at: str = "mean",
        term_curvature: bool = True,
        stiffness_margin: float | None = 4.0,
        stiffness_guard: float | None = 0.5,
        block_size: int | None = None,
        blocks_per_step: int | None = None,
        per_experience: bool = True,
        block_estimator: str = "scaled",
        refresh_every: int | None = None,
    ):
        super().__init__()
        if refresh_every is not None and blocks_per_step is not None:
            raise ValueError("refresh_every and blocks_per_step are two ways to cheapen the term: choose one")
        if refresh_every is not None and term_at != "mean":
            raise ValueError("refresh_every needs term_at='mean' (the term of the mean, IVON's before_update)")
        if anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, got {anchor!r}")
        if term_at not in TERM_AT:
            raise ValueError(f"term_at must be one of {TERM_AT}, got {term_at!r}")
        if isinstance(memory_size, bool) or not isinstance(memory_size, int) or memory_size < 1:
            raise ValueError(f"memory_size must be a positive int, got {memory_size!r}")
        if selector is None:
            selector = make_selector(selection, seed=seed, estimator=estimator)
        self.prior = FunctionalPrior(tau=tau, kernel=kernel, eps=eps, chunk_size=chunk_size, block_size=block_size)
        self.blocks_per_step = blocks_per_step
        self.per_experience = bool(per_experience)  # blocks_per_step of each experience's blocks per step
        if block_estimator not in BLOCK_ESTIMATORS:
            raise ValueError(f"block_estimator must be one of {BLOCK_ESTIMATORS}, got {block_estimator!r}")
        self.block_estimator = block_estimator
        self._generator = torch.Generator().manual_seed(seed)  # the blocks drawn per step; not the global RNG
        if blocks_per_step is not None:
            check_positive_int("blocks_per_step", blocks_per_step)
        self._saga = (
            None if blocks_per_step is None or block_estimator != "saga"
            else SagaGradient(self.prior, blocks_per_step=blocks_per_step, generator=self._generator,
                              per_experience=per_experience)
        )
        self._refreshed = None if refresh_every is None else RefreshedGradient(self.prior, refresh_every=refresh_every)
        self.memory_size = memory_size
        self.selector = selector
        self.laplace = laplace
        self.anchor = anchor
        self.term_at = term_at
        self.term_curvature = bool(term_curvature)
        if stiffness_margin is not None and not stiffness_margin >= 1.0:
            raise ValueError(f"stiffness_margin must be >= 1 or None, got {stiffness_margin!r}")
        self.stiffness_margin = stiffness_margin
        if stiffness_guard is not None and not 0.0 < stiffness_guard <= 1.0:
            raise ValueError(f"stiffness_guard must be in (0, 1] or None, got {stiffness_guard!r}")
        self.stiffness_guard = stiffness_guard
        self.guard_events: list[dict] = []  # each action of the guard: c regrown, gamma, step taken back
        self._gamma = 1.0  # the curvature scale in force
        self._last_step: tuple[Tensor, Tensor] | None = None  # (mean, term gradient) of the previous step
        self.curvature_scales: list[dict] = []  # per experience with a term: gamma and the stiffness before/after
        # recorded in the results file (``runner``): the scale chosen at each experience, the guard's raises
        self.events = {"curvature_scales": self.curvature_scales, "stiffness_guard": self.guard_events}
        self._scale_pending = False  # the next step first scales the curvature (hook 1)
        self.memory_indices: list[Tensor] = []  # per past experience: indices into its training dataset
        self.last_penalty: Tensor | None = None  # the term added at the latest step (detached)
        self._curvature: Tensor | None = None  # the term's diagonal curvature, set per experience (hook 2)
        self.seconds = {"laplace": 0.0, "kernels": 0.0, "curvature": 0.0}  # wall time of the end-of-experience passes

    # -- hook 1: every training step ---------------------------------------------
    def _draw(self) -> tuple[list[int] | None, list[float] | None]:
        """This step's blocks and weights (``FunctionalPrior.draw``), or (None, None): the exact term."""
        if self.blocks_per_step is None:
            return None, None
        return self.prior.draw(self.blocks_per_step, self._generator, per_experience=self.per_experience)

    def _term_of_the_mean(self, strategy) -> bool:
        """True when the term's gradient goes to IVON's momentum only (``add_mean_gradient``)."""
        return self.term_at == "mean" and hasattr(strategy.optimizer, "add_mean_gradient")

    def before_backward(self, strategy, **kwargs):
        if not len(self.prior) or self._term_of_the_mean(strategy):
            return
        with _eval_mode(unwrap(strategy.model)) as net:
            blocks, weights = self._draw()
            penalty = self.prior(net, blocks=blocks, weights=weights)
        strategy.loss += penalty
        self.last_penalty = penalty.detach()

    def before_update(self, strategy, **kwargs):
        """With IVON and ``term_at="mean"``: the term at the mean, once per step, gradient to the momentum only.

        Here the posterior samples are over and the weights hold the mean. The term's
        gradient does not depend on IVON's noise; recorded with a sample's gradient it would
        only add zero-mean noise ``grad R * z / sigma`` to the Hessian estimate
        (``IVON.add_mean_gradient``). One evaluation per step whatever ``mc_samples``.
        """
        if not len(self.prior) or not self._term_of_the_mean(strategy):
            return
        if self._scale_pending:
            self._scale_pending = False
            self._stabilise_curvature(strategy)
        params = strategy.optimizer.params
        with _eval_mode(unwrap(strategy.model)) as net:
            if self._saga is not None or self._refreshed is not None:
                if self._saga is not None:
                    penalty, flat = self._saga(net, list(params))
                else:
                    curvature = self._curvature if self.term_curvature else None
                    penalty, flat = self._refreshed(net, list(params), curvature)
                grads = flat.split([p.numel() for p in params])
                grads = [g.view_as(p) for g, p in zip(grads, params, strict=True)]
            else:
                blocks, weights = self._draw()  # (None, None): the exact term
                penalty = self.prior(net, blocks=blocks, weights=weights)
                grads = torch.autograd.grad(penalty, params, allow_unused=True)
                if blocks is None:
                    grads = self._guard_stiffness(strategy, grads)
        strategy.optimizer.add_mean_gradient(grads)
        strategy.loss = strategy.loss + penalty.detach()
        self.last_penalty = penalty.detach()

    def _stabilise_curvature(self, strategy) -> None:
        """At the first step of an experience: scale the term's curvature until its stiffest mode is stable.

        ``cl_bayes.fromp.stable_curvature_scale`` with IVON's h + delta of this experience
        (after any prior carried over) and its step size; ``stiffness_margin`` None skips it.
        """
        opt = strategy.optimizer
        if self.stiffness_margin is None or self._curvature is None or not hasattr(opt, "mean_curvature"):
            return
        start = time.perf_counter()
        group = max(opt.param_groups, key=opt.step_size)  # the largest step is the one to keep stable
        step = opt.step_size(group)
        with _eval_mode(unwrap(strategy.model)) as net:
            gamma, before, after = stable_curvature_scale(
                self.prior, net, base=opt.hess + opt.prior_precision / opt.ess, curvature=self._curvature,
                step_size=step, beta1=group["beta1"], margin=self.stiffness_margin,
                blocks_per_step=self.blocks_per_step, per_experience=self.per_experience,
            )
        if gamma != 1.0:
            opt.mean_curvature = self._curvature * gamma
        self._gamma = gamma
        self.curvature_scales.append({"experience": strategy.experience.current_experience, "gamma": gamma,
                                      "stiffness": before, "stiffness_scaled": after})
        self.seconds["curvature"] += time.perf_counter() - start

    def _guard_stiffness(self, strategy, grads: tuple) -> tuple:
        """Within an experience: raise gamma when the mean's last step was stiffer than ``stiffness_guard`` x bound.

        The step's secant stiffness (``cl_bayes.fromp.secant_stiffness``) comes from this step's
        and the previous step's term gradients at the mean, which the term computes anyway: a dot
        product per step. It measures the term's full Hessian at the current weights, which the
        scale chosen at the anchors (``_stabilise_curvature``) cannot see: a memorable point that
        the new data pushes from a confident prediction towards the decision boundary multiplies
        its kernel-weighted Jacobian, and the stiffness with it (docs/BISECTION.md, step 9). Past
        ``stiffness_guard`` times the momentum's bound, c first grows to max(c, c(w)), the term's
        Gauss-Newton diagonal at the current weights: c at the anchors can be ~0 along the stiff
        step, and scaling it there only switched the term off along its own support (gamma 144 to
        2e8 and the old tasks lost, docs/BISECTION.md step 9). Then gamma becomes the least value
        that brings the step, with the grown c, back to bound / ``stiffness_margin``
        (``restabilising_scale``). c and gamma only grow within an experience and are chosen
        afresh at the next one. A step past the bound itself was
        unstable: it is taken back (Levenberg-Marquardt's rejected step). The mean returns to where
        the step started and this step uses the term's gradient there, not the one at the stiff
        point (with the first version of the guard, which only raised gamma, `bayes-cl` stratified
        seed 1 died without it; not re-measured since c is regrown). Returns the term's gradients
        for this step.
        """
        if self.stiffness_guard is None or self.stiffness_margin is None or self._curvature is None:
            return grads
        opt = strategy.optimizer
        if not hasattr(opt, "mean_curvature"):
            return grads
        gradient = torch.cat([
            (torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, opt.params, strict=True)
        ])
        mean = opt.mean
        previous, self._last_step = self._last_step, (mean, gradient)
        if previous is None:
            return grads
        group = max(opt.param_groups, key=opt.step_size)
        step_size, bound = opt.step_size(group), momentum_stability_bound(group["beta1"])
        base = opt.hess + opt.prior_precision / opt.ess
        dw = mean - previous[0]
        stiffness = secant_stiffness(step_size=step_size, step=dw, gradient_change=gradient - previous[1],
                                     preconditioner=base + self._gamma * self._curvature)
        if not stiffness > self.stiffness_guard * bound:
            return grads
        # c was measured at the anchors; the stiff step may lie where it is ~0 (no gamma reaches there):
        # c grows to its value at the weights reached, c <- max(c, c(w)), before gamma is chosen
        numerator = stiffness * float(dw @ ((base + self._gamma * self._curvature) * dw))  # step_size dw.dg
        start = time.perf_counter()
        with _eval_mode(unwrap(strategy.model)) as net:
            self._curvature = torch.maximum(self._curvature, self.prior.curvature(net, at=mean))
        self.seconds["curvature"] += time.perf_counter() - start
        base_form, curvature_form = float(dw @ (base * dw)), float(dw @ (self._curvature * dw))
        refreshed = numerator / (base_form + self._gamma * curvature_form)  # the same step, with c(w)
        gamma = restabilising_scale(
            gamma=self._gamma, stiffness=refreshed, target=bound / self.stiffness_margin,
            base_form=base_form, curvature_form=curvature_form,
        )
        rejected = stiffness > bound
        self.guard_events.append({"experience": strategy.experience.current_experience,
                                  "iteration": strategy.clock.train_exp_iterations, "secant_stiffness": stiffness,
                                  "secant_stiffness_refreshed": refreshed, "gamma_before": self._gamma,
                                  "gamma": gamma, "step_taken_back": rejected})
        self._gamma = gamma
        opt.mean_curvature = self._curvature * gamma
        if not rejected:
            return grads
        self._last_step = previous
        sizes = [p.numel() for p in opt.params]
        with torch.no_grad():
            for p, value in zip(opt.params, previous[0].split(sizes), strict=True):
                p.copy_(value.view_as(p))
        return tuple(g.view_as(p) for g, p in zip(previous[1].split(sizes), opt.params, strict=True))

    # -- hook 2: end of each experience ------------------------------------------
    def after_training_exp(self, strategy, **kwargs):
        experience = strategy.experience
        chosen = self.selector(strategy, experience, self.memory_size)
        data = experience_data(experience)
        net = unwrap(strategy.model)
        device = next(net.parameters()).device
        x = gather_inputs(data, chosen).to(device)
        mask = class_mask(strategy.model, data.t[chosen].to(device), len(chosen))
        with _eval_mode(net):
            start = time.perf_counter()
            if self.laplace is not None:
                self.laplace.fit(net, laplace_batches(strategy, data))
                posterior = self.laplace.posterior(net)
            else:
                posterior = _optimizer_posterior(strategy)
            self.seconds["laplace"] += time.perf_counter() - start
            start = time.perf_counter()
            if self.anchor == "latest":
                self.prior.reanchor(net, posterior)
            self.prior.add_task(net, posterior, x, class_mask=mask)
            self.seconds["kernels"] += time.perf_counter() - start
            optimizer = strategy.optimizer
            if self.term_curvature and self._term_of_the_mean(strategy) and hasattr(optimizer, "mean_curvature"):
                start = time.perf_counter()
                self._curvature = self.prior.curvature(net)  # once per experience, not per step
                optimizer.mean_curvature = self._curvature
                self._gamma, self._last_step = 1.0, None
                self._scale_pending = True
                self.seconds["curvature"] += time.perf_counter() - start
        self.memory_indices.append(chosen)


__all__ = [
    "ANCHORS", "BLOCK_ESTIMATORS", "ESTIMATORS", "SELECTIONS", "TERM_AT", "FunctionalRegularisationPlugin",
    "gather_inputs", "laplace_batches",
]
