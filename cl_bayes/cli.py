"""The ``cl-bayes`` command.

    cl-bayes run --strategy S --benchmark B --seed K [--protocol quick|paper] [--set key=value ...] [--resumable]
    cl-bayes suite benchmarks/suites/default.toml [--jobs N] [--executor local|ray] [--only-strategy S ...]
    cl-bayes bench [SUITE] [--resume RUN_DIR]    (run into runs/<date-time>/, compare with results/)
    cl-bayes compare RUN_DIR [SUITE]
    cl-bayes leaderboard | cl-bayes submit FILE... | cl-bayes verify FILE... | cl-bayes plots
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
    p.add_argument("--resumable", action="store_true",
                   help="save each run's state after every experience (seedK.ckpt beside seedK.json) and go on "
                        "from a checkpoint found there; deleted once the results file is written")


def _overrides(args) -> tuple:
    return tuple(parse_override(text) for text in args.overrides)


def cmd_run(args) -> int:
    from tqdm import tqdm

    request = S.RunRequest(
        strategy=args.strategy, benchmark=args.benchmark, seed=args.seed, protocol=args.protocol,
        results_root=args.results, data_root=args.data_root, specs=args.specs, overrides=_overrides(args),
        device=args.device, threads=args.threads or (os.cpu_count() or 1), overwrite=args.overwrite,
        resumable=args.resumable,
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


def _check_data(todo, data_root) -> None:
    """Load every dataset the planned runs need once, here: a missing data root is one DataError before any
    worker starts (not one failure per run), and the workers then read the decoded tensor cache."""
    from cl_bayes import data
    from cl_bayes.protocols import BENCHMARKS

    for name in sorted({BENCHMARKS[r.benchmark].dataset for r in todo if r.benchmark in BENCHMARKS}):
        data.load(name, data_root)


def _run_suite(args, results_root: str):
    """Plan and run the suite file's missing runs into ``results_root``, with progress.

    Returns (suite, todo, done, failures, wall seconds). On Ctrl-C the workers stop within about
    a second, the finished runs of this call are listed and no partial results file is left.
    """
    from tqdm import tqdm

    from cl_bayes.avalanche import strategies

    suite = S.load_suite(args.suite_file, strategies.names())
    part = S.restrict(suite, strategies=args.only_strategy, benchmarks=args.only_benchmark, seeds=args.only_seed)
    jobs = args.jobs or S.default_jobs()
    threads = max(1, (os.cpu_count() or 1) // jobs)
    todo, done = S.plan(part, results_root=results_root, data_root=args.data_root, specs=args.specs,
                        overrides=_overrides(args), device=args.device, threads=threads, overwrite=args.overwrite,
                        resumable=args.resumable)
    for r in todo:  # fail fast on bad specs, before hours of work
        S.resolve_request(r)
    _check_data(todo, args.data_root)
    parallel = jobs if args.executor == "local" else (args.jobs or "all CPUs")
    what = "" if part == suite else " (part)"
    print(f"suite {args.suite_file}{what} into {results_root}: {len(todo)} runs to do, {len(done)} already done "
          f"({args.executor} executor, {parallel} in parallel)", flush=True)
    failures, finished = [], []
    start = time.perf_counter()
    with tqdm(total=len(todo), desc="runs", unit="run", disable=args.quiet or not sys.stderr.isatty()) as bar:
        def on_result(outcome):
            bar.update(1)
            n = len(finished) + len(failures) + 1
            elapsed = time.perf_counter() - start
            if outcome["status"] == "failed":
                failures.append(outcome)
                bar.write(f"[{n}/{len(todo)} {elapsed / 60:.1f} min] FAILED {outcome['label']}: {outcome['error']}")
            else:
                finished.append(outcome)
                acc = f": {100 * outcome['accuracy']:.2f}%" if "accuracy" in outcome else f" ({outcome['status']})"
                bar.write(f"[{n}/{len(todo)} {elapsed / 60:.1f} min] {outcome['label']}{acc}")
                bar.set_postfix_str(outcome["label"])

        try:
            if args.executor == "ray":
                from cl_bayes.ray_executor import run_ray

                run_ray(todo, address=args.address, on_result=on_result, num_cpus=args.jobs)
            else:
                S.run_local(todo, jobs=jobs, on_result=on_result, log_experiences=not args.quiet)
        except KeyboardInterrupt:
            S.remove_partial_files(todo)
            bar.close()
            print(f"interrupted after {time.perf_counter() - start:.1f} s: {len(finished)} of {len(todo)} runs "
                  f"finished in this call" + (": " + "; ".join(o["label"] for o in finished) if finished else ""),
                  file=sys.stderr, flush=True)
            raise
    return suite, todo, done, failures, time.perf_counter() - start


def _write_summary(args, suite, results_root: str, todo, done, wall: float) -> str:
    frame = S.summary_frame(results_root, suite)
    command = " ".join(["cl-bayes", "suite", str(args.suite_file)]
                       + ([] if results_root == DEFAULT_RESULTS else ["--results", str(results_root)]))
    text = S.summary_markdown(frame, command=command, wall_s=wall if todo and not done else None)
    summary = Path(results_root) / suite.protocol / f"SUMMARY-{Path(args.suite_file).stem}.md"
    if not frame.empty:  # the whole suite's results so far, also when this call had nothing left to run
        from cl_bayes.results import write_bytes_atomic

        heading = f"# Suite {Path(args.suite_file).stem} ({suite.protocol})\n\n"
        write_bytes_atomic(summary, (heading + text).encode(), overwrite=True)
    return text


def cmd_suite(args) -> int:
    suite, todo, done, failures, wall = _run_suite(args, args.results)
    print(_write_summary(args, suite, args.results, todo, done, wall))
    if failures:
        raise UserError(f"{len(failures)} of {len(todo)} runs failed: " + "; ".join(f["label"] for f in failures))
    return 0


def _compare_and_report(args, suite, run_root: str) -> int:
    from cl_bayes import bench

    comparison = bench.compare(run_root, args.reference, suite, k_std=args.k_std, floor=args.floor)
    text = bench.comparison_markdown(comparison, reference=args.reference, run=str(run_root),
                                     k_std=args.k_std, floor=args.floor)
    written = bench.write_comparison(run_root, comparison, text)
    print(text)
    print("wrote " + ", ".join(str(p) for p in written))
    return 1 if not bench.failed(comparison).empty else 0


def cmd_bench(args) -> int:
    """Run the suite into a fresh run folder (or resume one), then compare with the reference."""
    from cl_bayes import bench, plots

    if not Path(args.reference).is_dir():
        raise UserError(f"no reference results folder {args.reference}")
    if args.resume:
        run_root = Path(args.resume)
        if not run_root.is_dir():
            raise UserError(f"no run folder {run_root} to resume")
    else:
        from cl_bayes.avalanche import strategies

        S.load_suite(args.suite_file, strategies.names())  # bad suite files fail before a folder is made
        run_root = bench.new_run_dir(args.runs)
    if Path(run_root).resolve() == Path(args.reference).resolve():
        raise UserError("the run folder must not be the reference folder; update references with cl-bayes suite")
    print(f"run folder: {run_root}", flush=True)
    suite, todo, done, failures, wall = _run_suite(args, str(run_root))
    print(f"suite wall time: {wall / 60:.1f} min", flush=True)
    _write_summary(args, suite, str(run_root), todo, done, wall)
    if not args.no_plots and any(Path(run_root).glob("*/*/*/seed*.json")):
        written = plots.make_plots(run_root, Path(run_root) / "plots", protocol=suite.protocol)
        print(f"wrote {len(written)} plots under {Path(run_root) / 'plots'}")
    for f in failures:
        print(f"FAILED {f['label']}: {f['error']}", file=sys.stderr)
    return _compare_and_report(args, suite, str(run_root))


def cmd_compare(args) -> int:
    """Compare an existing run folder with the reference (no runs)."""
    from cl_bayes.avalanche import strategies

    suite = S.load_suite(args.suite_file, strategies.names())
    for root in (args.run, args.reference):
        if not Path(root).is_dir():
            raise UserError(f"no results folder {root}")
    if Path(args.run).resolve() == Path(args.reference).resolve():
        raise UserError(f"{args.run} is the reference itself; compare a run folder with it")
    return _compare_and_report(args, suite, args.run)


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
    print(leaderboard.write_leaderboard_html(args.results, command=command, plots=not args.no_plots))
    return 0


def cmd_submit(args) -> int:
    from cl_bayes import leaderboard

    added = leaderboard.submit(args.files, args.results)
    for path in added:
        print(f"added {path}")
    leaderboard.write_leaderboard(args.results)
    leaderboard.write_leaderboard_html(args.results)
    return 0


def cmd_verify(args) -> int:
    """Rerun each file's recorded configuration; compare accuracy matrices; record the outcome."""
    from tqdm import tqdm

    from cl_bayes import verify
    from cl_bayes.avalanche import strategies
    from cl_bayes.leaderboard import SpecConfigs, check_submission, config_difference, config_label

    if not 0 <= args.tolerance <= 1:
        raise UserError(f"--tolerance must be an accuracy fraction in [0, 1], got {args.tolerance}")
    known = set(strategies.names())
    items = []
    for file in args.files:  # every file is checked before anything runs
        path = Path(file)
        data = check_submission(path)
        if data["strategy"] not in known:
            raise UserError(f"{path}: strategy '{data['strategy']}' is not registered, so it cannot be rerun here; "
                            "an outside method stays external, unverified")
        verify.recorded_config(data, device=args.device)  # unknown keys or bad values fail here
        items.append((path, data))
    if args.one_per_group:
        specs = SpecConfigs(args.specs)

        def group(d):
            spec = specs(d["strategy"], d["benchmark"], d["protocol"])
            return d["protocol"], d["benchmark"], d["strategy"], config_label(config_difference(d["config"], spec))

        items = verify.pick_one_per_group(items, group)
    command = "cl-bayes verify " + " ".join(str(p) for p, _ in items)
    records, mismatches = {}, []
    print(f"verifying {len(items)} runs (tolerance {args.tolerance:g} per accuracy-matrix entry)", flush=True)
    for path, data in items:
        label = f"{data['strategy']} on {data['benchmark']} seed {data['seed']} ({data['protocol']})"
        with tqdm(total=None, desc=label, unit="exp", disable=args.quiet or not sys.stderr.isatty()) as bar:
            def progress(done, total):
                bar.total = total
                bar.update(done - bar.n)

            start = time.perf_counter()
            new = verify.rerun(data, data_root=args.data_root, threads=args.threads, device=args.device,
                               progress=progress)
        record = verify.make_record(data, new, args.tolerance, command=command)
        records[verify.record_key(data)] = record
        diff = "shapes differ" if record["max_abs_diff"] is None else f"max entry diff {record['max_abs_diff']:.4f}"
        acc = record["average_accuracy"]
        verdict = "VERIFIED" if record["verified"] else "MISMATCH"
        print(f"{verdict} {path}: {label}: recorded {100 * acc['recorded']:.2f}%, rerun {100 * acc['rerun']:.2f}%, "
              f"{diff} ({time.perf_counter() - start:.1f} s)", flush=True)
        if not record["verified"]:
            mismatches.append(str(path))
    print(f"records: {verify.store_records(args.results, records)}")
    if mismatches:
        print(f"cl-bayes: {len(mismatches)} of {len(items)} runs did not reproduce: {', '.join(mismatches)}",
              file=sys.stderr)
        return 1
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

    def add_tolerance(parser_):
        parser_.add_argument("--reference", default=DEFAULT_RESULTS,
                             help="committed reference results root (default: results)")
        parser_.add_argument("--k-std", type=float, default=3.0,
                             help="tolerance in reference standard deviations (default: 3)")
        parser_.add_argument("--floor", type=float, default=0.5, help="smallest tolerance, accuracy points (0.5)")

    b = sub.add_parser("bench", help="run a suite into a fresh runs/<date-time>/ folder and compare it with "
                                     "the reference results; exit 1 when a cell regresses")
    b.add_argument("suite_file", nargs="?", default="benchmarks/suites/default.toml")
    b.add_argument("--runs", default="runs", help="where run folders are made (default: runs)")
    b.add_argument("--resume", default=None, metavar="RUN_DIR", help="resume into this existing run folder")
    b.add_argument("--jobs", type=int, default=None, help="parallel runs (default: min(2, cores))")
    b.add_argument("--executor", default="local", choices=["local", "ray"])
    b.add_argument("--address", default=None, help="Ray cluster address")
    b.add_argument("--no-plots", action="store_true", help="skip the run folder's plots")
    for flag, kind, conv in (("strategy", "strategy", str), ("benchmark", "benchmark", str), ("seed", "seed", int)):
        b.add_argument(f"--only-{flag}", action="append", default=[], type=conv, metavar=kind.upper(),
                       help=f"run only this {kind} of the suite (repeatable)")
    add_tolerance(b)
    b.add_argument("--data-root", default=None, help="dataset root (default: $CL_BAYES_DATA)")
    b.add_argument("--specs", default=None, help="strategy spec folder (default: ./strategies)")
    b.add_argument("--device", default="cpu")
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    b.set_defaults(func=cmd_bench, overwrite=False, resumable=True)  # --resume also goes on inside a killed run

    c = sub.add_parser("compare", help="compare a results folder (e.g. a run folder) with the reference")
    c.add_argument("run", help="the results folder to check, e.g. runs/2026-12-03-120000")
    c.add_argument("suite_file", nargs="?", default="benchmarks/suites/default.toml")
    add_tolerance(c)
    c.set_defaults(func=cmd_compare)

    sub.add_parser("list", help="registered benchmarks and strategies").set_defaults(func=cmd_list)

    lb = sub.add_parser("leaderboard", help="write results/LEADERBOARD.md and results/leaderboard.csv")
    lb.add_argument("--results", default=DEFAULT_RESULTS)
    lb.add_argument("--no-plots", action="store_true", help="leave the plots out of leaderboard.html")
    lb.set_defaults(func=cmd_leaderboard)

    v = sub.add_parser("verify", help="rerun results files' recorded configurations and compare their accuracy "
                                      "matrices; records go to <results>/verified.json")
    v.add_argument("files", nargs="+")
    v.add_argument("--results", default=DEFAULT_RESULTS, help="results root whose verified.json gets the records")
    v.add_argument("--tolerance", type=float, default=0.01,
                   help="largest allowed difference of one accuracy-matrix entry, a fraction (default 0.01)")
    v.add_argument("--one-per-group", action="store_true",
                   help="rerun only the lowest seed of each (protocol, benchmark, strategy, configuration)")
    v.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    v.add_argument("--data-root", default=None, help="dataset root (default: $CL_BAYES_DATA)")
    v.add_argument("--specs", default=None, help="strategy spec folder (for --one-per-group)")
    v.add_argument("--device", default="cpu")
    v.set_defaults(func=cmd_verify)

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
