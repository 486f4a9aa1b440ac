"""The leaderboard, and validated submissions of outside results files.

Entry points (each takes explicit paths and returns what it wrote):

* ``write_leaderboard(results_root, md_path=None, csv_path=None)`` -> ``[md, csv]``
* ``write_leaderboard_html(results_root, html_path=None)`` -> the static page's path
* ``submit(files, results_root)`` -> the paths of the added results files
* ``build_leaderboard(results_root)`` -> a ``pandas.DataFrame`` (writes nothing)

Results are read from ``<results_root>/<protocol>/<benchmark>/<strategy>/seed<K>.json``
(see ``cl_bayes.results``); a file whose contents disagree with its path is an error.
Rows are (strategy, configuration) and carry a verification status; the strategy
registry and specs are read to tell a run's configuration from its spec's (see
``build_leaderboard``), so Avalanche is imported when a leaderboard is built.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from cl_bayes import metrics as M
from cl_bayes.protocols import BENCHMARKS as _BENCHMARKS
from cl_bayes.protocols import PROTOCOLS
from cl_bayes.results import ResultsError, load, result_path, validate, write_atomic, write_bytes_atomic
from cl_bayes.verify import IGNORED_CONFIG_KEYS, load_records, status_of

# Registered names come from the benchmark registry.
BENCHMARKS: tuple[str, ...] = tuple(_BENCHMARKS)

REGENERATE_COMMAND = "cl-bayes leaderboard"
MD_NAME = "LEADERBOARD.md"
CSV_NAME = "leaderboard.csv"
HTML_NAME = "leaderboard.html"
METRIC_TOL = 1e-6  # absolute tolerance for recomputed metrics in submissions
DESCRIPTION_MAX = 300  # characters of a submission's one-line description
STRATEGY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")

# Columns of build_leaderboard(), in order.
COLUMNS: tuple[str, ...] = (
    "protocol",
    "benchmark",
    "rank",
    "row",
    "strategy",
    "config",
    "status",
    "n_verified",
    "n_failed",
    "n_seeds",
    "seeds",
    "accuracy_mean",
    "accuracy_std",
    "forgetting_mean",
    "forgetting_std",
    "bwt_mean",
    "bwt_std",
    "nll_mean",
    "nll_std",
    "ece_mean",
    "ece_std",
    "time_total_mean",
    "time_total_std",
    "peak_memory_mb",
    "memory_size",
    "spec",
    "description",
)

# Row status, in display order within each table: verified rows first, then the rest.
STATUS_ORDER: tuple[str, ...] = ("verified", "unverified", "verification failed", "external, unverified")


class SubmissionError(ValueError):
    """A submitted results file was rejected; the message is one line naming the file."""


# --------------------------------------------------------------------------- loading


def load_runs(
    results_root: str | os.PathLike, *, benchmark: str | None = None, protocol: str | None = None
) -> list[dict[str, Any]]:
    """Every results file under ``results_root`` (validated), optionally filtered.

    Each returned dict is the file's contents plus ``"_path"``. Raises
    ``ResultsError`` when a file is invalid or lies at the wrong path for its contents.
    """
    root = Path(results_root)
    runs = []
    for path in sorted(root.glob("*/*/*/seed*.json")):
        data = load(path)
        expected = result_path(root, data["protocol"], data["benchmark"], data["strategy"], data["seed"])
        if path != expected:
            raise ResultsError(f"{path}: contents belong at {expected}")
        if benchmark is not None and data["benchmark"] != benchmark:
            continue
        if protocol is not None and data["protocol"] != protocol:
            continue
        runs.append({**data, "_path": str(path)})
    return runs


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


# --------------------------------------------------------------------------- configurations


def _toml_value(v: Any) -> str:
    """A value as ``--set`` takes it: ``6``, ``0.01``, ``"online"``, ``true``, ``[100, 100]``."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if v is None:
        return "null"
    return repr(v)


def flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """Training settings and strategy parameters in one mapping, without the row's own keys and the device."""
    flat = {k: v for k, v in config.items() if k != "params" and k not in IGNORED_CONFIG_KEYS}
    params = config.get("params")
    if isinstance(params, dict):
        flat.update(params)
    return flat


class SpecConfigs:
    """The configuration each registered strategy's spec resolves to, per (strategy, benchmark, protocol).

    ``None`` for a strategy name the registry does not know (an external method). Specs are read
    from ``specs`` (default: ``./strategies``, see ``cl_bayes.config.specs_dir``); the registry is
    imported on first use only.
    """

    def __init__(self, specs: str | os.PathLike | None = None):
        self.specs = specs
        self._cache: dict[tuple[str, str, str], dict[str, Any] | None] = {}
        self._names: set[str] | None = None

    def registered(self) -> set[str]:
        if self._names is None:
            from cl_bayes.avalanche import strategies

            self._names = set(strategies.names())
        return self._names

    def __call__(self, strategy: str, benchmark: str, protocol: str) -> dict[str, Any] | None:
        key = (strategy, benchmark, protocol)
        if key not in self._cache:
            if strategy not in self.registered():
                self._cache[key] = None
            else:
                from cl_bayes import config as C
                from cl_bayes.avalanche import strategies

                spec, path = C.load_spec(strategy, self.specs)
                cfg = C.resolve(benchmark=benchmark, strategy=strategy, seed=0, protocol=protocol,
                                params_cls=strategies.get(strategy).params_cls, spec=spec, spec_path=path)
                self._cache[key] = flat_config(cfg.to_dict())
        return self._cache[key]


def config_difference(recorded: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """The recorded values that differ from the spec's, for keys both know (sorted by key).

    A key missing from the recorded config (the file predates it) or unknown to today's spec
    resolution is not compared; ``device`` and the row's own keys never are.
    """
    rec = flat_config(recorded)
    return {k: rec[k] for k in sorted(rec) if k in spec and rec[k] != spec[k]}


def config_label(difference: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_toml_value(v)}" for k, v in difference.items())


def row_label(strategy: str, config: str) -> str:
    return f"{strategy} ({config})" if config else strategy


def runs_frame(runs: Iterable[dict[str, Any]], *, specs: SpecConfigs | None = None,
               records: dict[str, dict[str, Any]] | None = None) -> pd.DataFrame:
    """One row per run with the scalar fields the leaderboard and plots use.

    With ``specs``, ``config`` is the run's difference from its spec (``config_label``) and
    ``external`` says the strategy is not registered; with ``records`` (``cl_bayes.verify``),
    ``verification`` is the run's verification status.
    """
    rows = []
    for r in runs:
        m = r["metrics"]
        spec = specs(r["strategy"], r["benchmark"], r["protocol"]) if specs is not None else None
        external = specs is not None and spec is None
        label = config_label(config_difference(r.get("config") or {}, spec)) if spec is not None else ""
        description = r.get("description")
        rows.append(
            {
                "protocol": r["protocol"],
                "benchmark": r["benchmark"],
                "strategy": r["strategy"],
                "config": label,
                "external": external,
                "verification": status_of(r, records) if records is not None else "unverified",
                "description": description.strip() if isinstance(description, str) else "",
                "seed": r["seed"],
                "accuracy": _num(m["average_accuracy"]),
                "forgetting": _num(m["forgetting"]),
                "bwt": _num(m["backward_transfer"]),
                "nll": _num(m["nll"]),
                "ece": _num(m["ece"]),
                "time_total": _num(r["time_s"]["total"]),
                "peak_memory_mb": _num(r["peak_memory_mb"]),
                "memory_size": r.get("memory_size"),
                "spec": r.get("spec") or "",
                "path": r.get("_path", ""),
            }
        )
    columns = ["protocol", "benchmark", "strategy", "config", "external", "verification", "description", "seed",
               "accuracy", "forgetting", "bwt", "nll", "ece", "time_total", "peak_memory_mb", "memory_size",
               "spec", "path"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def _order(values: Iterable[str], registered: Iterable[str]) -> list[str]:
    """Registered names in registry order, then any others alphabetically."""
    values = set(values)
    return [v for v in registered if v in values] + sorted(values - set(registered))


# --------------------------------------------------------------------------- leaderboard


def _row_status(external: pd.Series, verification: pd.Series) -> str:
    if external.any():
        return "external, unverified"
    if (verification == "failed").any():
        return "verification failed"
    if (verification == "verified").any():
        return "verified"
    return "unverified"


def leaderboard_frame(runs: Iterable[dict[str, Any]], *, specs: SpecConfigs | None = None,
                      records: dict[str, dict[str, Any]] | None = None) -> pd.DataFrame:
    """The leaderboard of already-loaded runs (see ``build_leaderboard``)."""
    df = runs_frame(runs, specs=specs, records=records)
    if df.empty:
        return pd.DataFrame(columns=list(COLUMNS))
    parts = []
    for protocol in _order(df["protocol"], PROTOCOLS):
        for benchmark in _order(df["benchmark"], BENCHMARKS):
            sub = df[(df["protocol"] == protocol) & (df["benchmark"] == benchmark)]
            if sub.empty:
                continue
            g = sub.groupby(["strategy", "config"], sort=True)
            table = pd.DataFrame(
                {
                    "status": g.apply(lambda t: _row_status(t["external"], t["verification"]),
                                      include_groups=False),
                    "n_verified": g["verification"].agg(lambda s: int((s == "verified").sum())),
                    "n_failed": g["verification"].agg(lambda s: int((s == "failed").sum())),
                    "description": g["description"].agg(lambda s: next((d for d in s if d), "")),
                    "n_seeds": g["seed"].nunique(),
                    "seeds": g["seed"].agg(lambda s: ",".join(str(x) for x in sorted(s))),
                    **{
                        f"{name}_{stat}": g[name].agg(stat)  # std: sample std (ddof=1), NaN for one seed
                        for name in ("accuracy", "forgetting", "bwt", "nll", "ece", "time_total")
                        for stat in ("mean", "std")
                    },
                    "peak_memory_mb": g["peak_memory_mb"].max(),
                    "memory_size": g["memory_size"].agg(lambda s: s.dropna().max() if s.notna().any() else pd.NA),
                    "spec": g["spec"].agg(lambda s: "; ".join(sorted(set(s) - {""}))),
                }
            ).reset_index()
            table["row"] = [row_label(s, c) for s, c in zip(table["strategy"], table["config"], strict=True)]
            table["_group"] = table["status"].map(STATUS_ORDER.index)
            table = table.sort_values(["_group", "accuracy_mean", "row"], ascending=[True, False, True],
                                      kind="mergesort")
            # rank: position among the rows shown before it; verified rows first, ties share the best rank
            offset, ranks = 0, pd.Series(0, index=table.index)
            for _, part in table.groupby("_group", sort=True):
                ranks[part.index] = offset + part["accuracy_mean"].rank(method="min", ascending=False).astype(int)
                offset += len(part)
            table["rank"] = ranks.astype(int)
            table = table.drop(columns="_group")
            table.insert(0, "benchmark", benchmark)
            table.insert(0, "protocol", protocol)
            parts.append(table)
    return pd.concat(parts, ignore_index=True)[list(COLUMNS)]


def build_leaderboard(results_root: str | os.PathLike, *, specs: str | os.PathLike | None = None) -> pd.DataFrame:
    """Per protocol and benchmark, rows ranked by mean final average accuracy over seeds.

    One row per (protocol, benchmark, strategy, configuration). ``config`` is how the
    runs' recorded configuration differs from what the strategy's spec resolves to
    today (``config_difference``; empty for the spec's own row) and ``row`` the label,
    e.g. ``naive (epochs=6)``: a run with other settings is never averaged into the
    spec's row. ``status`` is ``verified`` (at least one run reproduced by ``cl-bayes
    verify``; ``n_verified`` counts them), ``unverified``, ``verification failed`` (a
    rerun disagreed with a run's matrix; ``n_failed``) or ``external, unverified`` (a
    strategy the registry does not know; ``description`` is the submitter's). Rows are
    ordered by status in that order, then by accuracy; ``rank`` follows that order.
    Other columns of ``COLUMNS``:
    ``<metric>_mean`` / ``<metric>_std`` over seeds (sample std, ddof=1; NaN
    for a single seed) of accuracy (final average accuracy), forgetting, bwt,
    nll, ece and time_total (total wall time of one run, seconds); the largest
    peak memory over seeds; the replay memory size; the spec file(s) used.
    Rank 1 is best; ties share the best rank. Fractions, not percent.
    """
    return leaderboard_frame(load_runs(results_root), specs=SpecConfigs(specs), records=load_records(results_root))


def _pm(mean: float, std: float, scale: float = 1.0, digits: int = 2) -> str:
    if pd.isna(mean):
        return "—"
    text = f"{mean * scale:.{digits}f}"
    if not pd.isna(std):
        text += f" ± {std * scale:.{digits}f}"
    return text


def _duration(seconds: float) -> str:
    if pd.isna(seconds):
        return "—"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


MD_HEADER = (
    "| # | Strategy (configuration) | Avg. accuracy (%) | Seeds | Verified | Forgetting (pp) | BWT (pp) | NLL "
    "| ECE (%) | Time / run | Peak mem (MB) | Memory | Spec |"
)
MD_ALIGN = "|--:|---|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|---|"


def verified_text(status: str, n_verified: int, n_failed: int, n_seeds: int) -> str:
    """What the Verified column says: ``2/3``, ``0/3 (1 failed)``, or ``external, unverified``."""
    if status == "external, unverified":
        return status
    return f"{n_verified}/{n_seeds}" + (f" ({n_failed} failed)" if n_failed else "")


EXPLANATION = (
    "Rows are (strategy, configuration): runs whose recorded configuration differs from the strategy's spec "
    "(`strategies/<name>.toml` as resolved today) form their own row, labelled by the differing keys, e.g. "
    "`naive (epochs=6)`. *Verified* counts the row's runs that `cl-bayes verify` reran with their recorded "
    "configuration and reproduced (every accuracy-matrix entry within 1 point; records in `verified.json`). "
    "In each table, rows with a verified run come first, then unverified rows, then rows with a failed "
    "verification, then external methods (strategy names the registry does not know, with the submitter's "
    "description); ranks follow that order."
)


def leaderboard_markdown(board: pd.DataFrame, *, command: str = REGENERATE_COMMAND, source: str = "results") -> str:
    """Readable markdown: one section and table per protocol / benchmark."""
    lines = [
        "# cl-bayes leaderboard",
        "",
        f"Generated from the results files under `{source}`. Do not edit by hand; regenerate with:",
        "",
        "```sh",
        command,
        "```",
        "",
        (
            "Strategies are ranked by final average accuracy (mean over seeds, after the last experience). "
            "`±` is the sample standard deviation over seeds. Forgetting and backward transfer (BWT) are in "
            "percentage points; they are undefined (—) for joint-training upper bounds. NLL and ECE are of "
            "the final model on the test sets of all experiences. Time is the total wall time of one run, "
            "peak memory the largest over seeds, memory the replay-memory size."
        ),
        "",
        EXPLANATION,
        "",
    ]
    if board.empty:
        lines += ["No results yet.", ""]
        return "\n".join(lines)
    for (protocol, benchmark), sub in board.groupby(["protocol", "benchmark"], sort=False):
        lines += [f"## {protocol} / {benchmark}", "", MD_HEADER, MD_ALIGN]
        for row in sub.itertuples(index=False):
            memory = "—" if pd.isna(row.memory_size) else str(int(row.memory_size))
            peak = "—" if pd.isna(row.peak_memory_mb) else f"{row.peak_memory_mb:.0f}"
            spec = f"`{row.spec}`" if row.spec else "—"
            name = row.row
            if row.status == "external, unverified" and row.description:
                name += f" — {row.description}"
            cells = [
                str(row.rank),
                name,
                _pm(row.accuracy_mean, row.accuracy_std, 100),
                str(row.n_seeds),
                verified_text(row.status, row.n_verified, row.n_failed, row.n_seeds),
                _pm(row.forgetting_mean, row.forgetting_std, 100),
                _pm(row.bwt_mean, row.bwt_std, 100),
                _pm(row.nll_mean, row.nll_std, 1, 3),
                _pm(row.ece_mean, row.ece_std, 100),
                _duration(row.time_total_mean),
                peak,
                memory,
                spec,
            ]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_leaderboard(
    results_root: str | os.PathLike,
    md_path: str | os.PathLike | None = None,
    csv_path: str | os.PathLike | None = None,
    *,
    command: str = REGENERATE_COMMAND,
) -> list[Path]:
    """Write the markdown leaderboard and its CSV (defaults: ``<results_root>/LEADERBOARD.md``
    and ``<results_root>/leaderboard.csv``), each atomically. Returns ``[md_path, csv_path]``.

    ``command`` is the command line printed in the markdown to regenerate it.
    """
    root = Path(results_root)
    md_path = Path(md_path) if md_path is not None else root / MD_NAME
    csv_path = Path(csv_path) if csv_path is not None else root / CSV_NAME
    board = build_leaderboard(root)
    markdown = leaderboard_markdown(board, command=command, source=str(results_root))
    write_bytes_atomic(md_path, markdown.encode(), overwrite=True)
    write_bytes_atomic(csv_path, board.to_csv(index=False, lineterminator="\n").encode(), overwrite=True)
    return [md_path, csv_path]


def write_leaderboard_html(
    results_root: str | os.PathLike,
    html_path: str | os.PathLike | None = None,
    *,
    command: str = REGENERATE_COMMAND,
    plots: bool = True,
    specs: str | os.PathLike | None = None,
) -> Path:
    """Write the static page (default ``<results_root>/leaderboard.html``; see ``cl_bayes.leaderboard_html``).

    The plots are those of ``cl_bayes.plots`` drawn per row label, so a run with another
    configuration is drawn as its own line, as in the tables.
    """
    from cl_bayes import leaderboard_html as H

    root = Path(results_root)
    html_path = Path(html_path) if html_path is not None else root / HTML_NAME
    runs = load_runs(root)
    spec_configs = SpecConfigs(specs)
    board = leaderboard_frame(runs, specs=spec_configs, records=load_records(root))
    figures = {}
    if plots and runs:
        labels = runs_frame(runs, specs=spec_configs)
        relabelled = [{**r, "strategy": row_label(r["strategy"], c)} for r, c in zip(runs, labels["config"],
                                                                                      strict=True)]
        figures = H.figures_for(relabelled)
    page = H.leaderboard_html(board, figures, command=command, source=str(results_root), explanation=EXPLANATION)
    return write_bytes_atomic(html_path, page.encode(), overwrite=True)


# --------------------------------------------------------------------------- submissions


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_submission(data: dict[str, Any], source: str, registered: set[str] | None = None) -> None:
    """The checks beyond ``results.validate``: every documented field, registered names,
    recomputed metrics. Raises ``SubmissionError``."""

    def fail(reason: str) -> None:
        raise SubmissionError(f"{source}: {reason}")

    for key, kind in (("spec", str), ("data_source", str), ("calibration", dict), ("created", str)):
        if key not in data:
            fail(f"missing field '{key}'")
        if not isinstance(data[key], kind):
            fail(f"field '{key}' has the wrong type ({type(data[key]).__name__})")
    if "memory_size" not in data:
        fail("missing field 'memory_size'")
    if not isinstance(data["memory_size"], int) or isinstance(data["memory_size"], bool) or data["memory_size"] < 0:
        fail("memory_size must be a non-negative integer")
    if data["benchmark"] not in BENCHMARKS:
        fail(f"unknown benchmark '{data['benchmark']}' (registered: {', '.join(BENCHMARKS)})")
    if data["protocol"] not in PROTOCOLS:
        fail(f"unknown protocol '{data['protocol']}' (registered: {', '.join(PROTOCOLS)})")
    if not STRATEGY_NAME.match(data["strategy"]):
        fail(f"strategy name '{data['strategy']}' is not a plain name (letters, digits, . _ + -)")
    description = data.get("description")
    if description is not None and (not isinstance(description, str) or len(description) > DESCRIPTION_MAX
                                    or "\n" in description):
        fail(f"description must be one line of at most {DESCRIPTION_MAX} characters")
    if registered is not None and data["strategy"] not in registered and not (description or "").strip():
        fail(f"strategy '{data['strategy']}' is not registered: an outside method needs a 'description' field "
             "(one line saying what it is); it is listed as external, unverified")
    if data["seed"] < 0:
        fail("seed must be non-negative")
    for key in ("torch", "avalanche-lib", "cl-bayes", "python"):
        if not isinstance(data["versions"].get(key), str):
            fail(f"versions.{key} must be a string")
    try:
        datetime.fromisoformat(data["created"])
    except ValueError:
        fail(f"created '{data['created']}' is not an ISO 8601 timestamp")
    per_exp = data["time_s"].get("per_experience")
    if not isinstance(per_exp, list) or not all(_is_number(t) and t >= 0 for t in per_exp):
        fail("time_s.per_experience must be a list of non-negative numbers")
    if not _is_number(data["time_s"]["total"]) or data["time_s"]["total"] < 0:
        fail("time_s.total must be a non-negative number")
    if not _is_number(data["peak_memory_mb"]) or data["peak_memory_mb"] < 0:
        fail("peak_memory_mb must be a non-negative number")

    matrix = data["accuracy_matrix"]
    rows, cols = len(matrix), len(matrix[0])
    if rows not in (1, cols):
        fail(f"accuracy_matrix is {rows} x {cols}; expected square (T x T) or a single row (joint run)")
    recomputed = M.matrix_metrics(matrix)
    for key, value in recomputed.items():
        given = data["metrics"][key]
        if value is None or given is None:
            if value is not given:
                fail(f"metrics.{key} is {given} but the accuracy matrix gives {value}")
        elif abs(given - value) > METRIC_TOL:
            fail(f"metrics.{key} is {given} but the accuracy matrix gives {value}")
    if data["metrics"]["nll"] is None or data["metrics"]["nll"] < 0:
        fail("metrics.nll must be a non-negative number")

    cal = data["calibration"]
    bins = cal.get("bins")
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 1:
        fail("calibration.bins must be a positive integer")
    for key in ("count", "accuracy", "confidence"):
        if not isinstance(cal.get(key), list) or len(cal[key]) != bins:
            fail(f"calibration.{key} must be a list of {bins} entries (one per bin)")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in cal["count"]):
        fail("calibration.count entries must be non-negative integers")
    if sum(cal["count"]) == 0:
        fail("calibration table has no examples")
    for key in ("accuracy", "confidence"):
        if not all(_is_number(v) and 0 <= v <= 1 for v in cal[key]):
            fail(f"calibration.{key} entries must be numbers in [0, 1]")
    ece = M.ece_from_reliability(cal)
    given = data["metrics"]["ece"]
    if given is None or abs(given - ece) > METRIC_TOL:
        fail(f"metrics.ece is {given} but the calibration table gives {ece}")


def check_submission(file: str | os.PathLike, registered: set[str] | None = None) -> dict[str, Any]:
    """Read and check one submitted results file; return its contents or raise ``SubmissionError``.

    ``registered``: the registered strategy names; a file naming another strategy must then
    carry a one-line ``description`` (an external method).
    """
    source = str(file)
    try:
        text = Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SubmissionError(f"{source}: cannot read ({e.__class__.__name__}: {e})") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise SubmissionError(f"{source}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except ValueError as e:
        raise SubmissionError(f"{source}: not valid JSON ({e})") from None
    try:
        validate(data, source=source)
    except ResultsError as e:
        raise SubmissionError(str(e).replace("\n", " ")) from None
    _check_submission(data, source, registered)
    return data


def submit(files: Iterable[str | os.PathLike], results_root: str | os.PathLike) -> list[Path]:
    """Validate outside results files and add them under ``results_root``; all or nothing.

    Every file is checked first (see the module's schema and ``check_submission``),
    including that no two submitted files are the same run (protocol, benchmark,
    strategy, seed) and that none is already present. Only then are they written,
    each atomically and never over an existing file; if a write fails, the files
    (and folders) this call created are removed again. Returns the written paths.
    Raises ``SubmissionError`` with a one-line reason naming the offending file.
    """
    root = Path(results_root)
    files = [Path(f) for f in files]
    planned: list[tuple[Path, dict[str, Any]]] = []
    seen: dict[Path, Path] = {}
    registered = SpecConfigs().registered()
    for file in files:
        data = check_submission(file, registered)
        dest = result_path(root, data["protocol"], data["benchmark"], data["strategy"], data["seed"])
        run = f"{data['protocol']}/{data['benchmark']}/{data['strategy']} seed {data['seed']}"
        if dest in seen:
            raise SubmissionError(f"{file}: duplicate seed: {run} is also in {seen[dest]}")
        if dest.exists():
            raise SubmissionError(f"{file}: {run} already exists at {dest}; nothing is overwritten")
        seen[dest] = file
        planned.append((dest, data))

    written: list[Path] = []
    created_dirs: list[Path] = []
    try:
        for dest, data in planned:
            for parent in reversed(dest.parents):
                if not parent.exists():
                    created_dirs.append(parent)
            write_atomic(dest, data)
            written.append(dest)
    except BaseException as e:
        for path in written:
            path.unlink(missing_ok=True)
        for d in sorted(set(created_dirs), key=lambda p: len(p.parts), reverse=True):
            try:
                d.rmdir()
            except OSError:
                pass
        if isinstance(e, Exception):
            source = next((str(seen[dest]) for dest, _ in planned if dest not in written), "submission")
            reason = str(e).replace("\n", " ")
            raise SubmissionError(f"{source}: write failed, nothing added ({reason})") from e
        raise
    return written

