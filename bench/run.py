"""Run every op's microbenchmark on the current device, with the device's peaks measured in the
same run; print a table (time, ratio to the best baseline, % of roofline), write <out>/<device>.json
and a PNG chart.

    musetalk-fast-bench [--ops gated_attention sinkhorn] [--out build/bench-results]

The default folder is untracked; `--out bench/results` refreshes the committed results on purpose.
"""
import argparse
import importlib
import json
import platform
import re
import sys
from pathlib import Path

import torch

import musetalk_fast
from musetalk_fast.files import atomic_write_text

from .peaks import measure_peaks
from .timing import measure

OPS = ["gated_attention", "sinkhorn", "mhc", "engram", "lightning_indexer", "topk", "sparse_attention"]
MODEL = "model"  # bench/model.py: the MuseTalk U-Net's training step and inference FPS (issue 13)


DEFAULT_OUT = "build/bench-results"


def device_name(device):
    if device == "cuda":
        from musetalk_fast.kernels.tuning import gpu_name

        return gpu_name()
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"cpu-{platform.machine()}")


def roofline_fraction(case, median_ms, peaks):
    seconds = median_ms * 1e-3
    if case.flops:
        peak = peaks.get(f"{case.roofline}_flops")
        return case.flops / seconds / peak if peak else None
    if case.bytes:
        return case.bytes / seconds / peaks.get(f"{case.roofline}_bytes", peaks["copy_bytes"])
    return None


def run_case(case, device, peaks):
    times = {}
    for name, fn in {**case.ours, **case.baselines}.items():
        try:
            times[name] = measure(fn, device)
        except Exception as error:  # a baseline this torch/GPU cannot run is reported, not fatal
            times[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    gated_baselines = [t["median_ms"] for n, t in times.items()
                       if n in case.baselines and "(info)" not in n and "median_ms" in t]
    best_baseline = min(gated_baselines) if gated_baselines else None
    rows = []
    for name, t in times.items():
        row = {"op": case.op, "shape": case.shape, "impl": name, "ours": name in case.ours, **t}
        if "median_ms" in t:
            if case.flops:
                row["tflops"] = case.flops / (t["median_ms"] * 1e-3) / 1e12
            if case.bytes:
                row["gb_per_s"] = case.bytes / (t["median_ms"] * 1e-3) / 1e9
            if case.items:
                row["items_per_s"] = case.items / (t["median_ms"] * 1e-3)
            fraction = roofline_fraction(case, t["median_ms"], peaks)
            row["roofline_pct"] = None if fraction is None else 100 * fraction
            row["speedup_vs_best_baseline"] = None if best_baseline is None else best_baseline / t["median_ms"]
        rows.append(row)
    return rows


def print_table(rows, out=sys.stdout):
    header = f"{'op':<26}{'shape':<38}{'impl':<28}{'ms':>10}{'speedup':>9}{'roofline%':>10}"
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in rows:
        if "error" in r:
            print(f"{r['op']:<26}{r['shape']:<38}{r['impl']:<28}  {r['error'][:60]}", file=out)
            continue
        speedup = "" if r.get("speedup_vs_best_baseline") is None else f"{r['speedup_vs_best_baseline']:.2f}x"
        roof = "" if r.get("roofline_pct") is None else f"{r['roofline_pct']:.1f}"
        rate = f"{r['items_per_s']:>9.1f}/s" if r.get("items_per_s") else ""
        print(f"{r['op']:<26}{r['shape']:<38}{r['impl']:<28}{r['median_ms']:>10.4f}{speedup:>9}{roof:>10}{rate}",
              file=out)


def write_chart(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = []
    for r in rows:
        key = f"{r['op']}\n{r['shape']}"
        if key not in groups:
            groups.append(key)
    impls = sorted({r["impl"] for r in rows if "median_ms" in r}, key=lambda n: (not n.startswith("ours"), n))
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(groups)), 5))
    width = 0.8 / max(len(impls), 1)
    for i, impl in enumerate(impls):
        values = []
        for key in groups:
            match = [r for r in rows if f"{r['op']}\n{r['shape']}" == key and r["impl"] == impl and "median_ms" in r]
            values.append(match[0]["speedup_vs_best_baseline"] or 0 if match else 0)
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=impl)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels(groups, fontsize=6)
    ax.set_ylabel("speed vs best baseline (higher is faster)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="*", default=OPS + [MODEL], choices=OPS + [MODEL])
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for <device>.json and <device>.png")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        print("No GPU: timing the CPU kernels at small shapes (the H100 numbers need a GPU).")
    torch.manual_seed(0)
    peaks = measure_peaks(device)
    print("measured peaks:", {k: (f"{v:.3e}" if isinstance(v, float) else v) for k, v in peaks.items()})
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = device_name(device)
    result = {
        "device": stem, "torch": torch.__version__, "musetalk_fast": musetalk_fast.__version__,
        "command": "musetalk-fast-bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "peaks": peaks, "complete": False, "ops": list(args.ops), "ops_done": [], "rows": [],
    }
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass
    for name in args.ops:
        module = importlib.import_module(f"musetalk_fast.bench.{name}" if name == MODEL else
                                         f"musetalk_fast.bench.ops.{name}")
        for case in module.cases(device):
            result["rows"].extend(run_case(case, device, peaks))
            print(f"done: {case.op} | {case.shape}", flush=True)
            atomic_write_text(out_dir / f"{stem}.json", json.dumps(result, indent=1))  # a capped run keeps its rows
        result["ops_done"].append(name)  # every case of it ran: what a capped run did not reach is the rest
    rows = result["rows"]
    print_table(rows)
    result["complete"] = True
    atomic_write_text(out_dir / f"{stem}.json", json.dumps(result, indent=1))
    print(f"wrote {out_dir / (stem + '.json')}")
    try:
        write_chart(rows, out_dir / f"{stem}.png", f"musetalk_fast on {stem}")
        print(f"wrote {out_dir / (stem + '.png')}")
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib, or the [bench] extra)")
    return result


if __name__ == "__main__":
    main()
