"""How the report looks: the compact table, results.md and the accuracy bar chart.

A row means a result: methods with no readable metrics.json are left out (one line under the table names
them and what adds them). Every number says how many seeds it is over: the "seeds" cell (of the run's seeds,
naming any missing or unreadable one) and `(k of n seeds)` on a cell over fewer seeds than its row.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffinject.report.gate import gate_lines
from diffinject.report.inputs import (
    BASELINE_STAGES,
    COLUMNS,
    COMPARED,
    METHODS,
    WORST_GROUP,
    numeric_leaves,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

STD_NOTE = "mean ± sample std (ddof = 1) over seeds"


FEWER_NOTE = (
    "(k of n seeds): mean over the k of the row's n seeds that have this value (the others' metrics.json "
    "hold null or NaN there, e.g. an empty test group, or predate the measure)"
)
COLUMN_NOTES = {
    "conflicting": "conflicting: accuracy on the bias-conflicting test images (class ≠ bias)",
    "worst class (conflicting)": "worst class (conflicting): the lowest per-class accuracy on those images",
    "worst-group": "worst-group: the lowest accuracy over the (class, bias) test groups",
}


def pct(stat: dict[str, Any] | None, digits: int = 2, seeds: int | None = None) -> str:
    """`mean ± std` in %; `(k of n seeds)` appended when only k < n = `seeds` seeds have the value."""
    if not stat or stat.get("mean") is None:
        return "–"
    n = stat.get("n", 0)
    if n < 2:
        text = f"{100 * stat['mean']:.{digits}f}"
    else:
        text = f"{100 * stat['mean']:.{digits}f} ± {100 * stat['std']:.{digits}f}"
    return f"{text} ({n} of {seeds} seeds)" if seeds is not None and n < seeds else text


def shown_columns(results: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """The table's and the figure's accuracy columns: worst-group only where its groups are large enough."""
    return (*COLUMNS, WORST_GROUP) if (results.get("worst_group") or {}).get("shown") else COLUMNS


def seeds_cell(entry: dict[str, Any], run_seeds: Sequence[int]) -> str:
    """ "5", or "3 of 5 (seed 2: metrics.json not UTF-8; seed 4 not run)" when the row lacks some seeds."""
    n, total = entry.get("n", 0), len(run_seeds)
    if n >= total:
        return str(n)
    unreadable = {int(s): r for s, r in (entry.get("unreadable") or {}).items()}
    why = [f"seed {s}: metrics.json {r}" for s, r in sorted(unreadable.items())]
    absent = [str(s) for s in entry.get("missing_seeds", []) if s not in unreadable]
    if absent:
        why.append(f"seed{'s' if len(absent) > 1 else ''} {', '.join(absent)} not run")
    return f"{n} of {total} ({'; '.join(why)})" if why else f"{n} of {total}"


def left_out_line(results: dict[str, Any]) -> str | None:
    """One line naming the methods without a row: not run (and what adds them), or none readable."""
    empty = [(s, n) for s, n in METHODS if results["methods"].get(s, {}).get("n", 0) == 0]
    broken = [(s, n) for s, n in empty if results["methods"][s].get("unreadable")]
    baselines = [n for s, n in empty if s in BASELINE_STAGES and (s, n) not in broken]
    others = [n for s, n in empty if s not in BASELINE_STAGES and (s, n) not in broken]
    parts = []
    if baselines:
        parts.append(
            f"{', '.join(baselines)} (`make baselines` adds {'them' if len(baselines) > 1 else 'it'})"
        )
    if others:
        parts.append(f"{', '.join(others)} (`make pipeline` adds {'them' if len(others) > 1 else 'it'})")
    lines = [f"Not run, so not in the table: {'; '.join(parts)}."] if parts else []
    for stage, name in broken:
        why = ", ".join(f"seed {s}: {r}" for s, r in results["methods"][stage]["unreadable"].items())
        lines.append(f"No readable metrics.json for {name} ({why}), so not in the table.")
    return " ".join(lines) or None


def column_notes(results: dict[str, Any], rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per derived column (what it measures), and why worst-group is or is not a column."""
    columns = shown_columns(results)
    lines = ["; ".join(COLUMN_NOTES[label] for _, label in columns if label in COLUMN_NOTES) + "."]
    rule = results.get("worst_group") or {}
    smallest, minimum = rule.get("smallest_group"), rule.get("min_group_images")
    if rule.get("shown"):
        lines[0] = lines[0][:-1] + f" (every group has ≥ {minimum} test images here)."
    elif smallest is not None:
        lines.append(
            f"worst-group is not a column: the smallest (class, bias) test group has {smallest} image(s) "
            f"(< {minimum}), so some group sits at 0 % whatever the method; results.json keeps it "
            "(`test/acc_worst_group`) and each method's per-group accuracy and count (`groups`)."
        )
    else:
        lines.append(
            "worst-group is not a column: these metrics.json files do not record the test group sizes "
            "(`test_groups`, written by this version's test stage); results.json keeps "
            "`test/acc_worst_group`."
        )
    key = COLUMNS[-1][0]
    if any(e.get("n") and not (e.get(key) or {}).get("n") for e in rows):
        lines.append(
            f"{COLUMNS[-1][1]} shows – where the row's metrics.json files predate it "
            "(rerun the stage's test)."
        )
    return lines


def fewer_seeds(entry: dict[str, Any], keys: Sequence[str]) -> dict[str, int]:
    """key → how many seeds have it, for the keys averaged over fewer seeds than the entry has."""
    counts = {key: (entry.get(key) or {}).get("n", 0) for key in keys}
    return {key: n for key, n in counts.items() if n < entry.get("n", 0)}


def compact_table(results: dict[str, Any]) -> str:
    """Methods that have a result × accuracy columns in %, the unbiased column starred; under it what each
    derived column means, which methods are left out, and the top-K/synthetic one-liners (with seeds)."""
    unbiased, columns = results["unbiased_column"], shown_columns(results)
    header = ["method", "seeds"] + [f"{label} ★" if label == unbiased else label for _, label in columns]
    header += ["val acc (biased)", "selected on"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    fewer = False
    rows = [entry for entry in results["methods"].values() if entry.get("n", 0) > 0]
    for entry in rows:
        n = entry["n"]
        cells = [entry["name"], seeds_cell(entry, results["seeds"])]
        cells += [pct(entry.get(key), seeds=n) for key, _ in columns]
        chosen = "last epoch" if entry["name"].endswith("last epoch") else entry.get("selection") or "–"
        lines.append("| " + " | ".join([*cells, pct(entry.get("val/acc"), seeds=n), chosen]) + " |")
        counts = fewer_seeds(entry, [*(k for k, _ in columns), "val/acc"]).values()
        fewer = fewer or any(k > 0 for k in counts)  # a marked cell; "–" (no seed has it) needs no note
    lines.append("")
    lines.append(
        f"★ unbiased accuracy ({results['unbiased_note']}). Test accuracy in %, mean ± sample std (ddof = 1) "
        f"over the row's seeds (\"seeds\": how many of the run's {len(results['seeds'])}; a missing or "
        "unreadable seed is named there)."
    )
    if fewer:
        lines.append(FEWER_NOTE + ".")
    lines += column_notes(results, rows)
    left_out = left_out_line(results)
    if left_out:
        lines.append(left_out)
    topk = results.get("topk")
    if topk and topk.get("precision"):
        scope = "per class" if topk.get("per_class") else "global"
        precision = pct(topk["precision"], seeds=topk.get("n"))
        source = topk.get("k_source") or "gce"
        line = f"Top-K precision (K={topk['k']} {scope}, {source}, fraction bias-conflicting): {precision} %"
        if source != "gce" and topk.get("gce_precision"):  # the committee's pick beside the GCE model's
            line += f" (GCE top-K on the same run: {pct(topk['gce_precision'], seeds=topk.get('n'))} %)"
        lines.append(f"{line}, over {topk['n']} seed(s)")
    synthetic = results.get("synthetic")
    if synthetic:
        summary = synthetic["summary"]
        size = summary.get("size", {}).get("mean")
        count = summary.get("size", {}).get("n") or len(synthetic.get("per_seed") or {})
        text = f"Synthetic set ({count} seed(s))"
        text += f": {size:.0f} images per seed" if size is not None else ""
        if summary.get("colour.conflict_rate"):
            text += f"; measured conflict rate (colour ≠ label): {pct(summary['colour.conflict_rate'])} %"
            if summary.get("shape.shape_is_label"):
                text += f"; keeps the label's shape: {pct(summary['shape.shape_is_label'])} %"
            if summary.get("recombination.recombination"):
                text += (
                    "; new combinations (one image's digit in the other's colour, as the label rule asks): "
                    f"{pct(summary['recombination.recombination'])} %"
                )
        elif summary.get("nominal.nominal_conflict_rate"):
            text += f"; nominal conflict rate: {pct(summary['nominal.nominal_conflict_rate'])} %"
        lines.append(text)
    return "\n".join(lines) + "\n"


def _is_rate(key: str) -> bool:
    return not any(word in key for word in ("size", "distinct", "effective", "num_", "mse"))


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _count(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def _stat_rows(
    summary: dict[str, Any], per_seed: dict[int, dict[str, Any]], keys: Sequence[tuple[str, str]]
) -> list[str]:
    seeds = sorted(per_seed)
    lines = ["| measure | mean ± std | " + " | ".join(f"seed {s}" for s in seeds) + " |"]
    lines.append("|" + "---|" * (2 + len(seeds)))
    for key, label in keys:
        stat = summary.get(key)
        if not stat or stat.get("mean") is None:
            continue
        show = _rate if _is_rate(key) else _count
        values = [numeric_leaves(per_seed[s]).get(key) for s in seeds]
        spread = f"{show(stat['mean'])} ± {show(stat['std'])}" if stat["n"] > 1 else show(stat["mean"])
        lines.append(f"| {label} | {spread} | " + " | ".join(show(v) for v in values) + " |")
    return lines


SYNTHETIC_ROWS = (
    ("size", "images"),
    ("colour.conflict_rate", "**measured conflict rate** (estimated colour ≠ label)"),
    ("colour.colour_is_content_colour", "colour = content's colour (content_bias)"),
    ("colour.colour_is_style_colour", "colour = style's colour (style_bias)"),
    ("colour.off_palette", "colour off the palette (farther than half the closest palette gap)"),
    ("colour.num_without_foreground", "images without foreground"),
    ("shape.shape_is_label", "shape probe reads the label"),
    ("shape.shape_is_content_label", "shape probe reads the content's label"),
    ("shape.shape_is_style_label", "shape probe reads the style's label"),
    ("nominal.nominal_conflict_rate", "nominal conflict rate (manifest bias labels, not measured)"),
    ("nominal.content_is_conflicting", "content image truly conflicting (top-K hit)"),
    ("distinct_contents", "distinct contents"),
    ("effective_contents", "effective number of contents (exp entropy)"),
    ("distinct_styles", "distinct styles"),
    ("pixels.mse_to_content", "pixel MSE to content"),
    ("pixels.mse_to_style", "pixel MSE to style"),
    ("pixels.closer_to_content", "closer to content than to style (pixel MSE)"),
)


def markdown(results: dict[str, Any]) -> str:
    parts = [f"# DiffInject report: {results['dataset']} {results['pct']}", "", compact_table(results)]
    parts += [
        "## Methods in detail",
        "",
        "| method | seeds present | missing | values missing | group-mean | checkpoint epochs |",
    ]
    parts.append("|---|---|---|---|---|---|")
    labels = {**dict(shown_columns(results)), "test/acc_group_mean": "group-mean", "val/acc": "val acc"}
    for e in (e for e in results["methods"].values() if e.get("n", 0) > 0):  # a row means a result
        name = e["name"]
        epochs = ", ".join(f"{s}: {v}" for s, v in e["checkpoint_epoch"].items()) or "–"
        fewer = fewer_seeds(e, list(labels))
        holes = ", ".join(f"{labels[k]} ({e['n'] - n} of {e['n']} seeds)" for k, n in fewer.items()) or "–"
        missing = str(e["missing_seeds"] or "–")
        if e.get("unreadable"):
            missing += " (" + ", ".join(f"{s}: {r} metrics.json" for s, r in e["unreadable"].items()) + ")"
        parts.append(
            f"| {name} | {e['seeds'] or '–'} | {missing} | {holes} | "
            f"{pct(e.get('test/acc_group_mean'), seeds=e['n'])} | {epochs} |"
        )
    topk = results.get("topk")
    parts += ["", "## Top-K selection (bias stage)", ""]
    if topk:
        parts.append(
            f"K = {topk['k']} ({'per class' if topk['per_class'] else 'global'}), {topk['n']} seed(s): "
            f"precision {pct(topk['precision'])} %, recall {pct(topk['recall'])} %, best possible "
            f"precision {pct(topk['max_precision'])} % (bias labels used for reporting only)."
        )
    else:
        parts.append("– (no `bias/topk_summary.json`)")
    parts += ["", "## Synthetic set", ""]
    synthetic = results.get("synthetic")
    if synthetic:
        parts += _stat_rows(synthetic["summary"], synthetic["per_seed"], SYNTHETIC_ROWS)
        probe = synthetic.get("probe")
        if probe:
            parts += [
                "",
                f"Shape probe: MLP (hidden {probe['hidden']}) on colour-free training images, task "
                f"labels only; test accuracy {100 * probe['test_acc']:.1f} % on {probe['num_test']} test "
                f"images (train {100 * probe['train_acc']:.1f} %).",
            ]
        parts += [f"- {note}" for note in synthetic["notes"]]
    else:
        parts.append("– (no `inject/manifest.csv`: the injection stage was not run)")
    parts += generated_lines(results.get("generated"))
    parts += ["", "## Gate and premise check (inject stage)", "", *gate_lines(results.get("gate"))]
    parts += ["", "## Wall time", "", "| stage | seconds | per seed |", "|---|---|---|"]
    for stage, entry in results["timings"]["per_stage"].items():
        per = ", ".join(f"{k}: {v:.0f}" for k, v in entry["per_seed"].items())
        parts.append(f"| {stage} | {entry['total_s']:.0f} | {per or '–'} |")
    parts += [f"| **total** | {results['timings']['total_s']:.0f} | |", "", "## Configs", ""]
    for stage, knobs in results["configs"]["knobs"].items():
        shown = ", ".join(f"{k}={json.dumps(v)}" for k, v in knobs.items() if k != "differs_across_seeds")
        parts.append(f"- **{stage}**: {shown}")
        if knobs.get("differs_across_seeds"):
            parts.append(f"  (differs across seeds: {', '.join(knobs['differs_across_seeds'])})")
    parts += ["", "Config files:", *[f"- `{p}`" for p in results["configs"]["files"]]]
    if results["notes"]:
        parts += ["", "## Notes", "", *[f"- {n}" for n in results["notes"]]]
    return "\n".join(parts) + "\n"


#: (key in the generated-set summary, column) for the generative baselines' image sets
GENERATED_COLUMNS = (
    ("size", "images per seed"),
    ("shape_is_label", "probe reads the label"),
    ("colour_conflicts_label", "colour conflicts with the label"),
    ("new_combination", "new combinations"),
    ("off_palette", "off palette"),
)


def generated_lines(generated: dict[str, Any] | None) -> list[str]:
    """The generative baselines' image sets, measured like DiffInject's (why a row is where it is)."""
    if not generated:
        return []
    lines = ["", "## Generated sets (A², AmpliBias)", ""]
    lines.append("| set | seeds | " + " | ".join(label for _, label in GENERATED_COLUMNS) + " |")
    lines.append("|---|---|" + "---|" * len(GENERATED_COLUMNS))
    for entry in generated.values():
        summary = entry["summary"]
        cells = []
        for key, _ in GENERATED_COLUMNS:
            stat = summary.get(key)
            if key == "size":
                cells.append(f"{stat['mean']:.0f}" if stat and stat.get("mean") is not None else "–")
            else:
                cells.append(pct(stat, digits=1))
        lines.append(f"| {entry['name']} | {len(entry['per_seed'])} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "New combinations: the probe reads the label's class and the colour is not that class's (a bias-"
        "conflicting image of the right class). Measured on Colored MNIST only (shape probe, palette); other "
        "datasets list the set sizes.",
    ]
    return lines


# ---------------------------------------------------------------------------------------------- figures
def percent_of(stat: dict[str, Any] | None, name: str, missing: float) -> float:
    """100 × stat[name] in percent; `missing` when absent (a 0.0 accuracy stays 0, not missing)."""
    value = (stat or {}).get(name)
    return missing if value is None else 100 * float(value)


def accuracy_plot(results: dict[str, Any]) -> Figure | None:
    """Grouped bars: one group per accuracy column, one bar per compared method that has test metrics
    (height = mean, error bar = sample std over seeds); None when no method has any."""
    present = [(s, n) for s, n in METHODS if s in COMPARED and results["methods"][s]["n"] > 0]
    if not present:
        return None
    from matplotlib.figure import Figure  # no pyplot: no global state, no backend switch

    columns = shown_columns(results)
    x = np.arange(len(columns))
    width = 0.8 / len(present)
    fig = Figure(figsize=(7.5, 4))
    ax = fig.subplots()
    for i, (stage, name) in enumerate(present):
        entry = results["methods"][stage]
        means = [percent_of(entry.get(k), "mean", math.nan) for k, _ in columns]
        stds = [percent_of(entry.get(k), "std", 0.0) for k, _ in columns]
        positions = x + (i - (len(present) - 1) / 2) * width
        ax.bar(positions, means, width, yerr=stds, capsize=3, label=f"{name} (n={entry['n']})")
        fewer = fewer_seeds(entry, [k for k, _ in columns])
        for column, (key, _) in enumerate(columns):  # a bar averaged over fewer seeds says so
            if key in fewer and not math.isnan(means[column]):
                top = means[column] + stds[column] + 1
                ax.text(positions[column], top, f"n={fewer[key]}", ha="center", va="bottom", fontsize=6)
    unbiased = results["unbiased_column"]
    ax.set_xticks(x, [f"{label} ★" if label == unbiased else label for _, label in columns], fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{results['dataset']} {results['pct']}: {STD_NOTE}; ★ unbiased", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def accuracy_figure(path: Path, results: dict[str, Any]) -> Path | None:
    """`accuracy_plot` saved as a PNG at `path`; None (nothing written) when there is nothing to plot."""
    fig = accuracy_plot(results)
    if fig is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
