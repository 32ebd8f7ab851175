"""The run's report: loss curves and evaluation metrics as a JSON file and a PNG of the curves."""
import json
import math
from pathlib import Path


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

    names = sorted({k for row in history.steps for k in row if k.startswith("loss")})
    metrics = sorted({k for row in history.evals for k in row if k not in ("step", "stage")})
    panels = max(len(names), 1) + (1 if metrics else 0)
    figure, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), squeeze=False)
    for axis, name in zip(axes[0], names):
        points = [(row["step"], row[name]) for row in history.steps if name in row and _finite(row[name])]
        if points:
            axis.plot(*zip(*points), lw=0.8)
            if all(v > 0 for _, v in points):
                axis.set_yscale("log")
        axis.set_title(name)
        axis.set_xlabel("step")
    if metrics:
        axis = axes[0][-1]
        for name in metrics:
            points = [(row["step"], row[name]) for row in history.evals if _finite(row.get(name))]
            if points and all(-1.5 <= v <= 1.5 for _, v in points):  # correlations and shares share one axis
                axis.plot(*zip(*points), marker="o", ms=3, label=name)
        axis.set_title("evaluation")
        axis.set_xlabel("step")
        axis.legend(fontsize=6)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(out / "report.png", dpi=110)
    plt.close(figure)
    return out / "report.json", out / "report.png"
