"""Results files: one JSON file per run, written atomically, never overwritten by accident.

Layout: ``<results_root>/<protocol>/<benchmark>/<strategy>/seed<K>.json``.
The format is documented by ``results/schema/result.schema.json``; this module
holds the path convention, the atomic writer and a loader that checks the
fields the rest of the suite relies on.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "schema_version": int,
    "benchmark": str,
    "strategy": str,
    "seed": int,
    "protocol": str,
    "config": dict,
    "versions": dict,
    "git_sha": (str, type(None)),
    "device": str,
    "accuracy_matrix": list,
    "metrics": dict,
    "time_s": dict,
    "peak_memory_mb": (int, float),
}
METRIC_FIELDS = ("average_accuracy", "backward_transfer", "forgetting", "nll", "ece")


class ResultsError(ValueError):
    """A results file is missing, malformed or would be overwritten."""


def result_path(root: str | os.PathLike, protocol: str, benchmark: str, strategy: str, seed: int) -> Path:
    return Path(root) / protocol / benchmark / strategy / f"seed{seed}.json"


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then a rename.

    Readers never see a half-written file, and the file is readable under the
    user's umask (mkstemp alone makes 0600 files). Without ``overwrite`` an
    existing file is kept and ``ResultsError`` raised; the final ``link`` also
    fails if the file appeared meanwhile, so nothing is ever silently replaced.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ResultsError(f"{path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise ResultsError(f"{path} exists; pass --overwrite to replace it") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_atomic(path: str | os.PathLike, data: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Write ``data`` as JSON with ``write_bytes_atomic`` (no overwrite unless asked; NaN is an error)."""
    text = json.dumps(data, indent=1, allow_nan=False) + "\n"
    return write_bytes_atomic(path, text.encode(), overwrite=overwrite)


def validate(data: Any, *, source: str = "results") -> dict[str, Any]:
    """Check the fields every consumer relies on; raise ``ResultsError`` naming the first problem."""
    if not isinstance(data, dict):
        raise ResultsError(f"{source}: expected a JSON object")
    for key, kind in REQUIRED_FIELDS.items():
        if key not in data:
            raise ResultsError(f"{source}: missing field '{key}'")
        if not isinstance(data[key], kind) or isinstance(data[key], bool):
            raise ResultsError(f"{source}: field '{key}' has the wrong type ({type(data[key]).__name__})")
    if data["schema_version"] != SCHEMA_VERSION:
        raise ResultsError(
            f"{source}: schema_version {data['schema_version']} is not supported (expected {SCHEMA_VERSION})"
        )
    matrix = data["accuracy_matrix"]
    if not matrix or not all(isinstance(row, list) and len(row) == len(matrix[0]) for row in matrix):
        raise ResultsError(f"{source}: accuracy_matrix must be a non-empty list of equal-length rows")
    for row in matrix:
        for v in row:
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:
                raise ResultsError(f"{source}: accuracy_matrix entries must be numbers in [0, 1]")
    for key in METRIC_FIELDS:
        if key not in data["metrics"]:
            raise ResultsError(f"{source}: metrics lacks '{key}'")
        v = data["metrics"][key]
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)):
            raise ResultsError(f"{source}: metrics.{key} must be a finite number or null")
    if "total" not in data["time_s"]:
        raise ResultsError(f"{source}: time_s lacks 'total'")
    return data


def load(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such results file") from None
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    return validate(data, source=str(path))


def load_all(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Every results file under ``root`` (``*/*/*/seed*.json``), validated."""
    return [load(p) for p in sorted(Path(root).glob("*/*/*/seed*.json"))]
