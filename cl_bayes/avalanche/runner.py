"""One run: a strategy trained on a benchmark's stream, scored after every experience.

``run(config)`` returns the results dictionary that ``cl_bayes.results`` writes
(see ``results/schema/result.schema.json``). Scoring does not go through
Avalanche's evaluation loop: after each training experience the model predicts
every experience's evaluation tensors in large batches (through the strategy's
``predict_proba`` when it has one, e.g. IVON's Bayesian model average), and the
metrics are the pure functions of ``cl_bayes.metrics``.
"""

from __future__ import annotations

import dataclasses
import pickle
import platform
import random
import subprocess
import threading
import time
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from avalanche.models.utils import avalanche_forward
from avalanche.training.plugins import SupervisedPlugin

from cl_bayes import metrics
from cl_bayes.avalanche import checkpoint as ckpt
from cl_bayes.avalanche import strategies
from cl_bayes.avalanche.benchmarks import BenchmarkBundle, build_benchmark
from cl_bayes.avalanche.models import TaskMaskedModel
from cl_bayes.config import RunConfig
from cl_bayes.models import build_model
from cl_bayes.results import SCHEMA_VERSION


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


class NonFiniteLossGuard(SupervisedPlugin):
    """Stops training at the first non-finite loss (hook: ``before_backward``)."""

    def before_backward(self, strategy, **kwargs):
        if not torch.isfinite(strategy.loss).all():
            raise NonFiniteLossError(
                f"non-finite loss ({strategy.loss.item()}) at experience "
                f"{strategy.clock.train_exp_counter}, epoch {strategy.clock.train_exp_epochs}, "
                f"iteration {strategy.clock.train_epoch_iterations}; try a smaller lr"
            )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class PeakMemory:
    """Peak resident memory of this process while the block runs (sampled every 20 ms), in MB.

    On CUDA devices the peak allocated device memory is reported instead.
    """

    def __init__(self, device: str):
        self.device = torch.device(device)
        self.peak_mb = 0.0
        self._stop = threading.Event()

    @staticmethod
    def rss_mb() -> float:
        try:
            with open("/proc/self/statm") as f:
                pages = int(f.read().split()[1])
            import os

            return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _watch(self):
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self.rss_mb())
            self._stop.wait(0.02)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, self.rss_mb())
        return False


@torch.no_grad()
def predict_proba(strategy, x: torch.Tensor, task: int) -> torch.Tensor:
    """Class probabilities: the strategy's own ``predict_proba`` if it has one, else softmax of its model."""
    if hasattr(strategy, "predict_proba"):
        return strategy.predict_proba(x, task)
    model = strategy.model
    model.eval()
    return torch.softmax(avalanche_forward(model, x, task), dim=-1)


@torch.no_grad()
def evaluate(strategy, bundle: BenchmarkBundle, batch_size: int, device: str):
    """Accuracy on every experience's evaluation data; pooled probabilities and labels."""
    accuracies, all_probs, all_labels = [], [], []
    for exp in bundle.eval:
        probs = torch.cat([
            predict_proba(strategy, exp.x[i : i + batch_size].to(device), exp.task).float().cpu()
            for i in range(0, len(exp.y), batch_size)
        ])
        accuracies.append(float((probs.argmax(1) == exp.y).float().mean()))
        all_probs.append(probs)
        all_labels.append(exp.y)
    return accuracies, torch.cat(all_probs).numpy(), torch.cat(all_labels).numpy()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "avalanche-lib", "cl-bayes"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def git_sha() -> str | None:
    """The checkout's commit, with ``+dirty`` when tracked files differ from it; None outside git."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _save_checkpoint(path: Path, state: ckpt.Checkpoint, on_warning) -> Path | None:
    """Save ``state``; the path to keep saving to, or None when this strategy cannot be pickled."""
    try:
        ckpt.save(path, state)
        return path
    except (pickle.PicklingError, TypeError, AttributeError) as e:  # what pickle raises for an unpicklable part
        if on_warning:
            on_warning(f"{state.config['strategy']} cannot be checkpointed ({type(e).__name__}: {e}); "
                       "the run goes on without checkpoints")
        return None


CHANCE_MARGIN = 0.05  # a newly trained experience scored within this of chance is reported as not learnt


def chance_level(labels: torch.Tensor) -> float:
    """The accuracy of a constant guess among an experience's classes: 1 / (number of distinct labels)."""
    return 1.0 / max(1, int(torch.unique(labels).numel()))


def not_learnt_warning(experience: int, accuracy: float, chance: float) -> str | None:
    """A warning when experience ``experience`` (0-based), just trained, scores within CHANCE_MARGIN of chance.

    A network that stops learning (dead units, a collapsed functional term) can keep finite weights and
    loss, so ``NonFiniteLossGuard`` never fires; this is the cheap check on what it produced instead.
    """
    if accuracy > chance + CHANCE_MARGIN:
        return None
    return (f"experience {experience + 1} scores {100 * accuracy:.2f} % right after training on it, within "
            f"{100 * CHANCE_MARGIN:.0f} points of chance ({100 * chance:.2f} %): the network did not learn it")


def build_strategy(config: RunConfig, bundle: BenchmarkBundle, plugins=(), *, data_root=None):
    """The Avalanche strategy for ``config`` on ``bundle``, model included; ``data_root``: where ``bundle`` is from."""
    net = build_model(
        config.model, input_shape=bundle.input_shape, num_classes=bundle.num_classes, hidden=config.hidden
    )
    model = TaskMaskedModel(net, bundle.class_masks) if bundle.class_masks is not None else net
    definition = strategies.get(config.strategy)
    ctx = strategies.BuildContext(
        model=model,
        config=config,
        params=definition.params_cls(**config.params),
        plugins=[NonFiniteLossGuard(), *plugins],
        n_experiences=bundle.n_experiences,
        first_experience_size=len(bundle.train[0].y),
        data_root=None if data_root is None else str(data_root),
    )
    return definition.build(ctx), definition


def run(config: RunConfig, *, data_root=None, progress=None, spec_path: str | None = None,
        checkpoint: str | Path | None = None, on_warning=None) -> dict:
    """Train and score one configuration; return the results dictionary.

    ``progress(done, total)`` is called after each experience (for progress bars).
    ``checkpoint``: a path; the run's state is saved there after every experience but the last, and a
    run finding a checkpoint there goes on from it (``cl_bayes.avalanche.checkpoint``). The caller
    deletes it once the results are safe. ``on_warning(text)``: told when a strategy cannot be
    checkpointed (the run goes on without checkpoints).
    """
    with warnings.catch_warnings():
        # Avalanche 0.6 warns about its own internals (the unused evaluator has no loggers;
        # ReplayPlugin calls a deprecated storage-policy method): nothing a user can act on.
        warnings.filterwarnings("ignore", module="avalanche")
        warnings.filterwarnings("ignore", message="No loggers specified")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        return _run(config, data_root=data_root, progress=progress, spec_path=spec_path,
                    checkpoint=None if checkpoint is None else Path(checkpoint), on_warning=on_warning)


def _run(config: RunConfig, *, data_root, progress, spec_path, checkpoint, on_warning) -> dict:
    seed_everything(config.seed)
    bundle = build_benchmark(config, data_root=data_root)
    stream = list(bundle.benchmark.train_stream)
    if config.experiences is not None:  # only the first k experiences (trained, scored, counted)
        k = config.experiences
        bundle = dataclasses.replace(bundle, train=bundle.train[:k], eval=bundle.eval[:k])
        stream = stream[:k]
    definition = strategies.get(config.strategy)
    resumed = None
    if checkpoint is not None and checkpoint.exists() and not definition.joint:
        resumed = ckpt.load(checkpoint, config.to_dict())
    if resumed is None:
        strategy, definition = build_strategy(config, bundle, data_root=data_root)
        rows, times, done, peak_before, warned = [], [], 0, 0.0, []
    else:  # the generators are restored last: building the benchmark above used them
        strategy, rows, times, done = resumed.strategy, resumed.rows, resumed.times, resumed.done
        warned = []  # (a resumed run re-checks only the experiences it trains)
        peak_before = resumed.peak_memory_mb
        ckpt.set_rng_state(resumed.rng)
        if progress:
            progress(done, len(stream))
    with PeakMemory(config.device) as peak:
        if definition.joint:
            start = time.perf_counter()
            strategy.train(stream)
            times.append(time.perf_counter() - start)
            acc, probs, labels = evaluate(strategy, bundle, config.eval_batch_size, config.device)
            rows.append(acc)
            if progress:
                progress(len(stream), len(stream))
        else:
            for i, experience in enumerate(stream[done:], start=done):
                start = time.perf_counter()
                strategy.train(experience)
                times.append(time.perf_counter() - start)
                acc, probs, labels = evaluate(strategy, bundle, config.eval_batch_size, config.device)
                rows.append(acc)
                if i < len(acc):
                    text = not_learnt_warning(i, acc[i], chance_level(bundle.eval[i].y))
                    if text is not None:
                        warned.append(text)
                        if on_warning:
                            on_warning(f"{config.strategy} on {config.benchmark} seed {config.seed}: {text}")
                if checkpoint is not None and i + 1 < len(stream):
                    checkpoint = _save_checkpoint(checkpoint, ckpt.Checkpoint(
                        done=i + 1, config=config.to_dict(), rows=rows, times=times,
                        peak_memory_mb=max(peak_before, peak.peak_mb), strategy=strategy, rng=ckpt.rng_state(),
                    ), on_warning)
                if progress:
                    progress(i + 1, len(stream))
    table = metrics.reliability(probs, labels)
    params = config.params
    parts = {}  # plugins that time their own passes keep a ``seconds`` dict (e.g. FROMP's Laplace pass)
    events = {}  # plugins that record what they decided during the run keep an ``events`` dict of lists
    for plugin in strategy.plugins:
        seconds = getattr(plugin, "seconds", None)
        if isinstance(seconds, dict):
            parts.update({name: round(float(v), 3) for name, v in seconds.items()})
        recorded = getattr(plugin, "events", None)
        if isinstance(recorded, dict):
            events.update({name: [dict(e) for e in entries] for name, entries in recorded.items()})
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": config.benchmark,
        "strategy": config.strategy,
        "seed": config.seed,
        "protocol": config.protocol,
        "config": config.to_dict(),
        "spec": spec_path,
        "versions": versions(),
        "git_sha": git_sha(),
        "device": str(config.device),
        "data_source": bundle.data_source,
        "evaluated_on": config.evaluate_on,
        "accuracy_matrix": rows,
        "metrics": {
            **metrics.matrix_metrics(rows),
            "nll": metrics.nll(probs, labels),
            "ece": metrics.ece_from_reliability(table),
        },
        "calibration": {"bins": metrics.ECE_BINS, **table},
        "time_s": {"per_experience": times, "total": float(sum(times)), **({"parts": parts} if parts else {})},
        "peak_memory_mb": round(max(peak_before, peak.peak_mb), 1),
        "memory_size": int(params.get("memory_size", 0)),
        **({"events": events} if events else {}),
        **({"warnings": warned} if warned else {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
