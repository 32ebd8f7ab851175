"""The one verification command on a GPU machine (`make gpu-check` builds first, then runs this from
the repository's root):
the whole test suite on the GPU, then every benchmark, then a short summary, printed last and
written beside the results.

    python -m musetalk_fast.bench.gpu_check [--results bench/results]

Writes <results>/<gpu>.json and .png (the benchmark), <gpu>-junit.xml (the tests) and
<gpu>-gpu-check.txt (the summary). The summary's format is stable:

    gpu-check <gpu> | torch <v> | triton <v> | commit <sha>
    tests: <n> passed, <n> failed, <n> errors, <n> skipped, crashed: <no|yes (...)> | <s> s
    bench: <n> rows | <s> s | <path>
    <op> | <shape> | <impl> <ms> ms | best baseline <name> <ms> ms | <ratio>x | roofline <pct>%
    ...
    total: <s> s
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path


def run_tests(junit, timeout):
    """pytest in a child process, so a crash (a signal) is reported instead of ending the check."""
    start = time.time()
    command = [sys.executable, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    try:
        code = subprocess.run(command, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if junit.exists():
        suite = ElementTree.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in counts}
    if code == "timeout":
        crashed = f"yes (no result in {timeout} s)"
    elif isinstance(code, int) and code < 0:
        crashed = f"yes ({signal.Signals(-code).name})"
    elif not junit.exists():
        crashed = f"yes (pytest exit {code}, no report)"
    else:
        crashed = "no"
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return (f"tests: {passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
            f"{counts['skipped']} skipped, crashed: {crashed} | {time.time() - start:.0f} s")


def run_bench(results, timeout):
    start = time.time()
    command = [sys.executable, "-m", "musetalk_fast.bench.run", "--out", str(results)]
    try:
        code = subprocess.run(command, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        code = f"timeout after {timeout} s"
    return code, time.time() - start


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="bench/results", help="folder for the results and the summary")
    # Caps that keep the whole check (with the ~40 s build) under 8 minutes; the benchmark's goal is 3.
    parser.add_argument("--test-timeout", type=int, default=240)
    parser.add_argument("--bench-timeout", type=int, default=180)
    args = parser.parse_args(argv)
    start = time.time()

    import torch
    import triton

    from musetalk_fast.bench.run import device_name

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        print("gpu-check: no GPU here; running the same steps on the CPU", flush=True)
    name = device_name(device)
    results = Path(args.results).resolve()
    results.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()

    tests = run_tests(results / f"{name}-junit.xml", args.test_timeout)
    code, bench_seconds = run_bench(results, args.bench_timeout)
    bench_json = results / f"{name}.json"
    lines = [f"gpu-check {name} | torch {torch.__version__} | triton {triton.__version__} | commit {commit or 'unknown'}",
             tests]
    if code == 0 and bench_json.exists():
        rows = bench_lines(bench_json)
        lines += [f"bench: {len(rows)} rows | {bench_seconds:.0f} s | {bench_json}", *rows]
    else:
        lines.append(f"bench: FAILED ({code}) | {bench_seconds:.0f} s")
    lines.append(f"total: {time.time() - start:.0f} s")
    summary = "\n".join(lines) + "\n"
    (results / f"{name}-gpu-check.txt").write_text(summary)
    print("\n" + summary, end="")
    failed = "crashed: no" not in tests or " 0 failed, 0 errors" not in tests or code != 0
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
