"""Resumable runs: a run's whole state after each experience, so that a killed run goes on from there.

A paper-protocol run can take hours (VCL on permuted MNIST: 10 experiences of 100 epochs), and a
results file is written only at the end. With ``cl-bayes run --resumable`` the runner saves, after
every experience but the last, one checkpoint file beside the results file (``seedK.ckpt`` next to
``seedK.json``), replacing the previous one atomically:

* ``done``: how many experiences are trained and scored;
* ``config``: the run's resolved configuration (``RunConfig.to_dict()``); a checkpoint is only
  resumed by the same configuration, anything else is an error naming the keys that differ;
* ``rows`` and ``times``: the accuracy matrix and per-experience training times so far;
* ``strategy``: the Avalanche strategy, pickled whole (model, optimizer and its state, priors,
  memories, plugins), so every method resumes without code of its own;
* ``rng``: Python's, NumPy's and torch's global generator states, restored last.

Resuming rebuilds the benchmark from the seed (same data, same permutations), loads the strategy
and generators, and continues with experience ``done``: the finished results equal those of an
uninterrupted run (``tests/test_checkpoint.py`` checks this for VCL, EWC and IVON replay). The
checkpoint is deleted once the results file is written. It is a pickle: load only your own.
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = 1  # bump when the layout below changes


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed by this run."""


def checkpoint_path(results_path: str | os.PathLike) -> Path:
    """Where the checkpoint of the run writing ``results_path`` lives: ``seedK.json`` -> ``seedK.ckpt``."""
    return Path(results_path).with_suffix(".ckpt")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Checkpoint:
    done: int  # experiences trained and scored
    config: dict[str, Any]  # RunConfig.to_dict() of the run that wrote it
    rows: list[list[float]]  # accuracy matrix so far, one row per finished experience
    times: list[float]  # training seconds per finished experience
    peak_memory_mb: float  # peak memory so far
    strategy: Any  # the Avalanche strategy, whole
    rng: dict[str, Any]  # global generator states after experience ``done``


def save(path: str | os.PathLike, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` to ``path`` atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **vars(checkpoint)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | os.PathLike, config: dict[str, Any]) -> Checkpoint:
    """The checkpoint at ``path``, checked against the resuming run's ``config``."""
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu" if config.get("device", "cpu") == "cpu" else None,
                          weights_only=False)
    except Exception as e:  # truncated, not a torch file, or from other code
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e}); delete it to start again") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a cl-bayes checkpoint of format {FORMAT}; delete it to start again")
    differ = sorted(k for k in set(config) | set(data["config"]) if config.get(k) != data["config"].get(k))
    if differ:
        raise CheckpointError(
            f"{path} was written by a different configuration ({', '.join(differ)}); delete it or "
            "run with the same settings"
        )
    data.pop("format")
    return Checkpoint(**data)
