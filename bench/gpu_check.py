"""The one verification command on a GPU machine (`make gpu-check` builds first, then runs this from
the repository's root): the whole test suite on the GPU, then every benchmark, then a short summary,
printed last and written beside the results.

    python -m musetalk_fast.bench.gpu_check [--results bench/results] [--workers N]

The tests run as several pytest processes at once (slices of the suite; Triton compiles on the CPU
cores), each logging its results as they happen, so a crash or the time cap loses only the test it hits.
The benchmark runs alone afterwards (timings on a quiet GPU) and keeps its rows if it is capped.
Writes <results>/<gpu>.json and .png (the benchmark), <gpu>-tests.jsonl (a line per test: outcome,
seconds, failure text) and <gpu>-gpu-check.txt (the summary). The summary's format is stable:

    gpu-check <gpu> | torch <v> | triton <v> | commit <sha>
    tests: <n> passed, <n> failed, <n> errors, <n> skipped, <n> not run, crashed: <no|yes (...)> | <s> s | <n> processes
    CRASHED slice <i>/<n> (<signal, exit or timeout>) in <test id>: <its last output lines>     (per crash)
    NOT STARTED slice <i>/<n> (time cap <s> s)                        (per slice the cap left out)
    FAILED <test id> | <the exception line>                                  (per failure, at most 30)
    bench: [FAILED (<why>) after ]<n> rows | <s> s | <path>
    <op> | <shape> | <impl> <ms> ms | best baseline <name> <ms> ms | <ratio>x | roofline <pct>%
    ...
    total: <s> s
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def run_tests(log, timeout, workers=1, slices=None, root="tests"):
    """The suite as `slices` pytest child processes (contiguous slices of the collected tests, `workers`
    at a time: on a GPU machine Triton's compilation is the slow part, and it runs on the CPU cores), each
    logging its tests' events as they happen (bench/test_log.py). A crash (a signal, a CUDA error that
    ends a process) or the time cap ends only the processes it hits: every finished result is kept, the
    test that was running is named, and the other slices go on. Writes one JSON line per test to `log`.
    Returns (summary line, detail lines: failures and crashes, ok)."""
    start = time.time()
    slices = slices or (1 if workers == 1 else 4 * workers)
    parts = log.parent / f".{log.name}.parts"
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers))}
    pending, running, codes = list(range(slices)), {}, {}
    while pending or running:
        while pending and len(running) < workers:
            index = pending.pop(0)
            command = [sys.executable, "-m", "pytest", root, "-q", "-p", "no:cacheprovider",
                       "-p", "musetalk_fast.bench.test_log", f"--shard={index}/{slices}",
                       f"--event-log={parts / f'{index}.jsonl'}"]
            with open(parts / f"{index}.out", "w") as output:  # the child keeps its own copy of the handle
                running[index] = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env,
                                                  start_new_session=True)  # its own group: killed with its children
        for index, process in list(running.items()):
            if process.poll() is not None:
                codes[index] = process.returncode
                del running[index]
        if time.time() - start > timeout:
            for index, process in running.items():
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                codes[index] = "timeout"
            running.clear()
            break
        time.sleep(0.2)
    tests, collected, in_flight = merge_events(parts, slices)
    log.write_text("".join(json.dumps(t) + "\n" for t in tests.values()))
    counts = {k: sum(t["outcome"] == k for t in tests.values()) for k in OUTCOMES}
    crashes = []
    for index, code in sorted(codes.items()):
        if code == "timeout" or code < 0 or code not in PYTEST_DONE:
            why = (f"no result in {timeout} s" if code == "timeout" else
                   signal.Signals(-code).name if code < 0 else f"pytest exit {code}")
            crashes.append(f"CRASHED slice {index}/{slices} ({why}) in {in_flight.get(index) or 'no test'}"
                           + (f": {last_lines(parts / f'{index}.out')}" if code != "timeout" else ""))
    for index in pending:
        crashes.append(f"NOT STARTED slice {index}/{slices} (time cap {timeout} s)")
    not_run = sum(collected.values()) - len(tests)  # the tests in flight included
    crashed = "no" if not crashes else f"yes ({len(crashes)} of {slices} slices)"
    line = (f"tests: {counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
            f"{counts['skipped']} skipped, {not_run} not run, crashed: {crashed} | {time.time() - start:.0f} s"
            f" | {workers} processes")
    failures = [f"{t['outcome'].upper()} {t['nodeid']} | {error_line(t['message'])}"
                for t in tests.values() if t["outcome"] in ("failed", "error")]
    if len(failures) > MAX_FAILURE_LINES:
        failures = failures[:MAX_FAILURE_LINES] + [f"... {len(failures) - MAX_FAILURE_LINES} more in {log.name}"]
    ok = not crashes and not_run == 0 and counts["failed"] == counts["error"] == 0
    shutil.rmtree(parts, ignore_errors=True)
    return line, crashes + failures, ok


OUTCOMES = ("passed", "failed", "error", "skipped")
PYTEST_DONE = (0, 1, 5)  # all passed, some failed, none collected: pytest ran to its end
MAX_FAILURE_LINES = 30


def merge_events(parts, slices):
    """Per test: its outcome (a failed call is failed, a failed setup or teardown an error, a skip or an
    xfail skipped), duration and failure text; per slice: how many tests it collected and the test it
    was running when it stopped (a "start" with no teardown report)."""
    phases, collected, in_flight = {}, {}, {}
    for index in range(slices):
        path = parts / f"{index}.jsonl"
        if not path.exists():
            continue
        running = None
        for text in path.read_text().splitlines():
            try:
                event = json.loads(text)
            except json.JSONDecodeError:  # the last line of a killed process may be cut
                continue
            if event["event"] == "collected":
                collected[index] = event["count"]
            elif event["event"] == "start":
                running = event["nodeid"]
            elif event["event"] == "report":
                phases.setdefault(event["nodeid"], []).append(event)
                if event["when"] == "teardown":
                    running = None
        if running is not None:
            in_flight[index] = running
            phases.pop(running, None)  # its setup may have been reported: it did not finish
    return {nodeid: test_result(nodeid, events) for nodeid, events in phases.items()}, collected, in_flight


def test_result(nodeid, events):
    failed = [e for e in events if e["outcome"] == "failed" and not e["xfail"]]
    if failed:
        outcome = "failed" if any(e["when"] == "call" for e in failed) else "error"
    elif any(e["outcome"] == "skipped" or e["xfail"] for e in events):
        outcome = "skipped"
    else:
        outcome = "passed"
    return {"nodeid": nodeid, "outcome": outcome, "duration": round(sum(e["duration"] for e in events), 3),
            "message": "\n".join(e["message"] for e in failed)}


def error_line(message):
    """The first `E   ...` line of a pytest failure text (the exception), else its last line."""
    lines = [line for line in message.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("E "):
            return line[1:].strip()[:200]
    return lines[-1].strip()[:200] if lines else ""


def last_lines(path, count=3):
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()] if path.exists() else []
    return " / ".join(line.strip()[:160] for line in lines[-count:])


def run_bench(results, timeout):
    """The benchmark in a child process (its own process group, killed whole at the cap). It rewrites its
    JSON after every case, so a cap or a crash keeps the rows done so far."""
    start = time.time()
    command = [sys.executable, "-m", "musetalk_fast.bench.run", "--out", str(results)]
    process = subprocess.Popen(command, start_new_session=True)
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
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


def source_commit():
    """The commit under test: $MUSETALK_FAST_COMMIT (a copy of the tree without .git, e.g. on a rented GPU
    machine: set it where the copy was made), else git's HEAD (with -dirty if the tree has changes), else
    "unknown"."""
    if os.environ.get("MUSETALK_FAST_COMMIT"):
        return os.environ["MUSETALK_FAST_COMMIT"]
    try:
        head = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True)
    except OSError:  # no git on the machine
        return "unknown"
    return head.stdout.strip() if head.returncode == 0 else "unknown"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="bench/results", help="folder for the results and the summary")
    # Caps that keep the whole check, with the build, inside a 10-minute command.
    parser.add_argument("--test-timeout", type=int, default=270)
    parser.add_argument("--bench-timeout", type=int, default=210)
    parser.add_argument("--workers", type=int, default=None,
                        help="test processes at a time (default: min(8, CPU cores) with a GPU, else 1)")
    args = parser.parse_args(argv)
    start = time.time()

    import torch
    import triton

    from musetalk_fast.bench.run import device_name

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        print("gpu-check: no GPU here; running the same steps on the CPU", flush=True)
    workers = args.workers or (min(8, os.cpu_count() or 1) if device == "cuda" else 1)
    name = device_name(device)
    results = Path(args.results).resolve()
    results.mkdir(parents=True, exist_ok=True)
    commit = source_commit()

    tests, test_details, tests_ok = run_tests(results / f"{name}-tests.jsonl", args.test_timeout, workers)
    bench_json = results / f"{name}.json"
    bench_json.unlink(missing_ok=True)  # never report an earlier run's rows
    code, bench_seconds = run_bench(results, args.bench_timeout)
    lines = [f"gpu-check {name} | torch {torch.__version__} | triton {triton.__version__} | commit {commit}",
             tests, *test_details]
    rows = bench_lines(bench_json) if bench_json.exists() else []
    status = "" if code == 0 else f"FAILED ({code}) after "
    lines += [f"bench: {status}{len(rows)} rows | {bench_seconds:.0f} s | {bench_json}", *rows]
    lines.append(f"total: {time.time() - start:.0f} s")
    summary = "\n".join(lines) + "\n"
    (results / f"{name}-gpu-check.txt").write_text(summary)
    print("\n" + summary, end="")
    sys.exit(0 if tests_ok and code == 0 else 1)


if __name__ == "__main__":
    main()
