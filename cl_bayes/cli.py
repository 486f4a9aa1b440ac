"""The ``cl-bayes`` command.

    cl-bayes run --strategy S --benchmark B --seed K [--protocol quick|paper] [--set key=value ...]
    cl-bayes suite benchmarks/suites/default.toml [--jobs N] [--executor local|ray] [--only-strategy S ...]
    cl-bayes leaderboard | cl-bayes submit FILE... | cl-bayes plots
    cl-bayes whatif --benchmark B --remove-class C [--verify]
    cl-bayes list

Every failure the user can cause (unknown names, missing data, malformed
configs or results files, a NaN loss) prints one line ``cl-bayes: error: ...``
and exits with status 2, leaving no partial results file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from cl_bayes import suite as S
from cl_bayes.config import ConfigError, parse_override
from cl_bayes.data import DataError
from cl_bayes.results import ResultsError

DEFAULT_RESULTS = "results"


class UserError(Exception):
    """A one-line error for the user."""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default=None, help="dataset root (default: $CL_BAYES_DATA or ~/.cache/cl_bayes/data)")
    p.add_argument("--results", default=DEFAULT_RESULTS, help="results root folder (default: results)")
    p.add_argument("--specs", default=None, help="strategy spec folder (default: ./strategies)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (TOML value), e.g. --set epochs=2 --set ewc_lambda=1e3")
    p.add_argument("--overwrite", action="store_true", help="replace existing results files")


def _overrides(args) -> tuple:
    return tuple(parse_override(text) for text in args.overrides)


def cmd_run(args) -> int:
    from tqdm import tqdm

    request = S.RunRequest(
        strategy=args.strategy, benchmark=args.benchmark, seed=args.seed, protocol=args.protocol,
        results_root=args.results, data_root=args.data_root, specs=args.specs, overrides=_overrides(args),
        device=args.device, threads=args.threads or (os.cpu_count() or 1), overwrite=args.overwrite,
    )
    S.resolve_request(request)  # bad names and keys fail here, before any data is loaded
    if request.path.exists() and not args.overwrite:
        raise UserError(f"{request.path} exists; pass --overwrite to replace it")
    with tqdm(total=None, desc=request.label, unit="exp", disable=args.quiet) as bar:
        def progress(done, total):
            bar.total = total
            bar.update(done - bar.n)

        outcome = S.execute(request, progress=progress)
    if outcome["status"] != "ok":
        if args.verbose:
            print(outcome.get("traceback", ""), file=sys.stderr)
        raise UserError(f"{request.label} failed: {outcome['error']}")
    print(f"{outcome['path']}: average accuracy {100 * outcome['accuracy']:.2f}% in {outcome['seconds']:.1f} s")
    return 0


def cmd_suite(args) -> int:
    from tqdm import tqdm

    from cl_bayes.avalanche import strategies

    suite = S.load_suite(args.suite_file, strategies.names())
    part = S.restrict(suite, strategies=args.only_strategy, benchmarks=args.only_benchmark, seeds=args.only_seed)
    jobs = args.jobs or S.default_jobs()
    threads = max(1, (os.cpu_count() or 1) // jobs)
    todo, done = S.plan(part, results_root=args.results, data_root=args.data_root, specs=args.specs,
                        overrides=_overrides(args), device=args.device, threads=threads, overwrite=args.overwrite)
    for r in todo:  # fail fast on bad specs, before hours of work
        S.resolve_request(r)
    parallel = jobs if args.executor == "local" else (args.jobs or "all CPUs")
    what = "" if part == suite else " (part)"
    print(f"suite {args.suite_file}{what}: {len(todo)} runs to do, {len(done)} already done "
          f"({args.executor} executor, {parallel} in parallel)", flush=True)
    failures = []
    start = time.perf_counter()
    with tqdm(total=len(todo), desc="runs", unit="run", disable=args.quiet) as bar:
        def on_result(outcome):
            bar.update(1)
            if outcome["status"] == "failed":
                failures.append(outcome)
                bar.write(f"FAILED {outcome['label']}: {outcome['error']}")
            else:
                bar.set_postfix_str(outcome["label"])

        if args.executor == "ray":
            from cl_bayes.ray_executor import run_ray

            run_ray(todo, address=args.address, on_result=on_result, num_cpus=args.jobs)
        else:
            S.run_local(todo, jobs=jobs, on_result=on_result)
    wall = time.perf_counter() - start
    frame = S.summary_frame(args.results, suite)
    command = " ".join(["cl-bayes", "suite", str(args.suite_file)])
    text = S.summary_markdown(frame, command=command, wall_s=wall if todo and not done else None)
    print(text)
    summary = Path(args.results) / suite.protocol / f"SUMMARY-{Path(args.suite_file).stem}.md"
    if not frame.empty:  # the whole suite's results so far, also when this call had nothing left to run
        from cl_bayes.results import write_bytes_atomic

        heading = f"# Suite {Path(args.suite_file).stem} ({suite.protocol})\n\n"
        write_bytes_atomic(summary, (heading + text).encode(), overwrite=True)
    if failures:
        raise UserError(f"{len(failures)} of {len(todo)} runs failed: " + "; ".join(f["label"] for f in failures))
    return 0


def cmd_list(args) -> int:
    from cl_bayes.avalanche import strategies
    from cl_bayes.protocols import BENCHMARKS

    print("benchmarks:")
    for name, b in BENCHMARKS.items():
        print(f"  {name:16s} {b.description}")
    print("strategies:")
    for name in strategies.names():
        print(f"  {name:16s} {strategies.get(name).description}")
    return 0


def cmd_leaderboard(args) -> int:
    from cl_bayes import leaderboard

    command = "cl-bayes leaderboard" + ("" if args.results == DEFAULT_RESULTS else f" --results {args.results}")
    for path in leaderboard.write_leaderboard(args.results, command=command):
        print(path)
    return 0


def cmd_submit(args) -> int:
    from cl_bayes import leaderboard

    added = leaderboard.submit(args.files, args.results)
    for path in added:
        print(f"added {path}")
    leaderboard.write_leaderboard(args.results)
    return 0


def cmd_plots(args) -> int:
    from cl_bayes import plots

    out = args.out or str(Path(args.results) / "plots")
    paths = plots.make_plots(args.results, out, benchmark=args.benchmark, protocol=args.protocol)
    if not paths:
        raise UserError(f"no results under {args.results} to plot")
    for path in paths:
        print(path)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as the same one-line ``cl-bayes: error:`` (exit 2)."""

    def error(self, message):
        self.exit(2, f"cl-bayes: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cl-bayes", description="Bayesian continual-learning benchmarks")
    p.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of failures")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="one strategy on one benchmark with one seed")
    r.add_argument("--strategy", required=True)
    r.add_argument("--benchmark", required=True)
    r.add_argument("--seed", type=int, required=True)
    r.add_argument("--protocol", default="quick", choices=["quick", "paper"])
    r.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    _common(r)
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("suite", help="strategies x benchmarks x seeds from a suite file; resumes")
    s.add_argument("suite_file", nargs="?", default="benchmarks/suites/default.toml")
    s.add_argument("--jobs", type=int, default=None, help="parallel runs (default: min(2, cores))")
    s.add_argument("--executor", default="local", choices=["local", "ray"])
    s.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    for flag, kind, conv in (("strategy", "strategy", str), ("benchmark", "benchmark", str), ("seed", "seed", int)):
        s.add_argument(f"--only-{flag}", action="append", default=[], type=conv, metavar=kind.upper(),
                       help=f"run only this {kind} of the suite (repeatable); the summary covers the whole suite")
    _common(s)
    s.set_defaults(func=cmd_suite)

    sub.add_parser("list", help="registered benchmarks and strategies").set_defaults(func=cmd_list)

    lb = sub.add_parser("leaderboard", help="write results/LEADERBOARD.md and results/leaderboard.csv")
    lb.add_argument("--results", default=DEFAULT_RESULTS)
    lb.set_defaults(func=cmd_leaderboard)

    sm = sub.add_parser("submit", help="validate outside results files and add them")
    sm.add_argument("files", nargs="+")
    sm.add_argument("--results", default=DEFAULT_RESULTS)
    sm.set_defaults(func=cmd_submit)

    pl = sub.add_parser("plots", help="comparison plots as PNGs under results/plots")
    pl.add_argument("--results", default=DEFAULT_RESULTS)
    pl.add_argument("--out", default=None)
    pl.add_argument("--benchmark", default=None)
    pl.add_argument("--protocol", default=None)
    pl.set_defaults(func=cmd_plots)

    from cl_bayes import whatif  # light at import: torch and Avalanche load inside its main

    whatif.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, ConfigError, DataError, ResultsError, KeyError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"cl-bayes: error: {message}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as e:  # SubmissionError, validation errors, a missing extra
        print(f"cl-bayes: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cl-bayes: interrupted; finished runs are kept, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
