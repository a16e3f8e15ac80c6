"""``benchmarks/results/report.html``: every figure of the last run beside its anchors and
its history on this machine, drawn with matplotlib from the JSON files the runs wrote.

    python -m benchmarks.report          # (``make bench`` runs it after the benchmarks)

For each group of figures of the newest results of each benchmark: a bar chart of the
run's rows (anchors in grey, with each row's ratio to its anchor), and beside it the same
rows over the last :data:`HISTORY` runs of that benchmark in the same mode (full or
quick). PNGs go to ``benchmarks/results/plots/``; the HTML page links them.
"""

from __future__ import annotations

import html
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, fmt_ratio, fmt_value

HISTORY = 10  # runs shown in each history plot
Run = dict[str, Any]


def load_runs(results: Path = RESULTS_DIR) -> dict[str, list[Run]]:
    """Every results file, by benchmark, oldest first (files that do not parse are skipped)."""
    runs: dict[str, list[Run]] = {}
    for path in sorted(results.glob("*.json")):
        try:
            body = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(body, dict) and "benchmark" in body and "groups" in body:
            runs.setdefault(str(body["benchmark"]), []).append(body)
    for found in runs.values():
        found.sort(key=lambda r: str(r.get("utc", "")))
    return runs


def _row_name(row: dict[str, Any]) -> str:
    metric = row.get("metric") or ""
    return f"{row['label']} {metric}".strip()


def _plot_group(group: dict[str, Any], history: Sequence[Run], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = group["rows"]
    fig, (bars, lines) = plt.subplots(
        1, 2, figsize=(11, 0.9 + 0.32 * max(len(rows), 4)), gridspec_kw={"width_ratios": [3, 2]}
    )
    names = [_row_name(r) for r in rows]
    values = [float(r["value"]) for r in rows]
    colours = ["#b0b0b0" if r.get("anchor") else "#c0392b" for r in rows]
    y = list(range(len(rows)))[::-1]
    bars.barh(y, values, color=colours)
    bars.set_yticks(y, names, fontsize=7)
    for yi, row, value in zip(y, rows, values, strict=True):
        ratios = ", ".join(f"{fmt_ratio(v)} {k}" for k, v in (row.get("ratios") or {}).items())
        text = f" {fmt_value(value)}" + (f"  ({ratios})" if ratios else "")
        bars.text(value, yi, text, va="center", fontsize=6)
    better = "higher" if group.get("higher_is_better") else "lower"
    bars.set_xlabel(f"{group.get('unit', '')} ({better} is better; grey: anchors)", fontsize=7)
    bars.tick_params(axis="x", labelsize=7)
    bars.set_xlim(0, max([*values, 0.0]) * 1.6 or 1)
    bars.set_title(title, fontsize=8, loc="left")
    # history: the same group (by title) in earlier runs
    stamps = [str(r.get("utc", ""))[4:13] for r in history]
    for name in names:
        series = []
        for run in history:
            match = next((g for g in run["groups"] if g["title"] == group["title"]), None)
            value = None
            if match is not None:
                value = next(
                    (float(r["value"]) for r in match["rows"] if _row_name(r) == name), None
                )
            series.append(value)
        xs = [i for i, v in enumerate(series) if v is not None]
        lines.plot(xs, [series[i] for i in xs], marker="o", markersize=3, label=name)
    lines.set_xticks(range(len(stamps)), stamps, fontsize=6, rotation=45, ha="right")
    lines.tick_params(axis="y", labelsize=7)
    lines.set_title(f"history: last {len(history)} run(s) here (UTC)", fontsize=7)
    if len(names) <= 8 and lines.get_lines():
        lines.legend(fontsize=5, loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def write_report(results: Path = RESULTS_DIR) -> Path:
    """Draw the plots and write ``report.html``; return its path."""
    runs = load_runs(results)
    plots = results / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    for stale in plots.glob("*.png"):
        stale.unlink()
    parts = [
        "<!doctype html><meta charset='utf-8'><title>a2a-redis benchmarks</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}"
        "img{max-width:100%}li{font-size:13px}</style>",
        "<h1>a2a-redis benchmarks</h1>",
    ]
    for bench, found in sorted(runs.items()):
        latest = found[-1]
        history = [r for r in found if r.get("mode") == latest.get("mode")][-HISTORY:]
        machine, server = latest.get("machine", {}), latest.get("server", {})
        parts.append(f"<h2>{html.escape(bench)}</h2>")
        parts.append(
            f"<p>{html.escape(str(latest.get('utc')))}, {html.escape(str(latest.get('mode')))}"
            f" run; {machine.get('cpus')} CPUs, Python {html.escape(str(machine.get('python')))};"
            f" {html.escape(str(server.get('name')))} {html.escape(str(server.get('version')))}"
            "</p>"
        )
        for i, group in enumerate(latest["groups"]):
            name = f"{bench}-{i}.png"
            _plot_group(group, history, group["title"][:95], plots / name)
            parts.append(f"<h3>{html.escape(group['title'])}</h3><img src='plots/{name}'>")
        if latest.get("notes"):
            parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in latest["notes"]))
            parts.append("</ul>")
    out = results / "report.html"
    out.write_text("\n".join(parts) + "\n")
    return out


def main() -> int:
    print(f"report written to {write_report()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
