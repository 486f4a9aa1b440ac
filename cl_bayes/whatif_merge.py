r"""``cl-bayes whatif --merge E,E,...``: what if only these experiences' posteriors were merged?

``ivon-merge`` trains every experience by IVON from one shared start and prior, and merges
the posteriors q_t = N(m_t, diag(1 / lambda_t)) by natural parameters
(``cl_bayes.merge.merge_gaussians``: the product of the q_t divided by the prior repeated).
Because every q_t is found from the same start, the posteriors of one training run answer,
with no retraining, what the merge of *any* subset S of the experiences would predict:

    lambda_S = lambda_0 + sum_{t in S} (lambda_t - lambda_0),
    m_S = (lambda_0 m_0 + sum_{t in S} (lambda_t m_t - lambda_0 m_0)) / lambda_S,

evaluated at m_S on the held-out data of every experience (the preview). ``--verify`` runs
the real thing: ``ivon-merge`` trained from scratch on the stream of S alone (same seed, so
the same start), merged by its own plugin, and scored the same way; the JSON records both,
per experience, their difference, and the time of each. Predictions are at the merged mean,
as ``ivon-merge`` predicts (``test_samples = 0``). Every experience of ``ivon-merge`` trains
with torch's RNG reseeded from (seed, experience id), so the real run draws the same batches
and noise as the full run did for those experiences: the two agree up to float reordering.

    cl-bayes whatif --benchmark permuted-mnist --merge 0,2,4 --verify
    cl-bayes whatif --benchmark split-mnist --merge 1,3 --checkpoint posteriors.pt

``--checkpoint F`` keeps every experience's posterior in F (trained once, then every preview
of any subset costs a merge and one forward pass). Heavy imports happen inside the functions.
"""

from __future__ import annotations

import dataclasses
import io
import os
import time
import warnings
from pathlib import Path
from typing import Any

from cl_bayes.results import ResultsError, write_bytes_atomic

MERGE_STRATEGY = "ivon-merge"
CHECKPOINT_VERSION = 1


class MergePreviewError(ValueError):
    """A merge preview the user can fix (bad experience list, wrong strategy, clashing files)."""


def parse_experiences(text: str, n_experiences: int | None = None) -> list[int]:
    """``"0,2,4"`` -> [0, 2, 4] (sorted, distinct, in range when ``n_experiences`` is known)."""
    try:
        chosen = [int(part) for part in text.split(",") if part.strip() != ""]
    except ValueError:
        raise MergePreviewError(f"--merge takes experience ids like 0,2,4, got {text!r}") from None
    if not chosen:
        raise MergePreviewError("--merge needs at least one experience id")
    if len(set(chosen)) != len(chosen):
        raise MergePreviewError(f"--merge lists an experience twice: {text!r}")
    if any(t < 0 for t in chosen) or (n_experiences is not None and any(t >= n_experiences for t in chosen)):
        bound = "" if n_experiences is None else f" (0..{n_experiences - 1})"
        raise MergePreviewError(f"--merge experience out of range{bound}: {text!r}")
    return sorted(chosen)


# --- training ---------------------------------------------------------------------


def _merging_plugin(strategy):
    from cl_bayes.avalanche.merge_strategies import PosteriorMergingPlugin

    plugin = next((p for p in strategy.plugins if isinstance(p, PosteriorMergingPlugin)), None)
    if plugin is None:
        raise MergePreviewError(f"--merge needs the {MERGE_STRATEGY} strategy (per-experience posteriors)")
    return plugin


def train_posteriors(config, bundle, experiences: list[int] | None = None) -> dict[str, Any]:
    """Train ``ivon-merge`` on the stream (or only ``experiences`` of it), as ``cl-bayes run`` builds it.

    Returns {"experiences", "means", "precisions" (each experience's own posterior),
    "merged": (mean, precision) of the plugin's last merge, "prior_mean", "prior_precision",
    "train_s", "model"}.
    """
    import torch

    from cl_bayes.avalanche.runner import build_strategy, seed_everything
    from cl_bayes.whatif import _stream

    if config.params.get("workers", 0):
        raise MergePreviewError("--merge trains in this process: drop the workers setting")
    seed_everything(config.seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No loggers specified")
        strategy, _ = build_strategy(config, bundle)
    plugin = _merging_plugin(strategy)
    drop = None
    if experiences is not None:
        drop = [torch.full((len(e.y),), i not in experiences) for i, e in enumerate(bundle.train)]
    stream, kept = _stream(bundle, drop)
    plugin.experience_ids = kept  # each experience reseeded by its benchmark id, as in the full run
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        for experience in stream:
            strategy.train(experience)
    seconds = time.perf_counter() - start
    opt = strategy.optimizer  # the shared prior (set at the first experience, restored for every later one)
    prior_mean, prior_precision = opt.prior_mean.detach(), opt.prior_precision.detach()
    return {
        "experiences": kept, "means": [m.detach().cpu() for m, _ in plugin.posteriors],
        "precisions": [s.detach().cpu() for _, s in plugin.posteriors],
        "merged": tuple(t.detach().cpu() for t in plugin.merged),
        "prior_mean": prior_mean.cpu(), "prior_precision": prior_precision.cpu(), "train_s": seconds,
        "model": strategy.model,
    }


def _save(path: Path, config, trained: dict) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"version": CHECKPOINT_VERSION, "kind": "merge-posteriors", "config": config.to_dict(),
                **{k: v for k, v in trained.items() if k not in ("model", "merged")}}, tmp)
    os.replace(tmp, path)


def _load(path: Path, config, bundle) -> dict[str, Any]:
    import torch

    from cl_bayes.avalanche.models import TaskMaskedModel
    from cl_bayes.models import build_model

    state = torch.load(path, map_location="cpu", weights_only=False)
    if (state.get("version") != CHECKPOINT_VERSION or state.get("kind") != "merge-posteriors"
            or state.get("config") != config.to_dict()):
        raise MergePreviewError(f"{path} was written for another configuration; remove it or pick another "
                                "--checkpoint")
    net = build_model(config.model, input_shape=bundle.input_shape, num_classes=bundle.num_classes,
                      hidden=config.hidden)
    state["model"] = TaskMaskedModel(net, bundle.class_masks) if bundle.class_masks is not None else net
    return state


# --- scoring ----------------------------------------------------------------------


def accuracies(model, mean, bundle, device: str) -> list[float]:
    """Accuracy of the network at flat weights ``mean`` on each experience's held-out data."""
    import torch

    from cl_bayes.avalanche.models import unwrap
    from cl_bayes.jacobians import model_outputs
    from cl_bayes.whatif import _masked_inputs

    model = model.to(device).eval()
    net = unwrap(model)
    out = []
    with torch.no_grad():
        for e in bundle.eval:
            x, y, mask = _masked_inputs(model, [e], device)
            logits = model_outputs(net, x, params=mean.to(device))
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
            out.append(float((logits.argmax(-1) == y).float().mean()))
    return out


def preview(config, experiences: list[int], *, data_root: str | None = None, verify: bool = False,
            checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
    """The merge preview of ``experiences`` (and with ``verify`` the real merge); the JSON summary."""
    from cl_bayes.avalanche.benchmarks import build_benchmark
    from cl_bayes.merge import merge_gaussians

    if config.strategy != MERGE_STRATEGY:
        raise MergePreviewError(f"--merge needs --strategy {MERGE_STRATEGY}, got '{config.strategy}'")
    bundle = build_benchmark(config, data_root=data_root)
    if config.experiences is not None:  # only the first k experiences, as cl-bayes run slices them
        bundle = dataclasses.replace(bundle, train=bundle.train[: config.experiences],
                                     eval=bundle.eval[: config.experiences])
    parse_experiences(",".join(map(str, experiences)), bundle.n_experiences)  # range check
    loaded = checkpoint is not None and Path(checkpoint).exists()
    trained = _load(Path(checkpoint), config, bundle) if loaded else train_posteriors(config, bundle)
    if checkpoint is not None and not loaded:
        _save(Path(checkpoint), config, trained)
    start = time.perf_counter()
    mean, _ = merge_gaussians(means=[trained["means"][t] for t in experiences],
                              precisions=[trained["precisions"][t] for t in experiences],
                              prior_mean=trained["prior_mean"], prior_precision=trained["prior_precision"])
    previewed = accuracies(trained["model"], mean, bundle, config.device)
    preview_s = time.perf_counter() - start

    def average(acc: list[float]) -> float:
        return sum(acc[t] for t in experiences) / len(experiences)

    summary: dict[str, Any] = {
        "benchmark": config.benchmark, "strategy": config.strategy, "seed": config.seed,
        "protocol": config.protocol, "config": config.to_dict(), "merged_experiences": experiences,
        "heldout": {"data": config.evaluate_on, "examples": [int(len(e.y)) for e in bundle.eval]},
        "prediction": "at the merged mean",
        "posteriors_loaded_from_checkpoint": loaded,
        "preview": {"accuracy": previewed, "average_accuracy_merged": average(previewed)},
        "time_s": {"train_all": trained["train_s"], "preview": preview_s},
    }
    if verify:
        real = train_posteriors(config, bundle, experiences)
        actual = accuracies(real["model"], real["merged"][0], bundle, config.device)
        diff = [p - a for p, a in zip(previewed, actual, strict=True)]
        summary["real_merge"] = {"accuracy": actual, "average_accuracy_merged": average(actual)}
        summary["difference"] = {
            "per_experience": diff, "max_abs_merged": max(abs(diff[t]) for t in experiences),
            "average_accuracy_merged": summary["preview"]["average_accuracy_merged"] - average(actual),
        }
        summary["time_s"]["retrain"] = real["train_s"]
        summary["time_s"]["retrain_over_preview"] = real["train_s"] / preview_s
    return summary


def bars_png(path: str | os.PathLike, summary: dict, *, overwrite: bool = False) -> Path:
    """Preview against real merge, accuracy per experience (the merged ones marked); atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    path = Path(path)
    if path.exists() and not overwrite:
        raise MergePreviewError(f"{path} exists; pass --overwrite to replace it")
    pre = 100 * np.asarray(summary["preview"]["accuracy"])
    real = 100 * np.asarray(summary["real_merge"]["accuracy"])
    k = np.arange(len(pre))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(pre) + 3), 4.2))
    ax.bar(k - 0.2, pre, width=0.4, label="preview (merge of one run's posteriors, no retraining)",
           color="tab:blue")
    ax.bar(k + 0.2, real, width=0.4, label="real merge (ivon-merge retrained on these experiences)",
           color="tab:orange")
    labels = [f"{t}*" if t in summary["merged_experiences"] else str(t) for t in k]
    ax.set_xticks(k, labels)
    ax.set_xlabel("experience (* = merged)")
    ax.set_ylabel("held-out accuracy %")
    ax.set_ylim(0, 118)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    d, t = summary["difference"], summary["time_s"]
    ax.set_title(
        f"What if experiences {','.join(map(str, summary['merged_experiences']))} were merged? "
        f"{summary['benchmark']} ({summary['protocol']}), seed {summary['seed']}\n"
        f"merged average: preview {100 * summary['preview']['average_accuracy_merged']:.2f}%, real "
        f"{100 * summary['real_merge']['average_accuracy_merged']:.2f}% (max |diff| {100 * d['max_abs_merged']:.2f} "
        f"points); preview {t['preview']:.2f} s vs retraining {t['retrain']:.1f} s", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=110)
    finally:
        plt.close(fig)
    try:
        write_bytes_atomic(path, buffer.getvalue(), overwrite=overwrite)
    except ResultsError as e:
        raise MergePreviewError(str(e)) from None
    return path


def report(summary: dict, json_path: Path, png_path: Path | None) -> None:
    s, t = summary["merged_experiences"], summary["time_s"]
    pre = summary["preview"]
    print(f"merging experiences {','.join(map(str, s))} of {summary['strategy']} on {summary['benchmark']}, "
          f"seed {summary['seed']}:")
    line = f"  merged experiences' average accuracy: preview {100 * pre['average_accuracy_merged']:.2f}%"
    if "real_merge" in summary:
        line += (f", real merge {100 * summary['real_merge']['average_accuracy_merged']:.2f}% "
                 f"(max per-experience |diff| {100 * summary['difference']['max_abs_merged']:.2f} points)")
    print(line)
    if "retrain" in t:
        print(f"  time: preview {t['preview']:.2f} s, retraining {t['retrain']:.1f} s "
              f"({t['retrain_over_preview']:.0f}x), first training {t['train_all']:.1f} s")
    else:
        print(f"  time: preview {t['preview']:.2f} s (first training {t['train_all']:.1f} s)")
    print(json_path)
    if png_path is not None:
        print(png_path)
