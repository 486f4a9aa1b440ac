"""Suites: strategies x benchmarks x seeds, run by an executor, summarised with pandas.

A suite file (``benchmarks/suites/*.toml``) names a protocol, seeds,
benchmarks and strategies. ``plan`` lists the runs whose results file does not
exist yet, so an interrupted suite resumes where it stopped; ``restrict`` runs a
part of a suite (some strategies, benchmarks or seeds) into the same files. Executors run
``execute`` on each planned run: ``local`` (a pool of local processes, each
importing Avalanche once) or ``ray`` (``cl_bayes.ray_executor``). A failed run
is reported and leaves no results file; the suite goes on with the others.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cl_bayes.config import ConfigError, check_fields, tomllib
from cl_bayes.protocols import BENCHMARKS, PROTOCOLS
from cl_bayes.results import result_path


@dataclass
class Suite:
    protocol: str = "quick"  # "quick" or "paper"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # one run per seed
    benchmarks: list[str] = field(default_factory=list)  # benchmark ids
    strategies: list[str] = field(default_factory=list)  # strategy names
    description: str = ""  # what the suite is for
    # per benchmark id, config keys set in every run on that benchmark, as `--set` would (a protocol's own
    # settings, e.g. VCL's 100 epochs at batch 256); `--set` on the command line wins over them
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)


def load_suite(path: str | os.PathLike, known_strategies: Iterable[str]) -> Suite:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no suite file {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: malformed TOML ({e})") from None
    suite = Suite(**check_fields(raw, Suite, where=str(path)))
    if suite.protocol not in PROTOCOLS:
        raise ConfigError(f"{path}: unknown protocol '{suite.protocol}'")
    for b in suite.benchmarks:
        if b not in BENCHMARKS:
            raise ConfigError(f"{path}: unknown benchmark '{b}' (known: {', '.join(BENCHMARKS)})")
    known = set(known_strategies)
    for s in suite.strategies:
        if s not in known:
            raise ConfigError(f"{path}: unknown strategy '{s}' (known: {', '.join(sorted(known))})")
    if not suite.seeds or not suite.benchmarks or not suite.strategies:
        raise ConfigError(f"{path}: seeds, benchmarks and strategies must not be empty")
    for b, values in suite.settings.items():
        if b not in suite.benchmarks:
            raise ConfigError(f"{path}: [settings.{b}] names a benchmark the suite does not run "
                              f"(it runs: {', '.join(suite.benchmarks)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: settings.{b} must be a table of config keys, got {values!r}")
    return suite


def restrict(
    suite: Suite,
    *,
    strategies: Iterable[str] = (),
    benchmarks: Iterable[str] = (),
    seeds: Iterable[int] = (),
) -> Suite:
    """The part of ``suite`` named by the filters (an empty filter keeps everything), in the suite's order.

    A name or seed that the suite does not have is an error, not an empty plan.
    """

    def keep(kind: str, wanted: Iterable, allowed: list) -> list:
        wanted = list(wanted)
        for value in wanted:
            if value not in allowed:
                raise ConfigError(f"{kind} {value!r} is not in the suite (it has: {', '.join(map(str, allowed))})")
        return [a for a in allowed if a in wanted] if wanted else list(allowed)

    return dataclasses.replace(
        suite,
        strategies=keep("strategy", strategies, suite.strategies),
        benchmarks=keep("benchmark", benchmarks, suite.benchmarks),
        seeds=keep("seed", seeds, suite.seeds),
    )


@dataclass(frozen=True)
class RunRequest:
    """Everything a worker needs for one run; plain data, so it pickles to any executor."""

    strategy: str
    benchmark: str
    seed: int
    protocol: str
    results_root: str
    data_root: str | None = None
    specs: str | None = None
    overrides: tuple[tuple[str, Any], ...] = ()
    device: str = "cpu"
    threads: int = 1
    overwrite: bool = False
    resumable: bool = False  # checkpoint after every experience and go on from a checkpoint found there

    @property
    def path(self) -> Path:
        return result_path(self.results_root, self.protocol, self.benchmark, self.strategy, self.seed)

    @property
    def label(self) -> str:
        return f"{self.strategy} on {self.benchmark} seed {self.seed}"


def plan(suite: Suite, **request_args) -> tuple[list[RunRequest], list[RunRequest]]:
    """(to run, already done): every strategy x benchmark x seed, split by whether its file exists.

    Each request's overrides are the suite's settings for its benchmark, then ``overrides`` (the
    command line's ``--set``), which win.
    """
    todo, done = [], []
    given = dict(request_args.pop("overrides", ()))
    for benchmark in suite.benchmarks:
        overrides = tuple({**suite.settings.get(benchmark, {}), **given}.items())
        for strategy in suite.strategies:
            for seed in suite.seeds:
                r = RunRequest(strategy=strategy, benchmark=benchmark, seed=seed, protocol=suite.protocol,
                               overrides=overrides, **request_args)
                (done if r.path.exists() and not r.overwrite else todo).append(r)
    return todo, done


def resolve_request(r: RunRequest):
    """The resolved RunConfig and spec path of a request (imports the strategy registry)."""
    from cl_bayes import config as C
    from cl_bayes.avalanche import strategies

    definition = strategies.get(r.strategy)
    spec, spec_path = C.load_spec(r.strategy, r.specs)
    overrides = dict(r.overrides)
    if r.device != "cpu":
        overrides.setdefault("device", r.device)
    cfg = C.resolve(benchmark=r.benchmark, strategy=r.strategy, seed=r.seed, protocol=r.protocol,
                    params_cls=definition.params_cls, spec=spec, spec_path=spec_path, overrides=overrides)
    return cfg, spec_path


def execute(r: RunRequest, progress: Callable[[int, int], None] | None = None, *,
            log_experiences: bool = False) -> dict[str, Any]:
    """Run one request and write its results file; never raises (the outcome says what happened).

    With ``log_experiences`` (and no ``progress``) a line goes to stderr after every experience, so a
    suite of hour-long runs shows where each run stands (also in a log file).
    """
    import torch

    from cl_bayes.avalanche.checkpoint import checkpoint_path
    from cl_bayes.avalanche.runner import run
    from cl_bayes.results import write_atomic

    torch.set_num_threads(r.threads)
    start = time.perf_counter()
    if progress is None and log_experiences:
        def progress(done: int, total: int) -> None:
            print(f"{r.label}: {done}/{total} experiences done, {(time.perf_counter() - start) / 60:.1f} min",
                  file=sys.stderr, flush=True)
    try:
        cfg, spec_path = resolve_request(r)
        if r.path.exists() and not r.overwrite:
            return {"label": r.label, "status": "exists", "path": str(r.path)}
        checkpoint = checkpoint_path(r.path) if r.resumable else None
        data = run(cfg, data_root=r.data_root, progress=progress, spec_path=_display_path(spec_path),
                   checkpoint=checkpoint, on_warning=lambda text: print(f"cl-bayes: warning: {text}", file=sys.stderr))
        write_atomic(r.path, data, overwrite=r.overwrite)
        if checkpoint is not None:
            checkpoint.unlink(missing_ok=True)
        return {"label": r.label, "status": "ok", "path": str(r.path), "seconds": time.perf_counter() - start,
                "accuracy": data["metrics"]["average_accuracy"]}
    except Exception as e:  # reported by the caller; a failed run leaves no file
        return {"label": r.label, "status": "failed", "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(), "seconds": time.perf_counter() - start}


def _display_path(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _worker_init() -> None:
    import warnings

    warnings.filterwarnings("ignore")


def run_local(requests: list[RunRequest], *, jobs: int, on_result: Callable[[dict], None],
              log_experiences: bool = False) -> None:
    """Run requests on a pool of ``jobs`` local processes (in this process when jobs == 1).

    ``log_experiences``: each run prints a line after every experience (``execute``).
    """
    if jobs <= 1:
        _worker_init()
        for r in requests:
            on_result(execute(r, log_experiences=log_experiences))
        return
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_init)
    try:
        futures = [pool.submit(execute, r, log_experiences=log_experiences) for r in requests]
        for future in as_completed(futures):
            on_result(future.result())
    except KeyboardInterrupt:
        _stop_pool(pool)
        remove_partial_files(requests)
        raise
    pool.shutdown(wait=True)


def _stop_pool(pool: ProcessPoolExecutor, grace_s: float = 0.25) -> None:
    """Stop a pool at once: cancel what has not started, give running workers ``grace_s`` to exit on their
    own (Ctrl-C reaches them too and their atomic writes clean up), then terminate the rest."""
    processes = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + grace_s
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(0.1)


def remove_partial_files(requests: Iterable[RunRequest]) -> list[Path]:
    """Delete the temporary files an interrupted atomic write can leave beside a request's results file."""
    removed = []
    for r in requests:
        folder = r.path.parent
        if folder.is_dir():
            # the results file's and the checkpoint's (seedK.ckpt) temporaries; a finished checkpoint stays
            for tmp in [*folder.glob(f".{r.path.name}.*.tmp"), *folder.glob(f".{r.path.stem}.ckpt.*.tmp")]:
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def summary_frame(results_root: str | os.PathLike, suite: Suite):
    """Mean and std over seeds per benchmark and strategy, for this suite's runs."""
    import pandas as pd

    from cl_bayes.results import load

    rows = []
    for benchmark in suite.benchmarks:
        for strategy in suite.strategies:
            for seed in suite.seeds:
                path = result_path(results_root, suite.protocol, benchmark, strategy, seed)
                if not path.exists():
                    continue
                d = load(path)
                rows.append({
                    "benchmark": benchmark, "strategy": strategy, "seed": seed,
                    "accuracy": 100 * d["metrics"]["average_accuracy"],
                    "forgetting": None if d["metrics"]["forgetting"] is None else 100 * d["metrics"]["forgetting"],
                    "ece": 100 * d["metrics"]["ece"], "nll": d["metrics"]["nll"], "time_s": d["time_s"]["total"],
                })
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows)
    stats = frame.groupby(["benchmark", "strategy"], sort=False).agg(
        seeds=("seed", "count"),
        accuracy=("accuracy", "mean"), accuracy_std=("accuracy", "std"),
        forgetting=("forgetting", "mean"), ece=("ece", "mean"), nll=("nll", "mean"), time_s=("time_s", "mean"),
    )
    return stats.reset_index()


def summary_markdown(frame, *, command: str, wall_s: float | None = None) -> str:
    """The summary as markdown tables, one per benchmark, ranked by accuracy."""
    if frame.empty:
        return "No results.\n"
    lines = [f"Produced by `{command}`" + (f" (wall time {wall_s / 60:.1f} min)." if wall_s else "."), ""]
    for benchmark, part in frame.groupby("benchmark", sort=False):
        lines += [f"### {benchmark}", "",
                  "| strategy | seeds | accuracy % | forgetting % | ECE % | NLL | time/run s |",
                  "|---|--:|--:|--:|--:|--:|--:|"]
        for _, r in part.sort_values("accuracy", ascending=False).iterrows():
            std = "" if r.accuracy_std != r.accuracy_std else f" ± {r.accuracy_std:.2f}"
            forget = "n/a" if r.forgetting != r.forgetting else f"{r.forgetting:.2f}"
            lines.append(f"| {r.strategy} | {r.seeds} | {r.accuracy:.2f}{std} | {forget} | {r.ece:.2f} | "
                         f"{r.nll:.3f} | {r.time_s:.1f} |")
        lines.append("")
    return "\n".join(lines)


def default_jobs() -> int:
    return max(1, min(2, os.cpu_count() or 1))
