"""Run logging: one JSONL metrics record per step, TensorBoard when installed, sample completions,
and PNG plots of the curves at the end of a run."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from r1kit.io import append_jsonl, read_jsonl


class MetricsLogger:
    """Writes `metrics.jsonl` (always), `samples.jsonl` and TensorBoard events (if available)."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.samples_path = self.run_dir / "samples.jsonl"
        if resume_step is not None:
            self._truncate_after(resume_step)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard is an optional sink
                self._tb = None

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records of steps after the checkpoint: they will be logged again."""
        from r1kit.io import atomic_write_text
        import json

        for path in (self.metrics_path, self.samples_path):
            if path.exists():
                keep = [r for r in read_jsonl(path) if r.get("step", -1) <= step]
                atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep))

    def log(self, record: dict[str, Any]) -> None:
        append_jsonl(self.metrics_path, record)
        if self._tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        for s in samples:
            append_jsonl(self.samples_path, {"step": step, **s})
        if self._tb is not None and samples:
            text = "\n\n".join(f"**reward {s.get('reward')}** `{s.get('completion', '')}`" for s in samples)
            self._tb.add_text("samples", text, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class NullLogger:
    """What ranks other than 0 log to under torchrun: nothing (only rank 0 writes files)."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        pass

    def close(self) -> None:
        pass


def plot_curves(metrics_path: Path, out_path: Path, panels: list[tuple[str, list[str]]]) -> Path | None:
    """One PNG with a panel per (title, [metric keys]) against step; None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(metrics_path) if Path(metrics_path).exists() else []
    if not records:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out_path)
    return out_path
