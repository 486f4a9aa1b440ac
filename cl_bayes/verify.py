"""Verified results: rerun a results file's recorded run and compare its accuracy matrix.

``cl-bayes verify FILE...`` reads each file's strategy, benchmark, seed, protocol and
resolved ``config`` (training settings and every strategy parameter), reruns exactly
that configuration (not the current spec) and compares the accuracy matrices entry by
entry. The run is *verified* when every entry of the rerun is within ``TOLERANCE``
(an accuracy fraction; 0.01 = 1 point) of the recorded one and the shapes agree.
Keys missing from an old file's config take today's defaults.

Outcomes are stored in ``<results_root>/verified.json``, one record per run keyed by
the run's conventional path (``<protocol>/<benchmark>/<strategy>/seed<K>.json``):
the outcome (``verified`` true or false), the largest entry difference, both final
average accuracies, the tolerance, the date and the code's git SHA, and the SHA-256
of the results file's canonical JSON (sorted keys, no whitespace). A record only
counts for the file whose content hash it holds: a file edited after verification
(say, a raised accuracy matrix) is unverified again. The leaderboard reads these
records (``cl_bayes.leaderboard``).

The record functions are plain JSON; torch and Avalanche load only in ``rerun``.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cl_bayes.results import ResultsError, result_path, write_bytes_atomic

VERIFIED_NAME = "verified.json"
TOLERANCE = 0.01  # largest allowed |recorded - rerun| of one accuracy-matrix entry (fraction)
IGNORED_CONFIG_KEYS = ("benchmark", "strategy", "seed", "protocol", "device")


def content_hash(data: dict[str, Any]) -> str:
    """SHA-256 of a results dict's canonical JSON (keys sorted, no whitespace; ``_``-prefixed keys left out)."""
    clean = {k: v for k, v in data.items() if not k.startswith("_")}
    text = json.dumps(clean, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def record_key(data: dict[str, Any]) -> str:
    """Where the run lives under a results root, as a POSIX path (the record's key)."""
    return result_path(".", data["protocol"], data["benchmark"], data["strategy"], data["seed"]).as_posix()[2:]


def load_records(results_root: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The verification records under ``results_root`` (empty when there is no ``verified.json``)."""
    path = Path(results_root) / VERIFIED_NAME
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("records"), dict):
        raise ResultsError(f"{path}: expected an object with a 'records' object")
    return data["records"]


def status_of(data: dict[str, Any], records: dict[str, dict[str, Any]]) -> str:
    """``verified``, ``failed`` (a rerun disagreed) or ``unverified`` (no record for this exact content)."""
    record = records.get(record_key(data))
    if not record or record.get("sha256") != content_hash(data):
        return "unverified"
    return "verified" if record.get("verified") is True else "failed"


def compare_matrices(recorded: list[list[float]], rerun: list[list[float]], tolerance: float = TOLERANCE):
    """(verified, largest entry difference or None when the shapes differ)."""
    if len(recorded) != len(rerun) or any(len(a) != len(b) for a, b in zip(recorded, rerun, strict=False)):
        return False, None
    diff = max(abs(a - b) for ra, rb in zip(recorded, rerun, strict=True) for a, b in zip(ra, rb, strict=True))
    return diff <= tolerance, diff


def make_record(data: dict[str, Any], rerun: dict[str, Any], tolerance: float, *, command: str) -> dict[str, Any]:
    ok, diff = compare_matrices(data["accuracy_matrix"], rerun["accuracy_matrix"], tolerance)
    return {
        "verified": ok,
        "sha256": content_hash(data),
        "max_abs_diff": diff,
        "tolerance": tolerance,
        "average_accuracy": {"recorded": data["metrics"]["average_accuracy"],
                             "rerun": rerun["metrics"]["average_accuracy"]},
        "rerun_git_sha": rerun.get("git_sha"),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }


def store_records(results_root: str | os.PathLike, new: dict[str, dict[str, Any]]) -> Path:
    """Add or replace records in ``<results_root>/verified.json`` (atomic write)."""
    records = load_records(results_root)
    records.update(new)
    body = {
        "description": "Verification records written by `cl-bayes verify` (see cl_bayes/verify.py). A record "
                       "counts only for the results file whose canonical-JSON SHA-256 it holds.",
        "records": dict(sorted(records.items())),
    }
    text = json.dumps(body, indent=1, allow_nan=False) + "\n"
    return write_bytes_atomic(Path(results_root) / VERIFIED_NAME, text.encode(), overwrite=True)


def recorded_config(data: dict[str, Any], *, device: str = "cpu"):
    """The ``RunConfig`` a results file records, checked key by key (unknown keys are errors)."""
    from cl_bayes import config as C
    from cl_bayes.avalanche import strategies

    definition = strategies.get(data["strategy"])
    recorded = dict(data["config"])
    params = recorded.pop("params", {}) or {}
    if not isinstance(params, dict):
        raise C.ConfigError("config.params must be an object")
    overrides = {k: v for k, v in recorded.items() if k not in IGNORED_CONFIG_KEYS}
    overrides.update(params)
    overrides["device"] = device
    return C.resolve(benchmark=data["benchmark"], strategy=data["strategy"], seed=data["seed"],
                     protocol=data["protocol"], params_cls=definition.params_cls, spec=None,
                     spec_path=f"{data['strategy']} recorded config", overrides=overrides)


def rerun(data: dict[str, Any], *, data_root=None, threads: int = 1, device: str = "cpu", progress=None):
    """Run the recorded configuration again; return the new results dict (nothing is written)."""
    import torch

    from cl_bayes.avalanche.runner import run

    torch.set_num_threads(threads)
    return run(recorded_config(data, device=device), data_root=data_root, progress=progress,
               spec_path=data.get("spec"))


def pick_one_per_group(files_and_data: list[tuple[Path, dict[str, Any]]], group_of) -> list[tuple[Path, dict]]:
    """The lowest seed of each group (``group_of(data)`` -> hashable), in the given order."""
    best: dict[Any, tuple[Path, dict]] = {}
    for item in files_and_data:
        key = group_of(item[1])
        if key not in best or item[1]["seed"] < best[key][1]["seed"]:
            best[key] = item
    chosen = {id(v[1]) for v in best.values()}
    return [item for item in files_and_data if id(item[1]) in chosen]
