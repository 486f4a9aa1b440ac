"""The ``ray`` executor: one Ray task per run, on a local Ray or an existing cluster.

Each task takes one CPU and runs ``cl_bayes.suite.execute`` with one torch
thread, so it writes its results file exactly as the local executor does.
Ray's own task retries are off; a run that failed (its outcome says
``failed``, or Ray lost the task, e.g. its worker died) is retried here up
to ``max_retries`` times, then reported once with the number of attempts.

A results file is recorded once: before a retry the driver checks whether
the file changed since the run was submitted (a worker that wrote its file
and then died) and, if so, reports the run as done instead of running it
again. On a cluster, the results root must be a folder every node shares,
and cl-bayes must be installed on every node.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path

from cl_bayes.suite import RunRequest, _worker_init, execute

RAY_MISSING = "the ray executor needs the 'ray' extra: pip install 'cl-bayes[ray]'"


def _run_one(request: RunRequest) -> dict:
    """What each Ray task runs (module level, so workers import it by name)."""
    _worker_init()
    return execute(request)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise RuntimeError(RAY_MISSING) from None
    return ray


def _for_workers(r: RunRequest) -> RunRequest:
    """The request with absolute paths (workers may start elsewhere) and one torch thread."""
    from cl_bayes.config import specs_dir
    from cl_bayes.data import data_root

    return dataclasses.replace(
        r, threads=1, results_root=str(Path(r.results_root).resolve()),
        data_root=str(data_root(r.data_root).resolve()), specs=str(specs_dir(r.specs).resolve()),
    )


def _identity(path: Path):
    """What tells a newly written results file from the one there before (None: no file)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _written_meanwhile(r: RunRequest, before, failure: dict, attempts: int) -> dict | None:
    """The outcome of a failed attempt that nonetheless wrote its file, else None."""
    if _identity(r.path) == before:
        return None
    from cl_bayes.results import ResultsError, load

    try:
        accuracy = load(r.path)["metrics"]["average_accuracy"]
    except ResultsError:
        return None
    return {"label": r.label, "status": "ok", "path": str(r.path), "accuracy": accuracy, "attempts": attempts,
            "note": f"results file written before the failure ({failure['error']}); not run again"}


def run_ray(requests: list[RunRequest], *, address: str | None = None, on_result: Callable[[dict], None],
            max_retries: int = 1, num_cpus: int | None = None) -> None:
    """Run each request as a Ray task; call ``on_result`` once per request, in completion order.

    ``address``: an existing cluster (e.g. ``ray://head:10001`` or ``auto``); otherwise
    a local Ray with ``num_cpus`` CPUs (default: all). A Ray already initialised in this
    process is used as it is. Ray is shut down at the end only if this call started it.
    """
    ray = _import_ray()
    if not requests:
        return
    started = not ray.is_initialized()
    if started:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, logging_level=logging.WARNING)
    task = ray.remote(num_cpus=1, max_retries=0)(_run_one)
    pending: dict = {}  # object ref -> (request, attempt, file identity at submission)
    try:
        def submit(r: RunRequest, attempt: int, before) -> None:
            pending[task.remote(r)] = (r, attempt, before)

        for r in map(_for_workers, requests):
            submit(r, 1, _identity(r.path))
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            r, attempt, before = pending.pop(ref)
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayError as e:  # lost worker, node, or object
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
                outcome = {"label": r.label, "status": "failed", "error": f"{type(e).__name__}: {first_line}"}
            if outcome["status"] == "failed":
                written = _written_meanwhile(r, before, outcome, attempt)
                if written:
                    outcome = written
                elif attempt <= max_retries:
                    submit(r, attempt + 1, before)
                    continue
            on_result({**outcome, "attempts": attempt})
    finally:
        for ref in pending:  # interrupted, or on_result raised
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()
