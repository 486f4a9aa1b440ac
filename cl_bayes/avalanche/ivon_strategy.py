"""IVON inside Avalanche: a drop-in for ``Naive`` with Adam, and natural-parameter accumulation.

``IVONStrategy`` is Avalanche's ``SupervisedTemplate`` with three changes:

* **training step** (``training_epoch``): each mini-batch is seen at ``mc_samples``
  posterior samples; for each sample the usual hooks run in the usual order
  (``before_forward``, ``after_forward``, ``before_backward``, ``after_backward``)
  inside ``optimizer.sampled_params(train=True)``, so plugins that add to the loss
  (EWC, LwF, FROMP) regularise the sampled network; then ``before_update``,
  one IVON ``step``, ``after_update``. Replay plugins only change the data
  loader and work unchanged.
* **optimizer lifetime** (``make_optimizer``): Avalanche resets optimizer state
  at every experience (its issue #725); here the IVON optimizer is kept as it
  is, and only ``ess`` is set to the new experience's training-set size (unless
  ``ess`` was given).
* **learning-rate schedule** (``lr_schedule``, ``cl_bayes.schedules``): ``constant``
  (the default) or ``cosine``, annealed over each experience's ``train_epochs *
  len(dataloader)`` steps and restarted at the next one; set before each IVON step.
* **prediction** (``forward`` in evaluation, ``predict_proba``): the Bayesian
  model average of the softmax over ``test_samples`` posterior samples, or the
  posterior mean when ``test_samples == 0``. In Avalanche's evaluation loop the
  output is the log of the averaged probabilities, a valid logit vector.

``NaturalParameterAccumulation`` is a plugin over one hook, ``after_training_exp``:
the posterior of the experience becomes the prior of the next one
(``cl_bayes.natural.carry_posterior_to_prior``).
"""

from __future__ import annotations

import torch
from avalanche.models.utils import avalanche_forward
from avalanche.training.plugins import SupervisedPlugin
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor

from cl_bayes.ivon import IVON
from cl_bayes.natural import carry_posterior_to_prior
from cl_bayes.schedules import check_schedule, lr_at


class IVONStrategy(SupervisedTemplate):
    """Avalanche strategy trained with the IVON optimizer (see the module docstring)."""

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        optimizer: IVON,
        mc_samples: int = 1,
        test_samples: int = 10,
        ess: float | None = None,
        lr_schedule: str = "constant",
        **kwargs,
    ):
        if not isinstance(optimizer, IVON):
            raise TypeError(f"IVONStrategy needs a cl_bayes.ivon.IVON optimizer, got {type(optimizer).__name__}")
        if mc_samples < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
        if test_samples < 0:
            raise ValueError(f"test_samples must be >= 0, got {test_samples}")
        super().__init__(model=model, optimizer=optimizer, **kwargs)
        self.mc_samples = mc_samples
        self.test_samples = test_samples
        self.fixed_ess = ess
        self.lr_schedule = check_schedule(lr_schedule)
        self._base_lrs = [group["lr"] for group in optimizer.param_groups]
        self._lr_step = 0  # IVON steps taken in this experience
        self._lr_total = 1  # IVON steps this experience will take (set in make_optimizer)

    # -- optimizer lifetime ---------------------------------------------------------
    def make_optimizer(self, **kwargs):
        """Keep IVON's posterior across experiences; set ``ess`` to this experience's data size."""
        self.optimizer.ess = float(self.fixed_ess or len(self.experience.dataset))
        self._lr_step = 0
        self._lr_total = max(1, self.train_epochs * len(self.dataloader))

    def _set_lr(self) -> None:
        """This step's learning rate in every group (``lr_schedule``); a no-op when constant."""
        if self.lr_schedule == "constant":
            return
        for group, base in zip(self.optimizer.param_groups, self._base_lrs, strict=True):
            group["lr"] = lr_at(self.lr_schedule, base, self._lr_step, self._lr_total)
        self._lr_step += 1

    # -- training -------------------------------------------------------------------
    def training_epoch(self, **kwargs):
        for self.mbatch in self.dataloader:  # noqa: B020 (Avalanche's own loop idiom)
            if self._stop_training:
                break
            self._unpack_minibatch()
            self._before_training_iteration(**kwargs)
            total = 0.0
            for _ in range(self.mc_samples):
                with self.optimizer.sampled_params(train=True):
                    self.optimizer.zero_grad()
                    self.loss = self._make_empty_loss()
                    self._before_forward(**kwargs)
                    self.mb_output = self.forward()
                    self._after_forward(**kwargs)
                    self.loss += self.criterion()
                    self._before_backward(**kwargs)
                    self.backward()
                    self._after_backward(**kwargs)
                total += self.loss.detach()
            self.loss = total / self.mc_samples
            self._before_update(**kwargs)
            self._set_lr()
            self.optimizer_step()
            self._after_update(**kwargs)
            self._after_training_iteration(**kwargs)

    # -- prediction -----------------------------------------------------------------
    @torch.no_grad()
    def _average_probs(self, logits_fn) -> Tensor:
        if self.test_samples == 0:
            return torch.softmax(logits_fn(), dim=-1)
        total = None
        for _ in range(self.test_samples):
            with self.optimizer.sampled_params():
                p = torch.softmax(logits_fn(), dim=-1)
            total = p if total is None else total + p
        return total / self.test_samples

    def forward(self):
        if self.is_training:
            return super().forward()
        probs = self._average_probs(super().forward)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()

    def predict_proba(self, x: Tensor, task: int) -> Tensor:
        """Class probabilities for ``x`` (all from task ``task``): BMA, or the mean when test_samples == 0."""
        self.model.eval()
        return self._average_probs(lambda: avalanche_forward(self.model, x, task))


class NaturalParameterAccumulation(SupervisedPlugin):
    """After each experience (hook ``after_training_exp``): prior <- posterior, natural parameters add up.

    ``keep_hess``: keep IVON's Hessian estimate as a warm start (it then counts the old
    data twice until it adapts) or reset it to ``hess_init``; ``temper`` multiplies the
    carried precision (< 1 forgets a little, 1 is plain Bayes); ``debias_hess``: carry the
    data's Hessian without what is left of ``hess_init`` (``cl_bayes.natural``).
    """

    def __init__(self, *, keep_hess: bool = False, temper: float = 1.0, debias_hess: bool = False):
        super().__init__()
        self.keep_hess = keep_hess
        self.temper = temper
        self.debias_hess = debias_hess

    def after_training_exp(self, strategy, **kwargs):
        carry_posterior_to_prior(
            strategy.optimizer, keep_hess=self.keep_hess, temper=self.temper, debias_hess=self.debias_hess
        )
