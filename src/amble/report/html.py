"""A self-contained HTML report of one run, rebuilt from the run's files alone."""

from __future__ import annotations

import base64
import json
import math
import os
from collections.abc import Callable
from datetime import datetime
from html import escape
from pathlib import Path

import yaml

from amble.durable import write_atomic
from amble.report.files import STRATEGY_SUMMARY_FIELDS, RunData, read_run
from amble.report.plots import PlotFile, target_accuracy, write_plots
from amble.report.progress import failed_rounds_warnings

REPORT_FILE = "report.html"
REFERENCE_STRATEGY = "amble"
NOT_REACHED = "not reached"
MISSING = "—"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1200px; padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { margin-bottom: .2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
.meta { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 1rem 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: .35rem .7rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f2f4f7; } tbody tr:nth-child(even) { background: #fafafa; }
tr.speedup td { font-weight: 600; background: #eef5ee; }
.note { color: #555; font-size: .92rem; max-width: 60rem; }
.warning { color: #8a1c1c; background: #fdf0f0; border-left: 4px solid #c0392b; padding: .5rem .8rem;
           max-width: 60rem; }
figure { margin: 1.5rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .92rem; }
pre { background: #f6f8fa; padding: 1rem; overflow-x: auto; border: 1px solid #e1e4e8; }
"""

_Formatter = Callable[[object], str]


def build_report(run_dir: str | os.PathLike[str]) -> Path:
    """Read a run directory, write its PNG plots and ``report.html`` into it; return the HTML path."""
    run = read_run(run_dir)
    plots = write_plots(run, run.run_dir)
    page = render_html(run, plots, generated=datetime.now().astimezone())
    path = run.run_dir / REPORT_FILE
    write_atomic(path, page.encode("utf-8"))
    return path


def render_html(run: RunData, plots: list[PlotFile], generated: datetime) -> str:
    """The report page; every string that came from the run's files is HTML-escaped."""
    name = escape(run.name)
    targets = sorted({t for s in run.strategies if (t := target_accuracy(run, s)) is not None})
    target_text = ", ".join(f"{t * 100:g}%" for t in targets) or "none set"
    figures = "\n".join(_figure(plot) for plot in plots)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>AMBLE report: {name}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>AMBLE run report: {name}</h1>
<p class="meta">Generated {escape(generated.strftime("%Y-%m-%d %H:%M %Z").strip())} from
<code>{escape(run.run_dir.name or str(run.run_dir))}</code>.
Strategies: {escape(", ".join(run.strategies)) or MISSING}. Target accuracy: {escape(target_text)}.</p>
<h2>Summary</h2>
{_failed_rounds_note(run)}{_summary_table(run)}
<h2>Plots</h2>
{figures}
<h2>Resolved configuration</h2>
<pre>{escape(_config_text(run))}</pre>
</body>
</html>
"""


def speedup_vs_reference(run: RunData, strategy: str) -> float | None:
    """time_to_target(strategy) / time_to_target(amble): how many times longer than amble it took
    to reach the target; None if either never reached it or there is no "amble" strategy."""
    if REFERENCE_STRATEGY not in run.strategies:
        return None
    own = _finite(run.strategy_summary(strategy).get("time_to_target_s"))
    reference = _finite(run.strategy_summary(REFERENCE_STRATEGY).get("time_to_target_s"))
    if own is None or reference is None or reference <= 0:
        return None
    return own / reference


def _failed_rounds_note(run: RunData) -> str:
    """A warning above the table when any strategy had rounds that failed (empty when none did)."""
    results = {s: run.strategy_summary(s) for s in run.strategies}
    rows_file = "serve.jsonl" if run.measured else "metrics.jsonl"
    lines = failed_rounds_warnings(results, rows_file)
    return "".join(f'<p class="warning">Warning: {escape(line)}.</p>\n' for line in lines)


def _summary_table(run: RunData) -> str:
    strategies = run.strategies
    if not strategies:
        return '<p class="note">The run recorded no strategies.</p>'
    header = "".join(f"<th>{escape(s)}</th>" for s in strategies)
    rows = []
    for key in _summary_keys(run):
        label, formatter = _ROWS.get(key, (key, _format_any))
        cells = "".join(f"<td>{formatter(run.strategy_summary(s).get(key))}</td>" for s in strategies)
        rows.append(f"<tr><td>{escape(_row_label(run, key, label))}</td>{cells}</tr>")
    note = (
        f'No strategy is named "{REFERENCE_STRATEGY}", so no speed-up is shown.'
        if REFERENCE_STRATEGY not in strategies
        else ""
    )
    if not note:
        cells = "".join(f"<td>{_format_speedup(run, s)}</td>" for s in strategies)
        rows.append(f'<tr class="speedup"><td>Time to target ÷ amble\'s</td>{cells}</tr>')
        note = (
            "The last row divides each strategy's time to target by amble's: 2.00× means it needed "
            f"twice amble's {run.clock_text} to reach the target accuracy."
        )
    return (
        f"<table>\n<thead><tr><th>Result</th>{header}</tr></thead>\n<tbody>\n"
        + "\n".join(rows)
        + f'\n</tbody>\n</table>\n<p class="note">{escape(note)} {escape(_times_note(run))} '
        "Function counts come from the serverless parameter server.</p>"
    )


def _times_note(run: RunData) -> str:
    if run.measured:
        return (
            "Times are wall-clock seconds measured on a real fleet (amble serve), from the first round's start; "
            "wall time counts from the server's start."
        )
    return "Times are simulated (virtual) seconds except wall time."


def _row_label(run: RunData, key: str, label: str) -> str:
    """The summary row's label; a served run's times are measured, not virtual."""
    if run.measured and key in ("time_to_target_s", "virtual_time_s"):
        return {"time_to_target_s": "Time to target (measured)", "virtual_time_s": "Measured time"}[key]
    return label


def _summary_keys(run: RunData) -> list[str]:
    """The SPEC's result keys in order, then any extra keys the strategies reported."""
    keys = list(STRATEGY_SUMMARY_FIELDS)
    for strategy in run.strategies:
        keys.extend(k for k in run.strategy_summary(strategy) if k not in keys)
    return keys


def _figure(plot: PlotFile) -> str:
    encoded = base64.b64encode(plot.path.read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{encoded}" alt="{escape(plot.caption)}">'
        f"<figcaption>{escape(plot.caption)} (<code>{escape(plot.path.name)}</code>)</figcaption></figure>"
    )


def _config_text(run: RunData) -> str:
    if not run.config:
        return "(no configuration was recorded in summary.json)"
    try:
        return yaml.safe_dump(run.config, sort_keys=False, allow_unicode=True, default_flow_style=False)
    except yaml.YAMLError:
        return json.dumps(run.config, indent=2, ensure_ascii=False)


def _finite(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _format_speedup(run: RunData, strategy: str) -> str:
    ratio = speedup_vs_reference(run, strategy)
    if ratio is not None:
        return f"{ratio:.2f}×"
    reached = _finite(run.strategy_summary(strategy).get("time_to_target_s")) is not None
    return MISSING if reached else NOT_REACHED


def _format_any(value: object) -> str:
    if value is None:
        return MISSING
    number = _finite(value)
    if number is not None:
        return f"{int(number):,}" if number.is_integer() and abs(number) < 1e15 else f"{number:.4g}"
    if isinstance(value, str):
        return escape(value)
    return escape(json.dumps(value, ensure_ascii=False))


def _numeric(render: Callable[[float], str], null_text: str = MISSING) -> _Formatter:
    """A cell formatter: numbers through ``render``, null as ``null_text``, anything else escaped."""

    def format_cell(value: object) -> str:
        if value is None:
            return null_text
        number = _finite(value)
        return render(number) if number is not None else _format_any(value)

    return format_cell


def _percent(value: float) -> str:
    return f"{value * 100:.2f}%"


def _seconds(value: float) -> str:
    return f"{value:,.1f} s"


def _count(value: float) -> str:
    return f"{value:,.0f}"


def _instances(value: object) -> str:
    """The real instances of a Redis or Ray run in one cell; the embedded runtime has virtual ones only."""
    if not isinstance(value, dict):
        return "none (embedded: in the driver's process)"
    cold_ms = value.get("cold_start_ms_median")
    cold = f"; cold start {cold_ms:,.0f} ms (median)" if isinstance(cold_ms, int | float) else ""
    return escape(
        f"{value.get('started', 0)} started ({value.get('replacements', 0)} replacements, "
        f"{value.get('retired', 0)} retired), peak {value.get('peak', 0)}{cold}"
    )


_ROWS: dict[str, tuple[str, _Formatter]] = {
    "final_accuracy": ("Final accuracy", _numeric(_percent)),
    "best_accuracy": ("Best accuracy", _numeric(_percent)),
    "target_accuracy": ("Target accuracy", _numeric(_percent)),
    "time_to_target_s": ("Time to target (virtual)", _numeric(_seconds, NOT_REACHED)),
    "rounds_to_target": ("Rounds to target", _numeric(_count, NOT_REACHED)),
    "virtual_time_s": ("Virtual time", _numeric(_seconds)),
    "wall_time_s": ("Wall time", _numeric(_seconds)),
    "rounds": ("Rounds", _numeric(_count)),
    "rounds_failed": ("Rounds failed", _numeric(_count)),
    "updates_aggregated": ("Updates aggregated", _numeric(_count)),
    "updates_rejected": ("Updates rejected", _numeric(_count)),
    "function_invocations": ("Function invocations", _numeric(_count)),
    "cold_starts": ("Cold starts", _numeric(_count)),
    "warm_starts": ("Warm starts", _numeric(_count)),
    "function_busy_s": ("Busy function time", _numeric(_seconds)),
    "real_instances": ("Real function instances", _instances),
}
