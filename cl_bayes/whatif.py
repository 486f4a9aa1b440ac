r"""``cl-bayes whatif``: what if a class, or an experience, had never been in the training data?

Train (or load) an IVON model on a benchmark's stream, then estimate *without
retraining the network* how held-out predictions and NLL would change had a group G
of training examples (one class, or one experience's data) been left out: by default
by retraining only its output layer on fixed features (``head-retrain``, below), or by
the memory-perturbation equation (Nickl et al., NeurIPS 2023; ``cl_bayes.sensitivity``):
the posterior's natural parameters are the prior's plus one site per example,
so removing G subtracts the GGN sites of its examples,

    s^{\G} = s - omega sum_G diag(J^T Lam J),     m^{\G} = m + omega (s^{\G})^{-1} sum_G J^T e,

and the held-out predictions are the network's at m^{\G} (one forward pass; ``--linearise``: its
linearisation f(m) + J_* (m^{\G} - m), one JVP; ``whatif_remove``).
omega = ess / n_t is the weight of one example of experience t in IVON's
posterior (1 unless ``ess`` is fixed).

The default strategy is ``ivon-prior``: with natural-parameter accumulation the
final posterior is the prior times every experience's contribution, which is the
setting the equation assumes. Any strategy built on ``IVONStrategy`` is accepted
(``ivon``'s posterior holds mostly the last experiences' curvature, so expect a
worse estimate).

``--verify`` retrains from scratch without G (same seed, so the same
initialisation, same settings; an experience left empty is skipped) and compares,
per held-out example, the estimated and the true change of the probability of
the true class and of the NLL (Pearson and Spearman correlations), the time of
the estimate against the time of retraining, and draws the estimate-against-truth
scatter plot. All predictions here are at the posterior mean (no model average),
as in the equation; so is the retrained model's. JSON (and PNG) are written atomically, never over an existing
file unless ``--overwrite``.

    cl-bayes whatif --benchmark split-mnist --remove-class 3 --verify
    cl-bayes whatif --benchmark split-mnist --remove-experience 2 --verify --set train_per_experience=1000

Three estimators (``--estimator``):

* ``head-retrain`` (default, ``cl_bayes.last_layer.retrain_output_layer``): the body is held at the
  posterior mean, the output layer's inputs are computed once for the remaining data of the
  experiences whose classes meet the group's, and the output layer alone is retrained from its
  initial weights (the seed's, as retraining starts) on them, with the strategy's own IVON settings,
  experience after experience (with natural-parameter accumulation for ``ivon-prior``). The
  retrained output rows replace those the group reaches; the held-out logits are then exact. Other
  training plugins (replay, FROMP) are not mirrored: the results file lists them.
* ``last-layer`` (``cl_bayes.last_layer.last_layer_removal``): the memory-perturbation step for the
  output layer: one Newton step with its *dense* GGN over the remaining data (rows the group
  reaches only), prior precision ``weight_decay * ess``, the body held at the mean.
* ``diagonal`` (``cl_bayes.sensitivity.whatif_remove``): the equation above with IVON's
  diagonal precision over every weight. After a short run that precision is still close to
  ``ess * hess_init``, so the step is nearly a plain gradient step of the group's loss
  through the shared weights and overshoots on examples the group never touched.

What to expect (quick protocol, ``cl-bayes whatif --benchmark split-mnist --remove-class C
--seed S --verify [--estimator E] --threads 1``, 2-core CPU shared with other runs; results in
``results/whatif/quick/split-mnist/ivon-prior/``; the README's what-if section has the table).
Removing a class is a large perturbation: the task it belonged to keeps one class, whose data
are separable, so the remaining data's GGN is nearly zero in the removed class's directions and
the size of the memory-perturbation step is set by the prior alone. The Newton steps get the
direction of each example's change and miss its size by factors that swing from seed to seed
(mean held-out NLL change, classes 3 and 7: estimated +0.4 to +32, true +0.4 to +0.8), so their per-example
Pearson r falls below 0.8 (p(true)) or 0.9 (NLL) on some seeds and classes. Retraining the output
layer mimics the finite run that retraining is and keeps r above both on every class and seed
measured, while overshooting the size of the NLL change (it keeps the body's features for the
removed class, which retraining never learns). Using IVON's own precision as the Newton step's
prior instead (tried at x1 and x0.1) made r worse (0.41-0.91 for p(true)). In a tiny setting (5
epochs, 300 examples per experience), where IVON's precision has converged, the diagonal
estimator is the better Newton step. A whole experience is a much larger perturbation and is not
estimated reliably by the diagonal estimator (r between -0.4 and 0.4 over 3 seeds x experiences
1, 2 on a small split-mnist run). The equation assumes the posterior mean is near-stationary for
all the data; where the model has forgotten old classes (class-incremental benchmarks without
replay) that fails and so does the estimate.

Cost. ``head-retrain`` does one forward pass over the remaining data of the group's experiences and
trains a softmax regression on it (one epoch of a task: ~50 small IVON steps); ``last-layer`` one
forward and backward pass over the group, one forward pass over the same remaining data and a solve
of size ``|R| (F + 1)``; ``diagonal`` adds the group's GGN diagonal
(``cl_bayes.laplace.diagonal_ggn``). Then one forward pass over the held-out data. The estimate
does not grow with the body's size or the number of epochs the way retraining does (except
``head-retrain``'s steps, which follow the strategy's epochs).

``--merge E,E,...`` (``cl_bayes.whatif_merge``) previews the merge of some experiences'
``ivon-merge`` posteriors without retraining.

Heavy imports (torch, Avalanche) happen inside the functions, so adding this
subcommand does not slow down the CLI's start.
"""

from __future__ import annotations

import argparse
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cl_bayes.results import ResultsError, write_bytes_atomic

DEFAULT_STRATEGY = "ivon-prior"
# cl_bayes.sensitivity.whatif_remove, cl_bayes.last_layer.last_layer_removal, cl_bayes.last_layer.retrain_output_layer
ESTIMATORS = ("diagonal", "last-layer", "head-retrain")
DEFAULT_ESTIMATOR = "head-retrain"
# plugins that retraining the output layer mirrors, or that do not change training
_MIRRORED_PLUGINS = {"NaturalParameterAccumulation", "NonFiniteLossGuard", "EvaluationPlugin", "PeriodicEval", "Clock"}
CHECKPOINT_VERSION = 1


class WhatIfError(ValueError):
    """A what-if request the user can fix (bad group, non-IVON strategy, clashing files)."""


@dataclass(frozen=True)
class Group:
    """The training examples to remove: one class, or one experience (0-based)."""

    kind: str  # "class" or "experience"
    value: int

    def __post_init__(self):
        if self.kind not in ("class", "experience"):
            raise WhatIfError(f"group kind must be 'class' or 'experience', got {self.kind!r}")
        if self.value < 0:
            raise WhatIfError(f"{self.kind} must be >= 0, got {self.value}")

    @property
    def label(self) -> str:
        return f"{self.kind}{self.value}"

    def train_masks(self, bundle) -> list:
        """Per training experience, a bool mask of the examples in the group."""
        import torch

        if self.kind == "experience":
            if self.value >= bundle.n_experiences:
                raise WhatIfError(f"experience {self.value} out of range (0..{bundle.n_experiences - 1})")
            return [torch.full((len(e.y),), i == self.value) for i, e in enumerate(bundle.train)]
        masks = [e.y == self.value for e in bundle.train]
        if not any(bool(m.any()) for m in masks):
            raise WhatIfError(f"class {self.value} has no training examples in {bundle.name}")
        return masks

    def heldout_mask(self, bundle):
        """Held-out examples of the removed class, or of the removed experience."""
        import torch

        if self.kind == "experience":
            return torch.cat([torch.full((len(e.y),), i == self.value) for i, e in enumerate(bundle.eval)])
        return torch.cat([e.y == self.value for e in bundle.eval])


# --- training ---------------------------------------------------------------------


def _stream(bundle, drop: list | None):
    """Avalanche train stream over the bundle's tensors, without the ``drop``ped examples."""
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels
    from avalanche.benchmarks.utils.classification_dataset import (
        _make_taskaware_tensor_classification_dataset as tensor_dataset,
    )

    datasets, kept = [], []
    for i, e in enumerate(bundle.train):
        keep = slice(None) if drop is None else ~drop[i]
        x, y = e.x[keep], e.y[keep]
        if len(y) == 0:
            continue  # an experience left empty is skipped
        datasets.append(tensor_dataset(x, y, task_labels=e.task))
        kept.append(i)
    stream = with_task_labels(with_classes_timeline(benchmark_from_datasets(train=datasets))).train_stream
    return stream, kept


def train_ivon(config, bundle, drop: list | None = None):
    """(strategy, seconds, {experience: omega}) of IVON trained on the stream minus ``drop``.

    The strategy is built exactly as ``cl-bayes run`` builds it (same seed, so the same
    initial weights, and the same initial prior, whatever is dropped).
    """
    import warnings

    from cl_bayes.avalanche.ivon_strategy import IVONStrategy
    from cl_bayes.avalanche.runner import build_strategy, seed_everything
    from cl_bayes.sensitivity import example_weight

    seed_everything(config.seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No loggers specified")
        strategy, definition = build_strategy(config, bundle)
    if not isinstance(strategy, IVONStrategy) or definition.joint:
        raise WhatIfError(f"whatif needs an IVON strategy trained on the stream (e.g. ivon-prior), "
                          f"got '{config.strategy}'")
    stream, kept = _stream(bundle, drop)
    omegas = {}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        for i, experience in zip(kept, stream, strict=True):
            strategy.train(experience)
            omegas[i] = example_weight(ess=strategy.optimizer.ess, n_train=len(experience.dataset))
    return strategy, time.perf_counter() - start, omegas


def head_training_setup(config, bundle):
    """(initial output-layer weight, bias, ``HeadTraining``, plugins not mirrored) of ``config``'s strategy.

    The strategy is built as ``cl-bayes run`` builds it (same seed, so the same initial weights); nothing is
    trained. The IVON settings are read from its optimizer, the accumulation settings from its plugins.
    """
    import warnings

    from cl_bayes.avalanche.ivon_strategy import NaturalParameterAccumulation
    from cl_bayes.avalanche.models import unwrap
    from cl_bayes.avalanche.runner import build_strategy, seed_everything
    from cl_bayes.last_layer import HeadTraining, output_layer

    seed_everything(config.seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No loggers specified")
        strategy, _ = build_strategy(config, bundle)
    layer = output_layer(unwrap(strategy.model))
    weight = layer.weight.detach().clone()
    bias = None if layer.bias is None else layer.bias.detach().clone()
    group = strategy.optimizer.param_groups[0]
    accumulation = [p for p in strategy.plugins if isinstance(p, NaturalParameterAccumulation)]
    carry = {"keep_hess": accumulation[0].keep_hess, "temper": accumulation[0].temper,
             "debias_hess": accumulation[0].debias_hess} if accumulation else {}
    training = HeadTraining(
        lr=group["lr"], epochs=strategy.train_epochs, batch_size=strategy.train_mb_size, hess_init=group["hess_init"],
        beta1=group["beta1"], beta2=group["beta2"], weight_decay=group["weight_decay"],
        mc_samples=strategy.optimizer.mc_samples, clip_radius=group["clip_radius"], ess=strategy.fixed_ess,
        lr_schedule=strategy.lr_schedule, accumulate=bool(accumulation), seed=config.seed, **carry,
    )
    others = sorted({type(p).__name__ for p in strategy.plugins} - _MIRRORED_PLUGINS)
    return weight, bias, training, others


def _save_checkpoint(path: Path, config, strategy, seconds: float, omegas: dict) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    posterior = strategy.optimizer.posterior
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({
        "version": CHECKPOINT_VERSION, "config": config.to_dict(), "model": strategy.model.state_dict(),
        "posterior_mean": posterior.mean.cpu(), "posterior_precision": posterior.precision.cpu(),
        "train_s": seconds, "omegas": omegas,
    }, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, config, bundle):
    """(model, posterior, seconds, omegas) from a checkpoint written for exactly this config."""
    import torch

    from cl_bayes.avalanche.models import TaskMaskedModel
    from cl_bayes.models import build_model
    from cl_bayes.posterior import DiagonalGaussian

    state = torch.load(path, map_location=config.device, weights_only=False)
    if state.get("version") != CHECKPOINT_VERSION or state.get("config") != config.to_dict():
        raise WhatIfError(f"{path} was written for another configuration; remove it or pick another --checkpoint")
    net = build_model(config.model, input_shape=bundle.input_shape, num_classes=bundle.num_classes,
                      hidden=config.hidden)
    model = TaskMaskedModel(net, bundle.class_masks) if bundle.class_masks is not None else net
    model.load_state_dict(state["model"])
    posterior = DiagonalGaussian(state["posterior_mean"].to(config.device),
                                 state["posterior_precision"].to(config.device))
    return model.to(config.device), posterior, state["train_s"], state["omegas"]


# --- estimate and truth -----------------------------------------------------------


def _masked_inputs(model, experiences, device: str):
    """(x, y, class mask or None) of a list of ExperienceTensors, concatenated."""
    import torch

    from cl_bayes.avalanche.models import class_mask

    x = torch.cat([e.x for e in experiences]).to(device)
    y = torch.cat([e.y for e in experiences]).to(device)
    t = torch.cat([torch.full((len(e.y),), e.task, dtype=torch.long) for e in experiences]).to(device)
    return x, y, class_mask(model, t, len(y))


@dataclass
class _Predictions:
    p_true: Any  # (H,) probability of the true class
    nll: Any  # (H,) per-example NLL
    correct: Any  # (H,) bool


def _predictions(logits, y, mask) -> _Predictions:
    from cl_bayes.jacobians import masked_log_softmax

    logp = masked_log_softmax(logits, mask).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    scores = logits if mask is None else logits.masked_fill(~mask, float("-inf"))
    return _Predictions(p_true=logp.exp().cpu(), nll=(-logp).cpu(), correct=(scores.argmax(-1) == y).cpu())


def _correlations(estimate, truth) -> dict[str, float | None]:
    import numpy as np
    from scipy.stats import pearsonr, spearmanr

    est, tru = np.asarray(estimate, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if len(est) < 3 or np.ptp(est) == 0 or np.ptp(tru) == 0:
        return {"pearson": None, "spearman": None}
    return {"pearson": float(pearsonr(est, tru)[0]), "spearman": float(spearmanr(est, tru)[0])}


def _summary(before: _Predictions, after: _Predictions) -> dict[str, float]:
    return {"accuracy": float(after.correct.float().mean()), "mean_nll": float(after.nll.mean()),
            "mean_p_true": float(after.p_true.mean()),
            "mean_change_p_true": float((after.p_true - before.p_true).mean()),
            "mean_change_nll": float((after.nll - before.nll).mean())}


def _head_retrain_delta(config, bundle, model, net, mean, rest_parts, rows):
    """(delta moving only the output layer's rows R, plugins not mirrored): the ``head-retrain`` estimate."""
    import torch

    from cl_bayes.last_layer import features_and_logits, output_layer, output_layer_slices, retrain_output_layer

    weight0, bias0, training, not_mirrored = head_training_setup(config, bundle)
    layer = output_layer(net)
    n_in = layer.in_features
    experiences = []
    for part in rest_parts:  # training order
        if len(part.y) == 0:
            continue  # an experience left empty is skipped, as retraining skips it
        x, y, mask = _masked_inputs(model, [part], config.device)
        phit, _ = features_and_logits(net, layer, mean, x)
        experiences.append((phit[:, :n_in], y, mask))
    weight, bias = retrain_output_layer(weight0.to(mean.device), None if bias0 is None else bias0.to(mean.device),
                                        experiences, training)
    w_slice, b_slice = output_layer_slices(net, layer)
    moved = torch.ones(layer.out_features, dtype=torch.bool, device=mean.device) if rows is None else rows
    delta = torch.zeros_like(mean.detach())
    w_delta = delta[w_slice].view(layer.weight.shape)
    w_delta[moved] = (weight - mean[w_slice].view(layer.weight.shape))[moved].to(delta.dtype)
    if b_slice is not None:
        delta[b_slice][moved] = (bias - mean[b_slice])[moved].to(delta.dtype)
    return delta, not_mirrored


def _estimator_record(estimator: str, removal, posterior, *, linearise: bool,
                      min_precision_fraction: float, not_mirrored: list[str]) -> dict[str, Any]:
    """What the results file says about how the estimate was made."""
    if estimator == "head-retrain":
        return {"name": estimator, "linearise": False, "plugins_not_mirrored": not_mirrored,
                "equation": "output layer retrained from its initial weights on the remaining data's features, body "
                            "fixed, with the strategy's IVON settings (cl_bayes.last_layer.retrain_output_layer)"}
    if estimator == "last-layer":
        return {"name": estimator, "linearise": False,
                "equation": "dense output-layer GGN Newton step, body fixed (cl_bayes.last_layer.last_layer_removal)"}
    floored = (removal.precision <= min_precision_fraction * posterior.precision * (1 + 1e-6)).sum()
    return {"name": estimator, "linearise": linearise, "min_precision_fraction": min_precision_fraction,
            "floored_parameters": int(floored), "equation": "MPE group removal (cl_bayes.sensitivity.whatif_remove)"}


def whatif(
    config,
    group: Group,
    *,
    data_root: str | None = None,
    verify: bool = False,
    linearise: bool = False,
    checkpoint: str | os.PathLike | None = None,
    chunk_size: int | None = None,
    min_precision_fraction: float = 1e-3,
    estimator: str = DEFAULT_ESTIMATOR,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Estimate (and with ``verify`` measure) the effect of removing ``group``.

    Returns (summary for JSON, per-example arrays for plotting: ``est_dp``, ``true_dp``,
    ``est_dnll``, ``true_dnll``, ``in_group``).
    """
    import torch

    from cl_bayes.avalanche.benchmarks import build_benchmark
    from cl_bayes.avalanche.models import unwrap
    from cl_bayes.jacobians import model_outputs
    from cl_bayes.last_layer import last_layer_logits, last_layer_removal
    from cl_bayes.sensitivity import removal_from_logits, whatif_remove

    if estimator not in ESTIMATORS:
        raise WhatIfError(f"unknown estimator {estimator!r} (known: {', '.join(ESTIMATORS)})")
    not_mirrored: list[str] = []
    if linearise and estimator != "diagonal":
        raise WhatIfError("--linearise needs --estimator diagonal (the last-layer estimate is already exact: "
                          "the logits are linear in the output layer)")
    bundle = build_benchmark(config, data_root=data_root)
    drop = group.train_masks(bundle)
    loaded = False
    if checkpoint is not None and Path(checkpoint).exists():
        model, posterior, train_s, omegas = _load_checkpoint(Path(checkpoint), config, bundle)
        loaded = True
    else:
        strategy, train_s, omegas = train_ivon(config, bundle)
        model, posterior = strategy.model, strategy.optimizer.posterior
        if checkpoint is not None:
            _save_checkpoint(Path(checkpoint), config, strategy, train_s, omegas)
    model.eval()
    net = unwrap(model)

    in_group = [i for i, m in enumerate(drop) if bool(m.any())]
    group_omegas = {omegas[i] for i in in_group}
    if len(group_omegas) != 1:
        raise WhatIfError(f"the group spans experiences with different example weights {sorted(group_omegas)} "
                          "(a fixed ess); remove one experience at a time")
    (omega,) = group_omegas

    device = config.device
    hx, hy, hmask = _masked_inputs(model, bundle.eval, device)
    # time the estimate from the tensors on (group gathering included, training data loading not)
    start = time.perf_counter()
    group_parts = []
    for i in in_group:
        e = bundle.train[i]
        m = drop[i]
        group_parts.append(type(e)(x=e.x[m], y=e.y[m], task=e.task, classes=e.classes))
    gx, gy, gmask = _masked_inputs(model, group_parts, device)
    if estimator == "diagonal":
        removal = whatif_remove(
            net, posterior, group_x=gx, group_y=gy, heldout_x=hx, heldout_y=hy, group_class_mask=gmask,
            heldout_class_mask=hmask, ess=omega, n_train=1.0,  # example weight omega = ess / n_train
            linearise=linearise, min_precision_fraction=min_precision_fraction, chunk_size=chunk_size,
        )
    else:  # last-layer, head-retrain: the body held at the mean, the output layer's rows R move
        from cl_bayes.avalanche.models import class_mask

        rows = None if gmask is None else gmask.any(dim=0)  # output rows the group's gradient reaches
        rest_parts = []
        for i, e in enumerate(bundle.train):
            task_mask = None if rows is None else class_mask(model, torch.tensor([e.task], device=device), 1)
            if task_mask is not None and not bool((task_mask[0] & rows).any()):
                continue  # this experience's examples add nothing to the rows
            keep = ~drop[i]
            rest_parts.append(type(e)(x=e.x[keep], y=e.y[keep], task=e.task, classes=e.classes))
        if estimator == "last-layer":
            rx, ry, rmask = _masked_inputs(model, rest_parts, device)
            ess_group = omega * len(bundle.train[in_group[0]].y)  # the IVON prior: weight_decay * ess
            delta = last_layer_removal(
                net, posterior.mean, group_x=gx, group_y=gy, rest_x=rx, rest_y=ry, omega=omega,
                prior_precision=config.params["weight_decay"] * ess_group, group_class_mask=gmask,
                rest_class_mask=rmask,
            )
        else:
            delta, not_mirrored = _head_retrain_delta(config, bundle, model, net, posterior.mean, rest_parts, rows)
        before, after = last_layer_logits(net, posterior.mean, delta, hx)
        removal = removal_from_logits(before, after, delta, precision=posterior.precision.detach(), heldout_y=hy,
                                      heldout_class_mask=hmask)
    estimate_s = time.perf_counter() - start

    before = _predictions(removal.logits_before, hy, hmask)
    estimated = _predictions(removal.logits_after, hy, hmask)
    heldout_group = group.heldout_mask(bundle)
    summary: dict[str, Any] = {
        "benchmark": config.benchmark, "strategy": config.strategy, "seed": config.seed,
        "protocol": config.protocol, "config": config.to_dict(),
        "removed": {"kind": group.kind, "value": group.value, "train_examples": int(len(gy)),
                    "train_examples_total": int(sum(len(e.y) for e in bundle.train)),
                    "experiences": in_group, "omega": omega},
        "heldout": {"examples": int(len(hy)), "in_removed_group": int(heldout_group.sum()),
                    "data": config.evaluate_on},
        "estimator": _estimator_record(estimator, removal, posterior, linearise=linearise,
                                       min_precision_fraction=min_precision_fraction, not_mirrored=not_mirrored),
        "model_loaded_from_checkpoint": loaded,
        "before": _summary(before, before),
        "estimated_after": _summary(before, estimated),
        "time_s": {"train": train_s, "estimate": estimate_s},
    }
    arrays: dict[str, Any] = {
        "est_dp": (estimated.p_true - before.p_true).numpy(),
        "est_dnll": (estimated.nll - before.nll).numpy(),
        "in_group": heldout_group.numpy(),
    }
    if verify:
        retrained, retrain_s, _ = train_ivon(config, bundle, drop)
        retrained.model.eval()
        with torch.no_grad():
            logits = model_outputs(unwrap(retrained.model), hx, params=retrained.optimizer.posterior.mean)
        truth = _predictions(logits, hy, hmask)
        arrays["true_dp"] = (truth.p_true - before.p_true).numpy()
        arrays["true_dnll"] = (truth.nll - before.nll).numpy()
        g = arrays["in_group"]
        summary["true_after"] = _summary(before, truth)
        summary["time_s"]["retrain"] = retrain_s
        summary["time_s"]["retrain_over_estimate"] = retrain_s / estimate_s
        summary["correlation"] = {
            "change_p_true": _correlations(arrays["est_dp"], arrays["true_dp"]),
            "change_nll": _correlations(arrays["est_dnll"], arrays["true_dnll"]),
            "change_p_true_in_group": _correlations(arrays["est_dp"][g], arrays["true_dp"][g]),
            "change_p_true_outside_group": _correlations(arrays["est_dp"][~g], arrays["true_dp"][~g]),
        }
    return summary, arrays


# --- plot ---------------------------------------------------------------------------


def scatter_png(path: str | os.PathLike, summary: dict, arrays: dict, *, overwrite: bool = False) -> Path:
    """Estimated against true change per held-out example (prob. of the true class, NLL); atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    path = Path(path)
    if path.exists() and not overwrite:
        raise WhatIfError(f"{path} exists; pass --overwrite to replace it")
    group = arrays["in_group"]
    removed = summary["removed"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    panels = (("dp", "change_p_true", "change in p(true class)"), ("dnll", "change_nll", "change in NLL"))
    for ax, (key, corr_key, label) in zip(axes, panels, strict=True):
        est, tru = arrays[f"est_{key}"], arrays[f"true_{key}"]
        ax.scatter(est[~group], tru[~group], s=4, alpha=0.35, color="tab:blue", linewidths=0,
                   label=f"other held-out ({int((~group).sum())})")
        ax.scatter(est[group], tru[group], s=6, alpha=0.6, color="tab:red", linewidths=0,
                   label=f"held-out of removed {removed['kind']} {removed['value']} ({int(group.sum())})")
        lo = float(np.nanmin([est.min(), tru.min()]))
        hi = float(np.nanmax([est.max(), tru.max()]))
        ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, ls="--", label="estimate = truth")
        c = summary["correlation"][corr_key]
        r = "n/a" if c["pearson"] is None else f"{c['pearson']:.3f}"
        rho = "n/a" if c["spearman"] is None else f"{c['spearman']:.3f}"
        ax.set_title(f"{label}: Pearson r = {r}, Spearman = {rho}", fontsize=9)
        ax.set_xlabel(f"estimated by {summary['estimator']['name']}: {label}")
        ax.set_ylabel(f"true (retrained) {label}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    t = summary["time_s"]
    fig.suptitle(
        f"What if {removed['kind']} {removed['value']} ({removed['train_examples']} training examples) were removed? "
        f"{summary['strategy']} on {summary['benchmark']} ({summary['protocol']}), seed {summary['seed']}\n"
        f"estimate {t['estimate']:.2f} s vs retraining {t['retrain']:.2f} s", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=110)
    finally:
        plt.close(fig)
    try:
        write_bytes_atomic(path, buffer.getvalue(), overwrite=overwrite)
    except ResultsError as e:
        raise WhatIfError(str(e)) from None
    return path


# --- command line -------------------------------------------------------------------


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``whatif`` subcommand to the ``cl-bayes`` subparsers."""
    from cl_bayes.protocols import BENCHMARKS

    w = subparsers.add_parser("whatif", help="estimate the effect of removing a class or an experience (MPE)",
                              description=__doc__.split("\n\n")[0])
    w.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS))
    group = w.add_mutually_exclusive_group(required=True)
    group.add_argument("--remove-class", type=int, metavar="C", help="remove every training example of class C")
    group.add_argument("--remove-experience", type=int, metavar="E", help="remove experience E's data (0-based)")
    group.add_argument("--merge", metavar="E,E,...", default=None,
                       help="preview the merge of these experiences' posteriors (ivon-merge; cl_bayes.whatif_merge)")
    w.add_argument("--strategy", default=None,
                   help=f"an IVON strategy (default: {DEFAULT_STRATEGY}; with --merge: ivon-merge)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--protocol", default="quick", choices=["quick", "paper"])
    w.add_argument("--verify", action="store_true", help="retrain without the group and compare")
    w.add_argument("--linearise", action="store_true",
                   help="predict with the network's linearisation at the mean (a JVP) instead of the network at "
                        "the shifted mean")
    w.add_argument("--estimator", choices=ESTIMATORS, default=DEFAULT_ESTIMATOR,
                   help="head-retrain: the output layer retrained on the remaining data's features, the body "
                        "fixed; last-layer: a Newton step with the output layer's dense GGN over the remaining data, "
                        "the body fixed; diagonal: the posterior's diagonal precision, every weight moves "
                        f"(default: {DEFAULT_ESTIMATOR})")
    w.add_argument("--checkpoint", default=None,
                   help="load the trained model from this file if it exists, else train and save it there")
    w.add_argument("--out", default=None,
                   help="output folder (default: RESULTS/whatif/PROTOCOL/BENCHMARK/STRATEGY)")
    w.add_argument("--min-precision-fraction", type=float, default=1e-3,
                   help="floor of the reduced precision, as a fraction of the posterior's (default 1e-3)")
    w.add_argument("--chunk-size", type=int, default=None, help="examples per Jacobian chunk (memory vs speed)")
    w.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    w.add_argument("--data-root", default=None, help="dataset root (default: $CL_BAYES_DATA or ~/.cache/cl_bayes/data)")
    w.add_argument("--results", default="results", help="results root folder (default: results)")
    w.add_argument("--specs", default=None, help="strategy spec folder (default: ./strategies)")
    w.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    w.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (TOML value), e.g. --set train_per_experience=1000")
    w.add_argument("--overwrite", action="store_true", help="replace existing output files")
    w.set_defaults(func=main)
    return w


def resolve_config(args):
    """The RunConfig of a parsed ``whatif`` command line."""
    from cl_bayes import config as C
    from cl_bayes.avalanche import strategies

    if args.strategy is None:
        from cl_bayes.whatif_merge import MERGE_STRATEGY

        args.strategy = MERGE_STRATEGY if getattr(args, "merge", None) is not None else DEFAULT_STRATEGY
    definition = strategies.get(args.strategy)
    spec, spec_path = C.load_spec(args.strategy, args.specs)
    overrides = dict(C.parse_override(text) for text in args.overrides)
    if args.device != "cpu":
        overrides.setdefault("device", args.device)
    return C.resolve(benchmark=args.benchmark, strategy=args.strategy, seed=args.seed, protocol=args.protocol,
                     params_cls=definition.params_cls, spec=spec, spec_path=spec_path, overrides=overrides)


def command_line(args) -> str:
    """The command that reproduces this run (defaults spelled out)."""
    import shlex

    parts = ["cl-bayes", "whatif", "--benchmark", args.benchmark]
    if getattr(args, "merge", None) is not None:
        parts += ["--merge", args.merge]
    elif args.remove_class is not None:
        parts += ["--remove-class", str(args.remove_class)]
    else:
        parts += ["--remove-experience", str(args.remove_experience)]
    parts += ["--strategy", args.strategy, "--seed", str(args.seed), "--protocol", args.protocol]
    for text in args.overrides:
        parts += ["--set", text]
    if args.min_precision_fraction != 1e-3:
        parts += ["--min-precision-fraction", repr(args.min_precision_fraction)]
    if getattr(args, "estimator", DEFAULT_ESTIMATOR) != DEFAULT_ESTIMATOR:
        parts += ["--estimator", args.estimator]
    parts += [flag for flag, on in (("--verify", args.verify), ("--linearise", args.linearise)) if on]
    return shlex.join(parts)


def output_paths(args, config, group: Group) -> tuple[Path, Path]:
    out = Path(args.out) if args.out else Path(args.results) / "whatif" / config.protocol / config.benchmark / \
        config.strategy
    stem = f"remove-{group.label}-seed{config.seed}"
    if getattr(args, "estimator", DEFAULT_ESTIMATOR) != DEFAULT_ESTIMATOR:
        stem += f"-{args.estimator}"
    return out / f"{stem}.json", out / f"{stem}.png"


def main(args) -> int:
    """Run ``cl-bayes whatif``; user errors raise (``cl-bayes`` prints them as one line)."""
    import torch

    from cl_bayes.results import write_atomic

    if getattr(args, "merge", None) is not None:
        return _main_merge(args)
    group = Group("class", args.remove_class) if args.remove_class is not None else \
        Group("experience", args.remove_experience)
    config = resolve_config(args)
    json_path, png_path = output_paths(args, config, group)
    for path in (json_path, png_path) if args.verify else (json_path,):
        if path.exists() and not args.overwrite:
            raise WhatIfError(f"{path} exists; pass --overwrite to replace it")
    torch.set_num_threads(args.threads or (os.cpu_count() or 1))
    summary, arrays = whatif(config, group, data_root=args.data_root, verify=args.verify,
                             linearise=args.linearise, checkpoint=args.checkpoint, chunk_size=args.chunk_size,
                             min_precision_fraction=args.min_precision_fraction, estimator=args.estimator)
    summary["command"] = command_line(args)
    summary["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if args.verify:
        summary["plot"] = png_path.name
        scatter_png(png_path, summary, arrays, overwrite=args.overwrite)
    write_atomic(json_path, summary, overwrite=args.overwrite)
    _report(summary, json_path, png_path if args.verify else None)
    return 0


def _main_merge(args) -> int:
    import torch

    from cl_bayes import whatif_merge as wm
    from cl_bayes.results import write_atomic

    experiences = wm.parse_experiences(args.merge)
    config = resolve_config(args)
    out = Path(args.out) if args.out else Path(args.results) / "whatif" / config.protocol / config.benchmark / \
        config.strategy
    stem = f"merge-{'-'.join(map(str, experiences))}-seed{config.seed}"
    json_path, png_path = out / f"{stem}.json", out / f"{stem}.png"
    for path in (json_path, png_path) if args.verify else (json_path,):
        if path.exists() and not args.overwrite:
            raise WhatIfError(f"{path} exists; pass --overwrite to replace it")
    torch.set_num_threads(args.threads or (os.cpu_count() or 1))
    summary = wm.preview(config, experiences, data_root=args.data_root, verify=args.verify,
                         checkpoint=args.checkpoint)
    summary["command"] = command_line(args)
    summary["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if args.verify:
        summary["plot"] = png_path.name
        wm.bars_png(png_path, summary, overwrite=args.overwrite)
    write_atomic(json_path, summary, overwrite=args.overwrite)
    wm.report(summary, json_path, png_path if args.verify else None)
    return 0


def _report(summary: dict, json_path: Path, png_path: Path | None) -> None:
    r, t = summary["removed"], summary["time_s"]
    b, e = summary["before"], summary["estimated_after"]
    print(f"removing {r['kind']} {r['value']} ({r['train_examples']} of {r['train_examples_total']} training examples)"
          f" from {summary['strategy']} on {summary['benchmark']}, seed {summary['seed']}:")
    print(f"  held-out NLL {b['mean_nll']:.4f} -> estimated {e['mean_nll']:.4f}"
          + (f", true {summary['true_after']['mean_nll']:.4f}" if "true_after" in summary else ""))
    print(f"  held-out accuracy {100 * b['accuracy']:.2f}% -> estimated {100 * e['accuracy']:.2f}%"
          + (f", true {100 * summary['true_after']['accuracy']:.2f}%" if "true_after" in summary else ""))
    if "correlation" in summary:
        c = summary["correlation"]
        print(f"  per-example correlation, estimate vs truth: change in p(true class) "
              f"r = {c['change_p_true']['pearson']:.3f} (Spearman {c['change_p_true']['spearman']:.3f}); "
              f"change in NLL r = {c['change_nll']['pearson']:.3f} (Spearman {c['change_nll']['spearman']:.3f})")
        print(f"  time: estimate {t['estimate']:.2f} s, retraining {t['retrain']:.2f} s "
              f"({t['retrain_over_estimate']:.1f}x), first training {t['train']:.2f} s")
    else:
        print(f"  time: estimate {t['estimate']:.2f} s (first training {t['train']:.2f} s)")
    print(json_path)
    if png_path is not None:
        print(png_path)


if __name__ == "__main__":  # python -m cl_bayes.whatif ARGS == cl-bayes whatif ARGS (once wired into cli.py)
    import sys

    _parser = argparse.ArgumentParser(prog="cl-bayes")
    add_parser(_parser.add_subparsers(dest="command", required=True))
    _args = _parser.parse_args(["whatif", *sys.argv[1:]])
    sys.exit(_args.func(_args))
