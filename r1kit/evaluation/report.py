"""Evaluation reports: summary.json, summary.md (markdown tables) and PNG plots, all written atomically.

    write_report(summary, Path("eval"))   # -> summary.json, summary.md, pass_at_k.png, accuracy_by_<field>.png

Plots render with matplotlib's Agg canvas (no display needed, pyplot untouched): pass@k against k
(with cons@k), and one bar chart of pass@1 and cons@k per breakdown field (e.g. MATH-500 level, subject).
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from r1kit.evaluation.metrics import EvalSummary
from r1kit.io import atomic_write_json, atomic_write_text


def write_report(summary: EvalSummary, out_dir: Path) -> list[Path]:
    """Write summary.json, summary.md and the plots into `out_dir`; return the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(summary, out_dir)
    atomic_write_json(out_dir / "summary.json", summary.to_dict())
    atomic_write_text(out_dir / "summary.md", summary_markdown(summary, [p.name for p in plots]))
    return [out_dir / "summary.json", out_dir / "summary.md", *plots]


# ----------------------------------------------------------------------------- markdown


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def summary_markdown(summary: EvalSummary, plot_names: list[str] = ()) -> str:
    """The summary as markdown: headline metrics, pass@k, and one table per breakdown field."""
    s, k = summary, summary.k
    lo, hi = s.pass1_ci
    title = s.settings.get("label") or "evaluation"
    lines = [
        f"# {title}",
        "",
        f"{s.num_problems} problems x {k} samples; "
        + ", ".join(f"{key}={value}" for key, value in s.settings.items() if key not in ("label",)),
        "",
        "| metric | value |",
        "|---|---|",
        f"| pass@1 (mean over {k} samples) | {_pct(s.pass1)} (95% CI {_pct(lo)} to {_pct(hi)}, normal approx. over problems) |",
        f"| cons@{k} (majority vote) | {_pct(s.cons)} |",
        *(f"| pass@{j} (unbiased) | {_pct(v)} |" for j, v in sorted(s.pass_at_k.items())),
        f"| no parseable answer | {_pct(s.no_answer_rate)} |",
        f"| format (`<think></think><answer></answer>`) | {_pct(s.format_rate)} |",
        f"| reflection (\"wait\", \"verify\", ...) | {_pct(s.reflection_rate)} |",
        f"| truncated at max_new_tokens | {_pct(s.truncated_rate)} |",
        f"| length in tokens: mean / p50 / p90 | {s.mean_length:.1f} / {s.p50_length:.0f} / {s.p90_length:.0f} |",
    ]
    for name, cells in s.by.items():
        lines += ["", f"## by {name}", "", f"| {name} | problems | pass@1 | cons@{k} |", "|---|---:|---:|---:|"]
        lines += [f"| {v} | {c['num_problems']} | {_pct(c['pass1'])} | {_pct(c['cons'])} |" for v, c in cells.items()]
    if plot_names:
        lines += ["", "## plots", ""] + [f"![{n}]({n})" for n in plot_names]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "field"


def _save(fig, path: Path) -> None:
    """savefig to a temp file beside `path`, then rename: a crash never leaves half a PNG."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        # No timestamp metadata: the same summary gives the same bytes (resumed == uninterrupted run).
        fig.savefig(tmp, dpi=100, bbox_inches="tight", metadata={"Software": None})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_plots(summary: EvalSummary, out_dir: Path) -> list[Path]:
    """pass_at_k.png always; accuracy_by_<field>.png for each breakdown field."""
    # A bare Figure renders PNGs with the Agg canvas and leaves pyplot's global backend and figure
    # list alone (a trainer's own plotting is not disturbed, and nothing needs closing).
    from matplotlib.figure import Figure

    paths = []
    ks = sorted({1, *summary.pass_at_k})
    values = [summary.pass_at_k.get(j, summary.pass1) for j in ks]
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    ax.plot(ks, values, marker="o", label="pass@k (unbiased)")
    ax.axhline(summary.cons, color="tab:orange", linestyle="--", label=f"cons@{summary.k}")
    ax.set(xlabel="k", ylabel="accuracy", ylim=(0, 1.02), xscale="log" if ks[-1] > 8 else "linear",
           title=f"pass@k ({summary.num_problems} problems, {summary.k} samples each)")
    ax.set_xticks(ks, [str(j) for j in ks])
    ax.legend(loc="best")
    paths.append(out_dir / "pass_at_k.png")
    _save(fig, paths[-1])
    for name, cells in summary.by.items():
        labels = list(cells)
        fig = Figure(figsize=(max(4.5, 0.7 * len(labels) + 2), 3.5))
        ax = fig.subplots()
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], [c["pass1"] for c in cells.values()], width=0.4, label="pass@1")
        ax.bar([x + 0.2 for x in xs], [c["cons"] for c in cells.values()], width=0.4, label=f"cons@{summary.k}")
        slanted = max(map(len, labels)) > 6  # long names (MATH subjects) would overlap side by side
        ax.set_xticks(list(xs), labels, rotation=30 if slanted else 0, ha="right" if slanted else "center")
        ax.set(ylabel="accuracy", ylim=(0, 1.02), title=f"accuracy by {name}")
        ax.legend()
        paths.append(out_dir / f"accuracy_by_{_safe_name(name)}.png")
        _save(fig, paths[-1])
    return paths
