"""The leaderboard as one static HTML page: no server, no external files.

``leaderboard_html(board, figures)`` renders the frame of ``cl_bayes.leaderboard.build_leaderboard``
as one table per protocol and benchmark, each sortable by clicking a column header (a few
lines of inline JavaScript; numbers sort as numbers, missing values last), with that
section's plots embedded as base64 PNGs. ``#sort=<column>:<asc|desc>`` in the page's
address sorts every table on load (used by the browser test; e.g. ``#sort=accuracy:asc``).
When the script has run, ``<body>`` carries ``data-ready="1"``.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

import pandas as pd

# (key, header, kind): kind "num" sorts numerically, "text" alphabetically.
HTML_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("rank", "#", "num"),
    ("row", "Strategy (configuration)", "text"),
    ("status", "Status", "text"),
    ("verified", "Verified", "num"),
    ("accuracy", "Avg. accuracy (%)", "num"),
    ("seeds", "Seeds", "num"),
    ("forgetting", "Forgetting (pp)", "num"),
    ("bwt", "BWT (pp)", "num"),
    ("nll", "NLL", "num"),
    ("ece", "ECE (%)", "num"),
    ("time", "Time / run (s)", "num"),
    ("peak", "Peak mem (MB)", "num"),
    ("memory", "Memory", "num"),
    ("description", "Description", "text"),
)

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}
td.text,th.text{text-align:left}
th{background:#eee;cursor:pointer;user-select:none;white-space:nowrap}
th[aria-sort=ascending]::after{content:" \\25B2"}
th[aria-sort=descending]::after{content:" \\25BC"}
tr.status-unverified td{color:#555}
tr.status-verification-failed td{background:#fde2e2}
tr.status-external-unverified td{background:#fff6dc}
tr.status-verified td.status{color:#176317;font-weight:bold}
figure{display:inline-block;margin:0 1em 1em 0}
figure img{max-width:640px;border:1px solid #ddd}
figcaption{font-size:13px;color:#555}
"""

SCRIPT = """
(function(){
  function key(td){
    var v = td.getAttribute('data-sort');
    if (td.parentNode.parentNode.parentNode.querySelector('th[data-key="'+td.getAttribute('data-key')+'"]')
          .getAttribute('data-kind') === 'num') {
      var x = parseFloat(v);
      return isNaN(x) ? null : x;
    }
    return v === '' ? null : v.toLowerCase();
  }
  function sortTable(table, col, dir){
    var ths = table.querySelectorAll('thead th');
    var tbody = table.tBodies[0];
    var rows = Array.prototype.slice.call(tbody.rows);
    rows.sort(function(a, b){
      var x = key(a.cells[col]), y = key(b.cells[col]);
      if (x === null && y === null) return 0;
      if (x === null) return 1;
      if (y === null) return -1;
      return (x < y ? -1 : x > y ? 1 : 0) * (dir === 'asc' ? 1 : -1);
    });
    rows.forEach(function(r){ tbody.appendChild(r); });
    for (var i = 0; i < ths.length; i++) ths[i].removeAttribute('aria-sort');
    ths[col].setAttribute('aria-sort', dir === 'asc' ? 'ascending' : 'descending');
  }
  var tables = document.querySelectorAll('table.board');
  Array.prototype.forEach.call(tables, function(table){
    var ths = table.querySelectorAll('thead th');
    Array.prototype.forEach.call(ths, function(th, col){
      th.addEventListener('click', function(){
        var dir = th.getAttribute('aria-sort') === 'ascending' ? 'desc' : 'asc';
        sortTable(table, col, dir);
      });
    });
  });
  var m = /sort=([a-z_]+):(asc|desc)/.exec(location.hash || '');
  if (m) {
    Array.prototype.forEach.call(tables, function(table){
      var th = table.querySelector('thead th[data-key="'+m[1]+'"]');
      if (th) sortTable(table, Array.prototype.indexOf.call(th.parentNode.children, th), m[2]);
    });
  }
  document.body.setAttribute('data-ready', '1');
})();
"""


def _nan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA


def _num(v: Any, scale: float = 1.0, digits: int = 2, std: Any = None) -> tuple[str, str]:
    """(shown text, sort key) of a number (— and an empty key when missing)."""
    if _nan(v):
        return "—", ""
    text = f"{v * scale:.{digits}f}"
    if std is not None and not _nan(std):
        text += f" ± {std * scale:.{digits}f}"
    return text, repr(float(v) * scale)


def _cells(row) -> dict[str, tuple[str, str]]:
    from cl_bayes.leaderboard import verified_text

    memory = "" if _nan(row.memory_size) else str(int(row.memory_size))
    return {
        "rank": (str(row.rank), str(row.rank)),
        "row": (row.row, row.row),
        "status": (row.status, row.status),
        "verified": (verified_text(row.status, row.n_verified, row.n_failed, row.n_seeds),
                     "-1" if row.status == "external, unverified" else str(row.n_verified / row.n_seeds)),
        "accuracy": _num(row.accuracy_mean, 100, 2, row.accuracy_std),
        "seeds": (str(row.n_seeds), str(row.n_seeds)),
        "forgetting": _num(row.forgetting_mean, 100, 2, row.forgetting_std),
        "bwt": _num(row.bwt_mean, 100, 2, row.bwt_std),
        "nll": _num(row.nll_mean, 1, 3, row.nll_std),
        "ece": _num(row.ece_mean, 100, 2, row.ece_std),
        "time": _num(row.time_total_mean, 1, 1),
        "peak": _num(row.peak_memory_mb, 1, 0),
        "memory": (memory or "—", memory),
        "description": (row.description, row.description),
    }


def figure_png_base64(fig, dpi: int = 80) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def section_id(protocol: str, benchmark: str) -> str:
    return f"{protocol}-{benchmark}"


def leaderboard_html(board: pd.DataFrame, figures: dict[tuple[str, str], list[tuple[str, str]]] | None = None, *,
                     command: str, source: str, explanation: str = "") -> str:
    """The page. ``figures[(protocol, benchmark)]`` = [(caption, base64 PNG), ...]."""
    e = html.escape
    figures = figures or {}
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>cl-bayes leaderboard</title>',
        f"<style>{STYLE}</style></head><body>",
        "<h1>cl-bayes leaderboard</h1>",
        f"<p>Generated from the results files under <code>{e(source)}</code> by <code>{e(command)}</code>. "
        "Click a column header to sort; click again to reverse.</p>",
        f"<p>{e(explanation)}</p>" if explanation else "",
    ]
    if board.empty:
        out.append("<p>No results yet.</p>")
    groups = list(board.groupby(["protocol", "benchmark"], sort=False)) if not board.empty else []
    if groups:
        out.append("<nav><ul>" + "".join(
            f'<li><a href="#{e(section_id(p, b))}">{e(p)} / {e(b)}</a></li>' for (p, b), _ in groups) + "</ul></nav>")
    for (protocol, benchmark), sub in groups:
        sid = section_id(protocol, benchmark)
        out.append(f'<section id="{e(sid)}"><h2>{e(protocol)} / {e(benchmark)}</h2>')
        out.append(f'<table class="board" data-protocol="{e(protocol)}" data-benchmark="{e(benchmark)}">')
        out.append("<thead><tr>" + "".join(
            f'<th data-key="{k}" data-kind="{kind}" class="{"text" if kind == "text" else "num"}">{e(h)}</th>'
            for k, h, kind in HTML_COLUMNS) + "</tr></thead><tbody>")
        for row in sub.itertuples(index=False):
            cells = _cells(row)
            status_class = "status-" + row.status.replace(",", "").replace(" ", "-")
            out.append(f'<tr class="{status_class}" data-strategy="{e(row.strategy)}">' + "".join(
                f'<td data-key="{k}" data-sort="{e(cells[k][1])}" class="{"text" if kind == "text" else "num"}'
                f'{" status" if k == "status" else ""}">{e(cells[k][0])}</td>'
                for k, _, kind in HTML_COLUMNS) + "</tr>")
        out.append("</tbody></table>")
        for caption, png in figures.get((protocol, benchmark), []):
            out.append(f'<figure><img alt="{e(caption)}" src="data:image/png;base64,{png}">'
                       f"<figcaption>{e(caption)}</figcaption></figure>")
        out.append("</section>")
    out.append(f"<script>{SCRIPT}</script></body></html>")
    return "\n".join(x for x in out if x) + "\n"


def figures_for(runs: list[dict[str, Any]], *, dpi: int = 80) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """The comparison plots of ``cl_bayes.plots`` per (protocol, benchmark), as (caption, base64 PNG)."""
    from cl_bayes import plots

    colors = plots.strategy_colors(r["strategy"] for r in runs)
    out: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for (protocol, benchmark), group in plots.group_runs(runs).items():
        items = []
        for kind, build in plots.FIGURES.items():
            fig = build(group, colors)
            if fig is not None:
                items.append((f"{protocol} / {benchmark}: {kind}", figure_png_base64(fig, dpi)))
        out[(protocol, benchmark)] = items
    return out
