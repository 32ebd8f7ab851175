"""`make gpu-check`'s test step: the suite as contiguous slices run by several pytest processes at once
(on a GPU machine Triton's compilation is the slow part, and it runs on the CPU cores), each logging
its results as they happen (bench/test_log.py).

- A crash (a signal, a CUDA error that ends the process, an exit in the middle) ends only its slice's
  process; so does a test failing with a CUDA error that poisons the process's context (an illegal
  address, a device-side assert: every later test of the process would fail with it). The test it hit is named, and the slice starts again without the tests it reported and the
  one that crashed; after MODULE_CRASHES crashes in one module, without the rest of that module. A
  module whose import crashes is named and left out of every later process. A slice starts again only
  when something new is left out, at most RESTARTS times.
- At the time cap (or a SIGTERM) the running slices are killed and the ones not started are named;
  every finished result is kept. Nothing a slice started outlives it: each runs in its own process
  group, killed when it ends, and dies with this process.
- A module that fails to collect is an error (its line names it); the other modules still run.
- Every slice must see the same ordered suite (a hash of its ids); a mismatch is reported.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from .processes import cores, kill_group, start

RESTARTS = 8  # per slice
MODULE_CRASHES = 2  # crashes in one module's tests before its slice leaves the rest of the module out
PYTEST_DONE = (0, 1, 5)  # all passed, some failed, nothing collected: pytest ran to its end
MAX_DETAIL_LINES = 30
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed", "crashed", "not run")


def read_events(path):
    events = []
    if path.exists():
        for text in path.read_text().splitlines():
            try:
                events.append(json.loads(text))
            except json.JSONDecodeError:  # the last line of a killed process may be cut
                pass
    return events


def session(events):
    """One process's events: its collection, the test in flight when it ended (a "start" with no
    teardown report), how many tests it finished and whether pytest ended normally; None if it died
    before collecting."""
    found = None
    for event in events:
        if event["event"] == "collected":
            found = {**event, "running": None, "finished": False, "reported": []}
        elif found is None:
            continue
        elif event["event"] == "start":
            found["running"] = event["nodeid"]
        elif event["event"] == "report" and event["when"] == "teardown":
            found["running"] = None
            found["reported"].append(event["nodeid"])
        elif event["event"] == "finished":
            found["finished"] = True
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


def crash_text(output):
    """What a dying process printed that says why: Python's fatal error and the innermost frame of the
    crashing thread (faulthandler's dump, which pytest turns on), else its last lines."""
    fatal = re.search(r"Fatal Python error: .*$", output, re.MULTILINE)  # after pytest's progress dots
    if fatal:
        frame = re.search(r"most recent call first\):\s*\n\s*(File .*)$", output[fatal.end():], re.MULTILINE)
        return fatal.group(0)[:160] + (f" / {frame.group(1).strip()[:200]}" if frame else "")
    lines = [line.strip()[:160] for line in output.splitlines() if line.strip()]
    return " / ".join(lines[-3:])


def exit_name(code):
    if code >= 0:
        return f"exit {code}"
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


class Slice:
    def __init__(self, index):
        self.index = index
        self.items = None  # its test ids, from its first process
        self.skip = set()
        self.module_crashes = {}
        self.restarts = 0
        self.offsets = (0, 0)  # events and output bytes before its current process
        self.left_out = None  # what its current process was started without: (test ids, module paths)


class SliceRunner:
    def __init__(self, root, parts, slices, workers, timeout, first=()):
        self.root, self.parts, self.slices, self.workers, self.timeout = root, parts, slices, workers, timeout
        self.first = first
        self.env = {**os.environ, "PYTHONHASHSEED": "0"}
        self.env.setdefault("OMP_NUM_THREADS", str(max(1, cores() // workers)))
        self.state = {index: Slice(index) for index in range(slices)}
        self.pending, self.running = list(range(slices)), {}
        self.ignored = {}  # module path -> its node id: modules whose import crashed
        self.crashed = set()  # test ids
        self.crashes, self.stopped = [], []  # detail lines

    def paths(self, index):
        return self.parts / f"{index}.jsonl", self.parts / f"{index}.out"

    def since_launch(self, index):
        log, out = self.paths(index)
        events, start = read_events(log), self.state[index].offsets
        text = out.read_bytes()[start[1]:].decode(errors="replace") if out.exists() else ""
        return events[start[0]:], text

    def launch(self, index):
        state, (log, out) = self.state[index], self.paths(index)
        state.offsets = (len(read_events(log)), out.stat().st_size if out.exists() else 0)
        state.left_out = (frozenset(state.skip), frozenset(self.ignored))
        command = [sys.executable, "-m", "pytest", self.root, "-q", "-p", "no:cacheprovider",
                   "--continue-on-collection-errors", "-p", "musetalk_fast.bench.test_log",
                   f"--shard={index}/{self.slices}", f"--event-log={log}",
                   *([f"--first={','.join(self.first)}"] if self.first else []),
                   *(f"--ignore={path}" for path in sorted(self.ignored))]
        if state.skip:
            skip = self.parts / f"{index}.skip"
            skip.write_text("".join(f"{nodeid}\n" for nodeid in sorted(state.skip)))
            command.append(f"--skip-ids={skip}")
        with open(out, "a") as output:  # the child keeps its own copy of the handle
            self.running[index] = start(command, stdout=output, stderr=subprocess.STDOUT, env=self.env)

    def ended(self, index, code, deadline):
        """A slice's process ended: a crash is named, and the slice queued again without what crashed."""
        state = self.state[index]
        events, output = self.since_launch(index)
        run = session(events)
        if run is not None and state.items is None:
            state.items = run["items"]
        if run is not None:
            state.skip |= set(run["reported"])
        if (code in PYTEST_DONE and run is not None and run["finished"] and run["running"] is None
                and len(run["reported"]) >= run["count"]):
            return  # ran to its end
        lost = [e for e in events if e["event"] == "cuda_context_lost"]
        if run is None:
            modules = [e for e in events if e["event"] == "collecting"]
            if modules:  # its import (or its collection) killed the process: every later process leaves it out
                where = f"while collecting {modules[-1]['nodeid']}"
                self.ignored[modules[-1]["path"]] = modules[-1]["nodeid"]
            else:
                where = "before collecting"
        elif lost:
            where = f"after {lost[0]['nodeid']} (its CUDA context lost)"
        elif run["running"]:
            where = f"in {run['running']}"
            self.crashed.add(run["running"])
            state.skip.add(run["running"])
            module = run["running"].split("::")[0]
            state.module_crashes[module] = state.module_crashes.get(module, 0) + 1
            if state.module_crashes[module] >= MODULE_CRASHES:  # e.g. a module-scoped fixture that crashes
                state.skip |= {nodeid for nodeid in state.items if nodeid.split("::")[0] == module}
        elif len(run["reported"]) >= run["count"]:
            where = "at exit, after its tests"
        else:
            where = "between tests"
        why = lost[0]["message"] if lost else crash_text(output)
        line = f"CRASHED slice {index}/{self.slices} ({'ended' if lost else exit_name(code)}) {where}: {why}"
        if where == "at exit, after its tests":
            self.crashes.append(line)
            return
        if (frozenset(state.skip), frozenset(self.ignored)) == state.left_out:
            why = "nothing new to leave out"
        elif state.restarts >= RESTARTS:
            why = f"{RESTARTS} restarts used"
        elif time.time() > deadline:
            why = "time cap"
        else:
            state.restarts += 1
            self.pending.insert(0, index)
            why = None
        self.crashes.append(line if why is None else f"{line} (not restarted: {why})")

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
        finally:  # the time cap, or an exception (a SIGTERM turned into SystemExit) in the loop
            for index, process in self.running.items():
                finished = process.poll() is not None
                kill_group(process)
                process.wait()
                if finished:  # ended between the last poll and the cap
                    self.ended(index, process.returncode, deadline=0)
                    continue
                events, _ = self.since_launch(index)
                run = session(events)
                where = f"in {run['running']}" if run and run["running"] else (
                    "between tests" if run else "while collecting")
                self.stopped.append(f"STOPPED slice {index}/{self.slices} at the time cap ({self.timeout} s) {where}")
            self.running.clear()
            self.stopped += [f"NOT {'RESTARTED' if self.state[index].restarts else 'STARTED'} slice {index}/"
                             f"{self.slices} (time cap {self.timeout} s)" for index in self.pending]


def merge(parts, runner):
    """Every slice's events: a line per test of the suite (its result, or crashed, or not run), one per
    module that failed to collect, was skipped or crashed the process collecting it; the suite's size;
    whether all slices saw the same suite."""
    phases, collect, totals, hashes, suite, items = {}, {}, set(), set(), None, []
    for index in range(runner.slices):
        for event in read_events(parts / f"{index}.jsonl"):
            if event["event"] == "collected":
                totals.add(event["total"])
                hashes.add(event["ids"])
                suite = event.get("suite", suite)
            elif event["event"] == "collect_report":
                collect[event["nodeid"]] = {"nodeid": event["nodeid"], "duration": 0.0, "message": event["message"],
                                            "outcome": "error" if event["outcome"] == "failed" else "skipped"}
            elif event["event"] == "report":
                phases.setdefault(event["nodeid"], []).append(event)
        items += runner.state[index].items or []
    for nodeid in runner.ignored.values():
        collect[nodeid] = {"nodeid": nodeid, "outcome": "error", "duration": 0.0,
                           "message": "E   the process died collecting this module (left out of later processes)"}
    results = {nodeid: test_result(nodeid, events) for nodeid, events in phases.items()
               if any(e["when"] == "teardown" for e in events) or any(e["outcome"] == "failed" for e in events)}
    tests = {}
    for nodeid in suite if suite is not None else [*items, *results]:
        tests[nodeid] = results.get(nodeid) or {"nodeid": nodeid, "duration": 0.0, "message": "",
                                                "outcome": "crashed" if nodeid in runner.crashed else "not run"}
    return tests, list(collect.values()), totals, hashes


def run_tests(log, timeout, workers=1, slices=None, root="tests", first=()):
    """Run the suite in `slices` slices, `workers` processes at a time, within `timeout` seconds, the tests
    whose ids start with the prefixes in `first` first; write one JSON line per test of the suite (and per
    module that failed to collect or was skipped) to `log`, also when interrupted. Returns (summary line,
    detail lines, ok)."""
    if workers < 1:
        raise ValueError(f"workers: need at least 1, got {workers}")
    start = time.time()
    slices = slices or (1 if workers == 1 else 4 * workers)
    parts = log.parent / f".{log.name}.parts"
    for old in parts.glob("*") if parts.exists() else []:
        old.unlink()
    parts.mkdir(parents=True, exist_ok=True)
    runner = SliceRunner(root, parts, slices, workers, timeout, first)
    try:
        runner.run()
    finally:
        tests, collect, totals, hashes = merge(parts, runner)
        log.write_text("".join(json.dumps(t) + "\n" for t in [*collect, *tests.values()]))
    counts = {k: sum(t["outcome"] == k for t in [*collect, *tests.values()]) for k in OUTCOMES}
    problems = []
    if len(hashes) > 1 or len(totals) > 1:
        problems.append(f"INCONSISTENT: the slices collected different suites (sizes {sorted(totals)})")
    if not tests and not collect:
        problems.append("NO TESTS collected")
    failures = [f"{t['outcome'].upper()} {t['nodeid']} | {error_line(t['message'])}"
                for t in [*collect, *tests.values()] if t["outcome"] in ("failed", "error")]
    if len(failures) > MAX_DETAIL_LINES:
        failures = failures[:MAX_DETAIL_LINES] + [f"... {len(failures) - MAX_DETAIL_LINES} more in {log.name}"]
    not_run = counts["crashed"] + counts["not run"]
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
