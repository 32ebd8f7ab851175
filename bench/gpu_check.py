"""The one verification command on a GPU machine (`make gpu-check` builds first, then runs this from
the repository's root): the whole test suite on the GPU, then every benchmark, then a short summary,
printed last and written beside the results.

    python -m musetalk_fast.bench.gpu_check [--results bench/results] [--workers N]

The tests run as slices of the suite in several pytest processes at once (bench/test_slices.py: Triton
compiles on the CPU cores), each logging its results as they happen: a crash ends only its slice's
process, which starts again without what crashed (named); the time cap and a SIGTERM keep every finished
result. The benchmark runs alone afterwards (timings on a quiet GPU) and keeps its rows if it is capped.
Writes <results>/<gpu>.json and .png (the benchmark), <gpu>-tests.jsonl (a line per test of the suite:
outcome, seconds, failure text) and <gpu>-gpu-check.txt (the summary, written once the tests end and
again at the end; README.md "On a GPU machine" has its format).
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .processes import cores, run_capped
from .test_slices import run_tests


def run_bench(results, timeout):
    """The benchmark in a child process group, killed whole at the cap. It rewrites its JSON after every
    case, so a cap or a crash keeps the rows done so far."""
    begin = time.time()
    code, _ = run_capped([sys.executable, "-m", "musetalk_fast.bench.run", "--out", str(results)], timeout)
    return (f"timeout after {timeout} s" if code is None else code), time.time() - begin


def bench_lines(path):
    """One line per implementation of ours per case: its ratio to the case's best baseline."""
    rows = json.loads(path.read_text())["rows"]
    lines = []
    for row in rows:
        if not row["ours"] or "median_ms" not in row:
            if row["ours"]:
                lines.append(f"{row['op']} | {row['shape']} | {row['impl']} | ERROR {row.get('error', '')[:80]}")
            continue
        baselines = [r for r in rows if (r["op"], r["shape"]) == (row["op"], row["shape"]) and not r["ours"]
                     and "median_ms" in r and "(info)" not in r["impl"]]
        best = min(baselines, key=lambda r: r["median_ms"], default=None)
        best_text = f"best baseline {best['impl']} {best['median_ms']:.4f} ms" if best else "no baseline ran"
        ratio = f"{row['speedup_vs_best_baseline']:.2f}x" if row.get("speedup_vs_best_baseline") else "-"
        roof = f"roofline {row['roofline_pct']:.1f}%" if row.get("roofline_pct") is not None else "roofline -"
        rate = f" | {row['items_per_s']:.1f}/s" if row.get("items_per_s") else ""  # the model rows: FPS
        lines.append(f"{row['op']} | {row['shape']} | {row['impl']} {row['median_ms']:.4f} ms | {best_text} | "
                     f"{ratio} | {roof}{rate}")
    return lines


def ops_not_reached(bench_json, results):
    """For a benchmark stopped before its end: a line naming the ops it did not finish, with the command
    that runs just those (into a folder of its own, so that the rows here stay)."""
    if not bench_json.exists():
        return [f"bench: no rows written (run it alone: python -m musetalk_fast.bench.run --out {results}/more)"]
    data = json.loads(bench_json.read_text())
    left = [op for op in data.get("ops", []) if op not in data.get("ops_done", [])]
    if data.get("complete") or not left:
        return []
    return [f"bench: not reached: {' '.join(left)} (run them: python -m musetalk_fast.bench.run --ops "
            f"{' '.join(left)} --out {results}/more)"]


def source_commit():
    """The commit under test: $MUSETALK_FAST_COMMIT (a copy of the tree without .git, e.g. on a rented GPU
    machine: set it where the copy was made), else git's HEAD (with -dirty if the tree has changes), else
    "unknown"."""
    if os.environ.get("MUSETALK_FAST_COMMIT"):
        return os.environ["MUSETALK_FAST_COMMIT"]
    def git(*args):
        done = subprocess.run(["git", *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    try:
        top = git("rev-parse", "--show-toplevel")
        if top is None or Path(top).resolve() != Path.cwd().resolve():  # not a repository, or another one around it
            return "unknown"
        return git("describe", "--always", "--dirty", "--abbrev=7") or "unknown"
    except OSError:  # no git on the machine
        return "unknown"


FIRST = ("tests/ops/", "tests/nn/", "tests/model/")  # the kernels against the reference first, if time runs short


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="bench/results", help="folder for the results and the summary")
    # Caps that keep the whole check, with the pip install and the build (36 s on the H100 machine), inside
    # a 10-minute command.
    parser.add_argument("--test-timeout", type=int, default=250)
    parser.add_argument("--bench-timeout", type=int, default=200)
    parser.add_argument("--workers", type=int, default=None,
                        help="test processes at a time (default: min(8, CPU cores) with a GPU, else 1)")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error(f"argument --workers: need at least 1, got {args.workers}")
    start = time.time()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))  # a kill still ends the children

    import torch
    import triton

    from musetalk_fast.bench.run import device_name

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        print("gpu-check: no GPU here; running the same steps on the CPU", flush=True)
    workers = args.workers or (min(8, cores()) if device == "cuda" else 1)
    name = device_name(device)
    results = Path(args.results).resolve()
    results.mkdir(parents=True, exist_ok=True)
    summary = results / f"{name}-gpu-check.txt"
    for stale in (f"{name}.json", f"{name}.png", f"{name}-tests.jsonl", summary.name):
        (results / stale).unlink(missing_ok=True)  # never report an earlier run's results
    lines = [f"gpu-check {name} | torch {torch.__version__} | triton {triton.__version__} | commit {source_commit()}"]
    tests_ok = code = None
    try:
        tests, test_details, tests_ok = run_tests(results / f"{name}-tests.jsonl", args.test_timeout, workers,
                                                  first=FIRST)
        lines += [tests, *test_details]
        write_summary(summary, [*lines, "bench: not run yet"])
        bench_json = results / f"{name}.json"
        code, bench_seconds = run_bench(results, args.bench_timeout)
        rows = bench_lines(bench_json) if bench_json.exists() else []
        status = "" if code == 0 else f"FAILED ({code}) after "
        lines += [f"bench: {status}{len(rows)} rows | {bench_seconds:.0f} s | {bench_json}", *rows,
                  *ops_not_reached(bench_json, results)]
    finally:  # also when stopped (SIGTERM): what ran is summarised
        if code is None:
            lines.append("INTERRUPTED: " + ("during the benchmark" if tests_ok is not None else "during the tests"))
        lines.append(f"total: {time.time() - start:.0f} s")
        print("\n" + write_summary(summary, lines), end="")
    sys.exit(0 if tests_ok and code == 0 else 1)


def write_summary(path, lines):
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


if __name__ == "__main__":
    main()
