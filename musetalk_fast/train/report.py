"""The run's report: loss curves and evaluation metrics as a JSON file and a PNG of the curves."""
import json
import math
from pathlib import Path

import numpy as np


class History:
    """Per-step scalars (losses, learning rate, seconds) and per-evaluation metrics, kept in the checkpoint
    so a resumed run's report continues the same curves."""

    def __init__(self, state=None):
        state = state or {}
        self.steps = state.get("steps", [])    # [{"step": n, "stage": s, name: value, ...}]
        self.evals = state.get("evals", [])    # [{"step": n, "stage": s, metric: value, ...}]
        self.info = state.get("info", {})      # anything else worth reporting (label-cleaning counts, timings)

    def log(self, step, stage, **values):
        self.steps.append({"step": int(step), "stage": int(stage), **{k: float(v) for k, v in values.items()}})

    def log_eval(self, step, stage, metrics):
        row = {"step": int(step), "stage": int(stage)}
        row.update({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        self.evals.append(row)

    def state_dict(self):
        return {"steps": self.steps, "evals": self.evals, "info": self.info}

    def load_state_dict(self, state):
        self.__init__(state)


def _finite(value):
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def write_report(history, out, title="training"):
    """out/report.json (every logged row, the metrics, the info) and out/report.png (loss curves on a
    log scale, one panel per loss; the metrics against the step)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    document = {"title": title, "info": history.info, "evals": history.evals, "steps": history.steps}
    text = json.dumps(document, indent=1, sort_keys=True, default=lambda v: _finite(float(v)))
    (out / "report.json").write_text(text + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one x axis over the stages: stage k's steps follow the last step of stage k - 1
    last = {}
    for row in history.steps:
        last[row["stage"]] = max(last.get(row["stage"], 0), row["step"])
    offset, total = {}, 0
    for stage in sorted(last):
        offset[stage], total = total, total + last[stage]

    def x_of(row):
        return row["step"] + offset.get(row["stage"], 0)

    names = sorted({k for row in history.steps for k in row if k.startswith("loss") or k.endswith("_mse")})
    metrics = sorted({k for row in history.evals for k in row if k not in ("step", "stage")
                      and all(-1.5 <= row[k] <= 1.5 for row in history.evals if _finite(row.get(k)) is not None)})
    panels = max(len(names), 1) + (1 if metrics else 0)
    columns = min(panels, 4)
    rows = (panels + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    axes = axes.ravel()
    for axis in axes[panels:]:
        axis.set_visible(False)
    for axis, name in zip(axes, names):
        for stage in sorted(last):
            points = [(x_of(row), row[name]) for row in history.steps
                      if row["stage"] == stage and name in row and _finite(row[name]) is not None]
            if not points:
                continue
            xs, ys = zip(*points)
            axis.plot(xs, ys, lw=0.5, alpha=0.4, color=f"C{stage - 1}")
            width = max(1, len(ys) // 20)  # a moving average over ~5 % of the stage
            smooth = np.convolve(ys, np.ones(width) / width, mode="valid")
            axis.plot(xs[width - 1:], smooth, lw=1.4, color=f"C{stage - 1}", label=f"stage {stage}")
        if all(row[name] > 0 for row in history.steps if _finite(row.get(name)) is not None):
            axis.set_yscale("log")
        axis.set_title(name)
        axis.set_xlabel("step (both stages)")
        axis.legend(fontsize=6)
    if metrics:
        axis = axes[panels - 1]
        for number, name in enumerate(metrics):
            points = [(x_of(row), row[name]) for row in history.evals if _finite(row.get(name)) is not None]
            if points:
                axis.plot(*zip(*points), marker="o", ms=3, label=name, color=f"C{number}")
        axis.set_title("held-out evaluation (EMA weights)")
        axis.set_xlabel("step (both stages)")
        axis.legend(fontsize=6)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(out / "report.png", dpi=110)
    plt.close(figure)
    return out / "report.json", out / "report.png"
