"""VCL inside Avalanche: ``vcl`` and ``vcl-coreset`` (Nguyen, Li, Bui & Turner, ICLR 2018).

The maths (mean-field posterior, closed-form KL, the mean-form objective, the
coreset algorithm) is in ``cl_bayes.vcl``. ``VCLStrategy`` is Avalanche's
``SupervisedTemplate`` with these changes:

* **Variational parameters.** The model's own trainable parameters are the
  posterior means mu (so the model evaluated as it is predicts at the mean and
  every Avalanche code path stays valid); the log standard deviations are one
  extra flat tensor ``log_std`` held by the strategy (the order of
  ``cl_bayes.jacobians.trainable_parameters``).
* **Training step** (``training_epoch``): per mini-batch, ``mc_samples``
  reparametrised samples ``w = mu + exp(log_std) * eps``; the network is run at
  each with ``torch.func.functional_call`` (gradients reach mu and log_std), the
  cross-entropies are averaged and ``KL(q || prior) / N_t`` is added (N_t: the
  experience's training-set size). Hooks run once per step in the usual order
  (``before_forward``, the sampled forwards, ``after_forward``, ``before_backward``,
  ``after_backward``, ``before_update``, ``after_update``); ``mb_output`` is the
  last sample's output.
* **Optimizer** (``make_optimizer``): Avalanche 0.6 rebuilds its optimizer over
  ``model.parameters()`` only; here every experience gets a fresh Adam (as VCL)
  over the means *and* ``log_std``, at ``lr``. Adam is not invariant to how the
  variances are parametrised, and VCL's code optimises the log-*variance*
  ``v = 2 log_std``: ``variance_parametrisation = "log_var"`` (the default) runs
  exactly that path, as Adam on ``log_std`` at ``(lr / 2, 2 eps)``
  (``variance_adam_group``). Adam moves every parameter by about ``lr`` per
  step whatever its gradient's size, so where the likelihood is flat the tiny
  ``KL / N_t`` gradient grows a standard deviation towards the prior's at that
  rate, twice as fast on log-std as on log-variance (docs/BISECTION.md, VCL,
  v3-v5: what it changes on the paper protocols).
* **Initial means** (``init_mean_std``, the registered strategies: 0.1): every
  weight and bias drawn from N(0, 0.1^2) truncated at two standard deviations,
  VCL's code's initialisation, before the maximum-likelihood start; fresh heads
  restart from it. ``None`` keeps the model's own initialisation (the
  constructor's default, for a model a user passes in).
* **First experience** (``_train_exp``): with ``ml_init_epochs > 0`` the means
  are first fitted by plain maximum likelihood (Adam, cross-entropy, no KL) on the
  experience's training data, as VCL initialises its first posterior; the standard
  deviations start at ``init_std`` (VCL's code: log-variance -6, std e^-3 ~ 0.05).
* **Prior** (``_after_training_exp``, before the plugins' hooks): the posterior,
  frozen (a ``DiagonalGaussian``), is the next experience's prior; the first prior
  is N(0, prior_var I).
* **Prediction** (``forward`` in evaluation, ``predict_proba``): the Monte-Carlo
  average of the softmax over ``test_samples`` posterior samples (VCL uses 100;
  default 10 here, the runner evaluates every experience after each one), or the
  mean network when ``test_samples == 0``; in Avalanche's evaluation loop the
  output is the log of the averaged probabilities, a valid logit vector.

**Task-incremental models** (``TaskMaskedModel``: one 10-way output layer, each
task sees only its classes). VCL gives every task a fresh head with prior
N(0, prior_var). Here the output rows (weights and bias) of a class are a head
part: until the first experience with that class they are *inactive*: they
have no likelihood term (their logits are masked), they are left out of the KL,
and their prior stays the first prior. At the start of that experience they
are reset to their initial mean and ``init_std`` (a fresh head), and from then
on they are ordinary parameters. Without this, 4 heads that have never seen
data would be carried along in the KL and shrunk to a tight prior around their
random initialisation before their task arrives. Single-head models (class- and
domain-incremental benchmarks) have no inactive parameters.

**Coreset VCL** (``memory_size > 0``, the paper's random coreset):

1. ``_before_training_exp``: restore the propagated posterior q~_{t-1} (the
   model may hold the coreset-refined q_{t-1}); draw the coreset C_t from D_t,
   class-balanced at random (``cl_bayes.avalanche.memory.random_selector``, seeded
   from the run's seed and the experience).
2. ``train_dataset_adaptation``: train on D_t minus C_t (N_t = its size), prior
   q~_{t-1}: the result is the propagated posterior q~_t.
3. ``_after_training_exp``: q~_t (frozen) becomes the next prior and is kept to
   restore at step 1; then, starting from q~_t with prior q~_t, the posterior is
   refined for ``coreset_epochs`` epochs on C_1 u ... u C_t (fresh Adam, mini-batches
   of ``train_mb_size``, KL / |C_1 u ... u C_t|): q_t, the test-time model. No
   plugin hooks run during the refinement.

With ``ml_init_epochs`` the maximum-likelihood start of the first experience
also uses D_1 minus C_1, so q~_1 never sees C_1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from avalanche.models.utils import avalanche_forward, is_multi_task_module
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor, nn
from torch.func import functional_call

from cl_bayes.avalanche.memory import experience_data, random_selector
from cl_bayes.avalanche.models import TaskMaskedModel
from cl_bayes.avalanche.strategies import BuildContext, register, with_plugins
from cl_bayes.jacobians import flat_parameters, trainable_parameters, unflatten
from cl_bayes.posterior import DiagonalGaussian
from cl_bayes.vcl import MeanFieldGaussian, isotropic_prior, vcl_objective


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


VARIANCE_PARAMETRISATIONS = ("log_var", "log_std")


def check_vcl_arguments(
    *, mc_samples, test_samples, prior_var, init_std, ml_init_epochs, memory_size=0, coreset_epochs=None,
    variance_parametrisation="log_var", init_mean_std=None,
) -> None:
    """Raise ``ValueError`` for an invalid VCL hyper-parameter (shared by the dataclasses and the strategy)."""
    if variance_parametrisation not in VARIANCE_PARAMETRISATIONS:
        raise ValueError(f"variance_parametrisation must be one of {VARIANCE_PARAMETRISATIONS}, "
                         f"got {variance_parametrisation!r}")
    if init_mean_std is not None and not (
        isinstance(init_mean_std, (int, float)) and not isinstance(init_mean_std, bool)
        and math.isfinite(init_mean_std) and init_mean_std > 0
    ):
        raise ValueError(f"init_mean_std must be positive and finite, or None, got {init_mean_std!r}")
    if not _is_int(mc_samples) or mc_samples < 1:
        raise ValueError(f"mc_samples must be an int >= 1, got {mc_samples!r}")
    if not _is_int(test_samples) or test_samples < 0:
        raise ValueError(f"test_samples must be an int >= 0, got {test_samples!r}")
    if not (isinstance(prior_var, (int, float)) and math.isfinite(prior_var) and prior_var > 0):
        raise ValueError(f"prior_var must be positive and finite, got {prior_var!r}")
    if not (isinstance(init_std, (int, float)) and math.isfinite(init_std) and init_std > 0):
        raise ValueError(f"init_std must be positive and finite, got {init_std!r}")
    if ml_init_epochs is not None and (not _is_int(ml_init_epochs) or ml_init_epochs < 0):
        raise ValueError(f"ml_init_epochs must be an int >= 0 or None, got {ml_init_epochs!r}")
    if not _is_int(memory_size) or memory_size < 0:
        raise ValueError(f"memory_size must be an int >= 0, got {memory_size!r}")
    if coreset_epochs is not None and (not _is_int(coreset_epochs) or coreset_epochs < 0):
        raise ValueError(f"coreset_epochs must be an int >= 0 or None, got {coreset_epochs!r}")


def _head_owner(model: nn.Module) -> Tensor | None:
    """For a ``TaskMaskedModel``: per flat parameter, the class whose output row it is (-1: shared).

    The output layer is the last ``nn.Linear`` with one output per class. None for other models.
    """
    if not isinstance(model, TaskMaskedModel):
        return None
    n_classes = model.class_masks.shape[1]
    heads = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == n_classes]
    if not heads:
        return None
    name, layer = heads[-1]
    pieces = []
    for pname, p in trainable_parameters(model):
        if pname == f"{name}.weight":
            pieces.append(torch.arange(n_classes).repeat_interleave(layer.in_features))
        elif pname == f"{name}.bias":
            pieces.append(torch.arange(n_classes))
        else:
            pieces.append(torch.full((p.numel(),), -1, dtype=torch.long))
    return torch.cat(pieces)


ADAM_EPS = 1e-8  # torch's and TensorFlow's Adam default


def variance_adam_group(lr: float, parametrisation: str) -> dict:
    """Adam's ``lr`` and ``eps`` for ``log_std`` that make it optimise the chosen variance parameter.

    Adam is not invariant to reparametrisation: VCL's code optimises the log-variance
    ``v = 2 log_std``. Its gradient is half of ``log_std``'s, and so are Adam's first
    moment and root second moment, so the step in ``v`` is ``lr m / (sqrt(s) + 2 eps)``
    in ``log_std``'s moments ``(m, s)``, i.e. half of it in ``log_std``: Adam on ``v`` at
    ``(lr, eps)`` is exactly Adam on ``log_std`` at ``(lr / 2, 2 eps)``.
    """
    if parametrisation == "log_var":
        return {"lr": lr / 2.0, "eps": 2.0 * ADAM_EPS}
    if parametrisation == "log_std":
        return {"lr": lr, "eps": ADAM_EPS}
    raise ValueError(f"variance_parametrisation must be one of {VARIANCE_PARAMETRISATIONS}, got {parametrisation!r}")


@torch.no_grad()
def truncated_normal_init(model: nn.Module, std: float) -> None:
    """Every trainable parameter (weights and biases) from N(0, std^2) truncated at 2 std (VCL's code: std 0.1)."""
    for _, p in trainable_parameters(model):
        nn.init.trunc_normal_(p, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


class VCLStrategy(SupervisedTemplate):
    """Variational continual learning in an Avalanche template (see the module docstring)."""

    def __init__(
        self,
        *,
        model: nn.Module,
        lr: float = 1e-3,
        mc_samples: int = 10,
        test_samples: int = 10,
        prior_var: float = 1.0,
        init_std: float = 0.05,
        ml_init_epochs: int = 0,
        memory_size: int = 0,
        coreset_epochs: int = 1,
        variance_parametrisation: str = "log_var",
        init_mean_std: float | None = None,
        seed: int = 0,
        **kwargs,
    ):
        check_vcl_arguments(mc_samples=mc_samples, test_samples=test_samples, prior_var=prior_var, init_std=init_std,
                            ml_init_epochs=ml_init_epochs, memory_size=memory_size, coreset_epochs=coreset_epochs,
                            variance_parametrisation=variance_parametrisation, init_mean_std=init_mean_std)
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        kwargs.pop("optimizer", None)  # the strategy builds its own Adam per experience
        placeholder = torch.optim.Adam(model.parameters(), lr=lr)
        super().__init__(model=model, optimizer=placeholder, **kwargs)
        self.model.to(self.device)
        self.lr = lr
        self.mc_samples = mc_samples
        self.test_samples = test_samples
        self.init_std = init_std
        self.ml_init_epochs = ml_init_epochs or 0
        self.memory_size = memory_size
        self.coreset_epochs = coreset_epochs or 0
        self.seed = seed
        self.variance_parametrisation = variance_parametrisation
        if init_mean_std is not None:
            truncated_normal_init(self.model, init_mean_std)

        initial = flat_parameters(self.model)
        self.initial_mean = initial.clone()
        self.log_std = torch.full_like(initial, math.log(init_std)).requires_grad_(True)
        self.first_prior = isotropic_prior(initial.numel(), prior_var, like=initial)
        self.prior: DiagonalGaussian = self.first_prior  # the prior of the experience being trained
        owner = _head_owner(self.model)
        self.head_owner = None if owner is None else owner.to(self.device)
        self.seen_classes = None if owner is None else torch.zeros(
            self.model.class_masks.shape[1], dtype=torch.bool, device=self.device)
        self.n_train = 1  # N_t, set per experience in train_dataset_adaptation
        self.trained_experiences = 0
        self.last_nll: Tensor | None = None  # last step's mean NLL and KL (for inspection)
        self.last_kl: Tensor | None = None
        self._weights: Tensor | None = None  # the sampled flat weights of the current forward pass
        # coreset state
        self.propagated: MeanFieldGaussian | None = None  # q~_t, detached (mean, log_std)
        self.coreset_indices: list[Tensor] = []  # per experience, indices into experience.dataset
        self._coreset_x: list[Tensor] = []
        self._coreset_y: list[Tensor] = []
        self._coreset_t: list[Tensor] = []
        self._current_coreset: Tensor | None = None
        self.optimizer = self._fresh_adam()

    # -- the posterior ----------------------------------------------------------------
    def _means(self) -> list[nn.Parameter]:
        return [p for _, p in trainable_parameters(self.model)]

    def posterior(self) -> MeanFieldGaussian:
        """q = N(mu, exp(log_std)^2); ``mean`` is differentiable in the model's parameters."""
        mean = torch.cat([p.reshape(-1) for p in self._means()])
        if mean.numel() != self.log_std.numel():
            raise RuntimeError("the model's trainable parameters changed size; VCL keeps a fixed flat posterior")
        return MeanFieldGaussian(mean=mean, log_std=self.log_std)

    def active_mask(self) -> Tensor | None:
        """Parameters in the model so far (see the module docstring); None when all are."""
        if self.head_owner is None:
            return None
        shared = self.head_owner < 0
        return shared | self.seen_classes[self.head_owner.clamp_min(0)]

    @torch.no_grad()
    def _load(self, mean: Tensor, log_std: Tensor, where: Tensor | None = None) -> None:
        """Set the means (model parameters) and log_std, everywhere or where ``where`` is True."""
        current = flat_parameters(self.model)
        if where is not None:
            mean = torch.where(where, mean, current)
            log_std = torch.where(where, log_std, self.log_std)
        for p, m in zip(self._means(), unflatten(self.model, mean).values(), strict=True):
            p.copy_(m)
        self.log_std.copy_(log_std)

    def kl_term(self, q: MeanFieldGaussian) -> Tensor:
        return q.kl(self.prior, self.active_mask())

    # -- forward at sampled weights -----------------------------------------------------
    def forward_at(self, flat: Tensor, x: Tensor, task_labels) -> Tensor:
        """The model's output at the flat weight vector ``flat`` (``functional_call``, differentiable)."""
        params = unflatten(self.model, flat)
        args = (x, task_labels) if is_multi_task_module(self.model) else (x,)
        return functional_call(self.model, params, args)

    def forward(self):
        if self.is_training:
            if self._weights is not None:
                return self.forward_at(self._weights, self.mb_x, self.mb_task_id)
            return super().forward()
        probs = self._average_probs(self.mb_x, self.mb_task_id)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()

    @torch.no_grad()
    def _average_probs(self, x: Tensor, task_labels) -> Tensor:
        if self.test_samples == 0:
            return torch.softmax(avalanche_forward(self.model, x, task_labels), dim=-1)
        q = self.posterior()
        total = None
        for _ in range(self.test_samples):
            p = torch.softmax(self.forward_at(q.sample(), x, task_labels), dim=-1)
            total = p if total is None else total + p
        return total / self.test_samples

    def predict_proba(self, x: Tensor, task: int) -> Tensor:
        """Class probabilities for ``x`` (all from task ``task``): MC average over ``test_samples`` samples."""
        self.model.eval()
        return self._average_probs(x, task)

    # -- optimizer --------------------------------------------------------------------
    def _fresh_adam(self) -> torch.optim.Optimizer:
        variances = {"params": [self.log_std], **variance_adam_group(self.lr, self.variance_parametrisation)}
        return torch.optim.Adam([{"params": self._means()}, variances], lr=self.lr)

    def make_optimizer(self, **kwargs):
        """A fresh Adam over the means and the log standard deviations (VCL restarts Adam per task)."""
        self.posterior()  # checks the sizes
        self.optimizer = self._fresh_adam()

    # -- experience boundaries ----------------------------------------------------------
    def _experience_classes(self) -> Tensor:
        classes = torch.zeros_like(self.seen_classes)
        for t in self.experience.task_labels:
            classes |= self.model.class_masks[int(t)].to(self.device)
        return classes

    def _start_heads(self) -> None:
        """Task-incremental: the output rows of classes seen for the first time become a fresh head."""
        if self.head_owner is None:
            return
        fresh = self._experience_classes() & ~self.seen_classes
        if fresh.any():
            where = (self.head_owner >= 0) & fresh[self.head_owner.clamp_min(0)]
            self._load(self.initial_mean, torch.full_like(self.log_std, math.log(self.init_std)), where)
            self.prior = DiagonalGaussian(
                mean=torch.where(where, self.first_prior.mean, self.prior.mean),
                precision=torch.where(where, self.first_prior.precision, self.prior.precision),
            )
        self.seen_classes |= fresh

    def _before_training_exp(self, **kwargs):
        if self.propagated is not None:  # coreset VCL: continue from q~_{t-1}, not the refined q_{t-1}
            self._load(self.propagated.mean, self.propagated.log_std)
        self._start_heads()
        if self.memory_size > 0:
            self._current_coreset = random_selector(seed=self.seed)(self, self.experience, self.memory_size)
        super()._before_training_exp(**kwargs)

    def train_dataset_adaptation(self, **kwargs):
        """The experience's data; for coreset VCL without the coreset. Sets N_t."""
        super().train_dataset_adaptation(**kwargs)
        if self._current_coreset is not None:
            n = len(self.experience.dataset)
            keep = torch.ones(n, dtype=torch.bool)
            keep[self._current_coreset] = False
            if not keep.any():
                raise ValueError(f"memory_size {self.memory_size} takes every example of the experience ({n})")
            rest = torch.nonzero(keep).squeeze(-1)
            self.adapted_dataset = self.experience.dataset.subset(rest.tolist()).train()
        self.n_train = len(self.adapted_dataset)

    def _train_exp(self, experience, eval_streams=None, **kwargs):
        if self.trained_experiences == 0 and self.ml_init_epochs > 0:
            self._ml_init()
        super()._train_exp(experience, eval_streams, **kwargs)

    def _after_training_exp(self, **kwargs):
        q = self.posterior()
        frozen = q.frozen()
        active = self.active_mask()
        if active is None:
            self.prior = frozen
        else:  # inactive head rows keep the first prior
            self.prior = DiagonalGaussian(mean=torch.where(active, frozen.mean, self.prior.mean),
                                          precision=torch.where(active, frozen.precision, self.prior.precision))
        self.trained_experiences += 1
        if self.memory_size > 0:
            self.propagated = MeanFieldGaussian(mean=q.mean.detach().clone(), log_std=self.log_std.detach().clone())
            self._store_coreset()
            self._refine_on_coresets()
        super()._after_training_exp(**kwargs)

    # -- maximum-likelihood start and coreset refinement --------------------------------------
    def _check_finite(self, loss: Tensor, where: str) -> None:
        if not torch.isfinite(loss).all():
            from cl_bayes.avalanche.runner import NonFiniteLossError

            raise NonFiniteLossError(f"non-finite loss ({loss.item()}) in {where}; try a smaller lr")

    def _ml_init(self) -> None:
        """Plain maximum-likelihood fit of the means (Adam, cross-entropy) on this experience's training data."""
        optimizer = torch.optim.Adam(self._means(), lr=self.lr)
        for _ in range(self.ml_init_epochs):
            for self.mbatch in self.dataloader:  # noqa: B020 (Avalanche's own loop idiom)
                self._unpack_minibatch()
                loss = self._criterion(avalanche_forward(self.model, self.mb_x, self.mb_task_id), self.mb_y)
                self._check_finite(loss, "VCL's maximum-likelihood initialisation")
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        self.mbatch = None

    def _store_coreset(self) -> None:
        data = experience_data(self.experience)
        chosen = self._current_coreset
        self.coreset_indices.append(chosen)
        self._coreset_x.append(data.x()[chosen].to(self.device))
        self._coreset_y.append(data.y[chosen].to(self.device))
        self._coreset_t.append(data.t[chosen].to(self.device))
        self._current_coreset = None

    def coreset_tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        """(x, y, task labels) of the union of the coresets so far."""
        return torch.cat(self._coreset_x), torch.cat(self._coreset_y), torch.cat(self._coreset_t)

    def _refine_on_coresets(self) -> None:
        """q_t: q~_t refined on all coresets with prior q~_t (self.prior), for ``coreset_epochs`` epochs."""
        if self.coreset_epochs == 0:
            return
        x, y, t = self.coreset_tensors()
        n = len(y)
        generator = torch.Generator().manual_seed(self.seed * 10_007 + 5_003 + self.trained_experiences)
        optimizer = self._fresh_adam()
        was_training = self.model.training
        self.model.train()
        for _ in range(self.coreset_epochs):
            order = torch.randperm(n, generator=generator).to(self.device)
            for start in range(0, n, self.train_mb_size):
                idx = order[start : start + self.train_mb_size]
                q = self.posterior()
                nll = sum(
                    self._criterion(self.forward_at(q.sample(), x[idx], t[idx]), y[idx]) for _ in range(self.mc_samples)
                ) / self.mc_samples
                loss = vcl_objective(nll, self.kl_term(q), n)
                self._check_finite(loss, "VCL's coreset refinement")
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        self.model.train(was_training)

    # -- training ----------------------------------------------------------------------
    def training_epoch(self, **kwargs):
        for self.mbatch in self.dataloader:  # noqa: B020 (Avalanche's own loop idiom)
            if self._stop_training:
                break
            self._unpack_minibatch()
            self._before_training_iteration(**kwargs)
            self.optimizer.zero_grad()
            self.loss = self._make_empty_loss()
            self._before_forward(**kwargs)
            q = self.posterior()
            nll = 0.0
            try:
                for _ in range(self.mc_samples):
                    self._weights = q.sample()
                    self.mb_output = self.forward()
                    nll = nll + self.criterion()
            finally:
                self._weights = None
            self._after_forward(**kwargs)
            self.last_nll = nll / self.mc_samples
            self.last_kl = self.kl_term(q)
            self.loss += vcl_objective(self.last_nll, self.last_kl, self.n_train)
            self._before_backward(**kwargs)
            self.backward()
            self._after_backward(**kwargs)
            self._before_update(**kwargs)
            self.optimizer_step()
            self._after_update(**kwargs)
            self._after_training_iteration(**kwargs)


# --- registry -----------------------------------------------------------------------


@dataclass
class VCLParams:
    mc_samples: int = 10  # weight samples per training step, their losses averaged (VCL: 10)
    test_samples: int = 10  # weight samples of the predictive average (VCL: 100; 0: predict at the mean)
    prior_var: float = 1.0  # variance of the first prior N(0, prior_var I) (VCL: 1)
    init_std: float = 0.05  # initial posterior std of every parameter (VCL's code: log-variance -6, std e^-3)
    ml_init_epochs: int | None = None  # maximum-likelihood epochs before VI, first experience (None: epochs, as VCL)
    variance_parametrisation: str = "log_var"  # what Adam optimises: "log_var" (VCL's code) or "log_std"
    init_mean_std: float | None = 0.1  # initial means ~ N(0, s^2) truncated at 2s (VCL's code: 0.1); None: the model's

    def __post_init__(self):
        check_vcl_arguments(mc_samples=self.mc_samples, test_samples=self.test_samples, prior_var=self.prior_var,
                            init_std=self.init_std, ml_init_epochs=self.ml_init_epochs,
                            variance_parametrisation=self.variance_parametrisation,
                            init_mean_std=self.init_mean_std, **self._coreset_arguments())

    def _coreset_arguments(self) -> dict:
        return {}


@dataclass
class VCLCoresetParams(VCLParams):
    memory_size: int = 40  # coreset examples drawn per experience, class-balanced at random, held out of its training
    coreset_epochs: int | None = None  # epochs refining on all coresets before prediction (None: epochs; 0: none)

    def __post_init__(self):
        if not _is_int(self.memory_size) or self.memory_size < 1:
            raise ValueError(f"memory_size must be an int >= 1, got {self.memory_size!r}")
        super().__post_init__()

    def _coreset_arguments(self) -> dict:
        return {"memory_size": self.memory_size, "coreset_epochs": self.coreset_epochs}


def vcl_strategy(ctx: BuildContext) -> VCLStrategy:
    p = ctx.params
    epochs = ctx.config.epochs
    coreset = isinstance(p, VCLCoresetParams)
    return VCLStrategy(
        lr=ctx.config.lr, mc_samples=p.mc_samples, test_samples=p.test_samples, prior_var=p.prior_var,
        init_std=p.init_std, ml_init_epochs=epochs if p.ml_init_epochs is None else p.ml_init_epochs,
        memory_size=p.memory_size if coreset else 0,
        coreset_epochs=(epochs if p.coreset_epochs is None else p.coreset_epochs) if coreset else 0,
        variance_parametrisation=p.variance_parametrisation, init_mean_std=p.init_mean_std,
        seed=ctx.config.seed, plugins=with_plugins(ctx), **ctx.template_args(),
    )


@register("vcl", VCLParams, "VCL (Nguyen et al., 2018): mean-field Gaussian VI, each posterior the next prior")
def _vcl(ctx: BuildContext):
    return vcl_strategy(ctx)


@register(
    "vcl-coreset", VCLCoresetParams,
    "VCL with a random coreset: propagated posterior trained without it, refined on all coresets to predict",
)
def _vcl_coreset(ctx: BuildContext):
    return vcl_strategy(ctx)
