"""`make gpu-check`'s test step: the suite as contiguous slices run by several pytest processes at once
(on a GPU machine Triton's compilation is the slow part, and it runs on the CPU cores), each logging
its results as they happen (bench/test_log.py).

- A crash (a signal, a CUDA error that ends the process, an exit in the middle) ends only its slice's
  process: the test it hit is named, and the slice starts again without the tests it reported and the
  one that crashed (at most RESTARTS times).
- At the time cap the running slices are killed and the ones not started are named; every finished
  result is kept. Nothing a slice started outlives it (each runs in its own process group).
- A module that fails to collect is an error (its line names it); the other modules still run.
- Every slice must see the same ordered suite (a hash of its ids); a mismatch is reported.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

RESTARTS = 3  # per slice
PYTEST_DONE = (0, 1, 5)  # all passed, some failed, nothing collected: pytest ran to its end
MAX_DETAIL_LINES = 30
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


def read_events(path):
    events = []
    if path.exists():
        for text in path.read_text().splitlines():
            try:
                events.append(json.loads(text))
            except json.JSONDecodeError:  # the last line of a killed process may be cut
                pass
    return events


def sessions(events):
    """Split a slice's log into its processes' sessions (each begins with "collected"; a process that
    died before collecting leaves none): per session its counts, the test in flight when it ended (a
    "start" with no teardown report) and whether it finished."""
    found = []
    for event in events:
        if event["event"] == "collected":
            found.append({"total": event["total"], "count": event["count"], "ids": event["ids"],
                          "running": None, "finished": False, "reported": 0})
        elif not found:
            continue
        elif event["event"] == "start":
            found[-1]["running"] = event["nodeid"]
        elif event["event"] == "report" and event["when"] == "teardown":
            found[-1]["running"] = None
            found[-1]["reported"] += 1
        elif event["event"] == "finished":
            found[-1]["finished"] = True
    return found


def test_result(nodeid, events):
    """pytest's outcome of one test from its phases: a failed call is failed, a failed setup or teardown
    an error (after a failed call: failed, the teardown's text added), a skip skipped, an xfail xfailed,
    an xpass (not strict) xpassed."""
    failed = [e for e in events if e["outcome"] == "failed" and not e["xfail"]]
    if failed:
        outcome = "failed" if any(e["when"] == "call" for e in failed) else "error"
    elif any(e["xfail"] for e in events):
        outcome = "xpassed" if all(e["outcome"] == "passed" for e in events) else "xfailed"
    elif any(e["outcome"] == "skipped" for e in events):
        outcome = "skipped"
    else:
        outcome = "passed"
    shown = failed or [e for e in events if e["message"]]
    return {"nodeid": nodeid, "outcome": outcome, "duration": round(sum(e["duration"] for e in events), 3),
            "message": "\n".join(e["message"] for e in shown)}


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


def kill_group(process):
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is gone already
        pass


def exit_name(code):
    if code >= 0:
        return f"pytest exit {code}"
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


class SliceRunner:
    def __init__(self, root, parts, slices, workers, timeout):
        self.root, self.parts, self.slices, self.workers, self.timeout = root, parts, slices, workers, timeout
        self.env = {**os.environ, "PYTHONHASHSEED": "0"}
        self.env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
        self.pending, self.running, self.restarts = list(range(slices)), {}, {}
        self.crashes, self.stopped = [], []  # detail lines

    def log(self, index):
        return self.parts / f"{index}.jsonl"

    def launch(self, index):
        command = [sys.executable, "-m", "pytest", self.root, "-q", "-p", "no:cacheprovider",
                   "--continue-on-collection-errors", "-p", "musetalk_fast.bench.test_log",
                   f"--shard={index}/{self.slices}", f"--event-log={self.log(index)}"]
        skip = self.parts / f"{index}.skip"
        if skip.exists():
            command.append(f"--skip-ids={skip}")
        with open(self.parts / f"{index}.out", "a") as output:  # the child keeps its own copy of the handle
            self.running[index] = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=self.env,
                                                   start_new_session=True)

    def ended(self, index, code, deadline):
        """A slice's process ended: a crash is named, and the slice queued again without the tests it ran."""
        events = read_events(self.log(index))
        last = (sessions(events) or [None])[-1]
        if (code in PYTEST_DONE and last is not None and last["finished"] and last["running"] is None
                and last["reported"] >= last["count"]):
            return  # ran to its end (pytest.exit or os._exit in a test end it early: a crash here)
        in_test = last["running"] if last else None
        self.crashes.append(f"CRASHED slice {index}/{self.slices} ({exit_name(code)}) in {in_test or 'no test'}: "
                            f"{last_lines(self.parts / f'{index}.out')}")
        attempts = self.restarts.get(index, 0)
        if last is None or attempts >= RESTARTS or time.time() > deadline:
            return  # died before collecting (it would again), or out of restarts or time
        self.restarts[index] = attempts + 1
        done = {e["nodeid"] for e in events if e["event"] == "report" and e["when"] == "teardown"}
        crashed = {s["running"] for s in sessions(events) if s["running"]}
        (self.parts / f"{index}.skip").write_text("\n".join(sorted(done | crashed)) + "\n")
        self.pending.insert(0, index)

    def run(self):
        deadline = time.time() + self.timeout
        try:
            while self.pending or self.running:
                while self.pending and len(self.running) < self.workers:
                    self.launch(self.pending.pop(0))
                for index, process in list(self.running.items()):
                    if process.poll() is not None:
                        kill_group(process)  # whatever the tests started dies with them
                        del self.running[index]
                        self.ended(index, process.returncode, deadline)
                if time.time() > deadline:
                    break
                time.sleep(0.2)
        finally:
            for index, process in self.running.items():
                finished = process.poll() is not None
                kill_group(process)
                process.wait()
                if finished:  # ended between the last poll and the cap
                    self.ended(index, process.returncode, deadline=0)
                else:
                    last = (sessions(read_events(self.log(index))) or [None])[-1]
                    self.stopped.append(f"STOPPED slice {index}/{self.slices} at the time cap ({self.timeout} s) "
                                        f"in {(last or {}).get('running') or 'no test'}")
            self.running.clear()
            self.stopped += [f"NOT {'RESTARTED' if index in self.restarts else 'STARTED'} slice {index}/"
                             f"{self.slices} (time cap {self.timeout} s)" for index in self.pending]


def merge(parts, slices):
    """Every slice's events: per test its result, the collection errors and skips, the suite's size and
    whether all slices saw the same suite."""
    phases, collect, totals, hashes = {}, {}, set(), set()
    for index in range(slices):
        for event in read_events(parts / f"{index}.jsonl"):
            if event["event"] == "collected":
                totals.add(event["total"])
                hashes.add(event["ids"])
            elif event["event"] == "collect_report":
                collect[event["nodeid"]] = {"nodeid": event["nodeid"], "duration": 0.0, "message": event["message"],
                                            "outcome": "error" if event["outcome"] == "failed" else "skipped"}
            elif event["event"] == "report":
                phases.setdefault(event["nodeid"], []).append(event)
    tests = {}
    for nodeid, events in phases.items():
        if any(e["when"] == "teardown" for e in events) or any(e["outcome"] == "failed" for e in events):
            tests[nodeid] = test_result(nodeid, events)  # else: it crashed in its call (named as a crash)
    return tests, list(collect.values()), totals, hashes


def run_tests(log, timeout, workers=1, slices=None, root="tests"):
    """Run the suite in `slices` slices, `workers` processes at a time, within `timeout` seconds; write one
    JSON line per test (and per module that failed to collect or was skipped) to `log`.
    Returns (summary line, detail lines, ok)."""
    if workers < 1:
        raise ValueError(f"workers: need at least 1, got {workers}")
    start = time.time()
    slices = slices or (1 if workers == 1 else 4 * workers)
    parts = log.parent / f".{log.name}.parts"
    for old in parts.glob("*") if parts.exists() else []:
        old.unlink()
    parts.mkdir(parents=True, exist_ok=True)
    runner = SliceRunner(root, parts, slices, workers, timeout)
    runner.run()
    tests, collect, totals, hashes = merge(parts, slices)
    log.write_text("".join(json.dumps(t) + "\n" for t in [*collect, *tests.values()]))
    counts = {k: sum(t["outcome"] == k for t in [*collect, *tests.values()]) for k in OUTCOMES}
    total = max(totals, default=0)
    not_run = total - len(tests)
    problems = []
    if len(hashes) > 1 or len(totals) > 1:
        problems.append(f"INCONSISTENT: the slices collected different suites (sizes {sorted(totals)})")
    if total == 0:
        problems.append("NO TESTS collected")
    failures = [f"{t['outcome'].upper()} {t['nodeid']} | {error_line(t['message'])}"
                for t in [*collect, *tests.values()] if t["outcome"] in ("failed", "error")]
    if len(failures) > MAX_DETAIL_LINES:
        failures = failures[:MAX_DETAIL_LINES] + [f"... {len(failures) - MAX_DETAIL_LINES} more in {log.name}"]
    crashed = f"yes ({len(runner.crashes)})" if runner.crashes else "no"
    line = (f"tests: {counts['passed'] + counts['xpassed']} passed, {counts['failed']} failed, "
            f"{counts['error']} errors, {counts['skipped'] + counts['xfailed']} skipped, {not_run} not run, "
            f"crashed: {crashed} | {time.time() - start:.0f} s | {workers} processes")
    ok = not (runner.crashes or runner.stopped or problems or not_run or counts["failed"] or counts["error"])
    for old in parts.glob("*"):
        old.unlink()
    parts.rmdir()
    return line, problems + runner.crashes + runner.stopped + failures, ok


if __name__ == "__main__":  # python -m musetalk_fast.bench.test_slices [workers]: the suite here, as gpu-check runs it
    summary, details, passed = run_tests(Path("build/tests.jsonl"), 3600, int(sys.argv[1]) if sys.argv[1:] else 2)
    print("\n".join([summary, *details]))
    sys.exit(0 if passed else 1)
