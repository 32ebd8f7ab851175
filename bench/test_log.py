"""A pytest plugin for `make gpu-check`'s test step (loaded with `-p musetalk_fast.bench.test_log`).

    --shard I/N      keep the I-th (0-based) of N contiguous slices of the collected tests, so that N
                     processes split one suite; a slice holds neighbouring tests, whose Triton kernels
                     share specialisations, so each process compiles mostly its own
    --first P1,P2    before slicing, move the tests whose ids start with P1, then P2, ... to the front (in
                     their order): the tests that matter most run first when time is short
    --skip-ids P     then deselect the test ids listed in file P (one a line): a slice started again
                     after a crash skips what it already reported and the test that crashed
    --event-log P    append one JSON line to P per event, flushed as it happens:
                       collecting      a module's collection begins (a crash there names it)
                       collected       total (the whole suite's count, before slicing), items (this
                                       process's test ids, in order), ids (a hash of the whole suite's
                                       ordered ids: every slice must have seen the same suite), and for
                                       slice 0 suite (the whole suite's ids)
                       collect_report  a module that failed to collect (an error) or was skipped
                       start           a test begins
                       report          a phase ends (setup, call, teardown): outcome, xfail, seconds, text
                       finished        the session ended normally (exit status)
                       cuda_context_lost  a test failed with a CUDA error that poisons the process's CUDA
                                       context (an illegal address, a device-side assert...): every later
                                       test would fail with it, so the process ends after that test's
                                       teardown (exit CONTEXT_LOST_EXIT) and its slice starts again
                     A crash or a kill leaves every finished result, and the test that was running is
                     the last "start" with no teardown report.

Without these options the plugin does nothing.
"""
import hashlib
import json
import os
import re

import pytest

MESSAGE_CHARS = 4000  # a failure's text, kept from its end (the assertion and the line that raised)
# CUDA errors after which the context is unusable (cudaErrorIllegalAddress, LaunchFailure, Assert,
# MisalignedAddress, IllegalInstruction...): torch and Triton word them like this
STICKY_CUDA_ERROR = re.compile(r"illegal memory access|illegal address|unspecified launch failure|device-side assert"
                               r"|misaligned address|illegal instruction|hardware stack error")
CONTEXT_LOST_EXIT = 86


def pytest_addoption(parser):
    group = parser.getgroup("musetalk_fast", "make gpu-check's test step")
    group.addoption("--shard", default=None, metavar="I/N", help="run the I-th (0-based) of N contiguous slices")
    group.addoption("--first", default=None, metavar="P1,P2", help="run tests whose ids start with these first")
    group.addoption("--skip-ids", default=None, metavar="PATH", help="deselect the test ids listed in this file")
    group.addoption("--event-log", default=None, metavar="PATH", help="append a JSON line per test event here")


def parse_shard(text):
    """'I/N' -> (I, N) with 0 <= I < N."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise pytest.UsageError(f"--shard: expected I/N with integers, got {text!r}") from None
    if not 0 <= index < count:
        raise pytest.UsageError(f"--shard: need 0 <= I < N, got {text!r}")
    return index, count


def shard_bounds(total, index, count):
    """The [start, stop) slice of `total` items that shard `index` of `count` runs (sizes differ by at most 1)."""
    return total * index // count, total * (index + 1) // count


class EventLog:
    def __init__(self, path):
        self.file = open(path, "a", buffering=1)  # line-buffered: each event reaches the file at once
        self.context_lost = None

    def write(self, **event):
        self.file.write(json.dumps(event) + "\n")
        self.file.flush()

    def pytest_collectstart(self, collector):
        if isinstance(collector, pytest.Module):
            self.write(event="collecting", path=str(collector.path), nodeid=collector.nodeid)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session):
        suite = getattr(session.config, "_musetalk_suite", [item.nodeid for item in session.items])
        shard = getattr(session.config, "_musetalk_shard", (0, 1))
        self.write(event="collected", total=len(suite), count=len(session.items),
                   items=[item.nodeid for item in session.items],
                   ids=hashlib.sha1("\n".join(suite).encode()).hexdigest()[:16],
                   **({"suite": suite} if shard[0] == 0 else {}))

    def pytest_collectreport(self, report):
        if report.outcome != "passed":
            self.write(event="collect_report", nodeid=report.nodeid, outcome=report.outcome,
                       message=report.longreprtext[-MESSAGE_CHARS:])

    def pytest_runtest_logstart(self, nodeid, location):
        self.write(event="start", nodeid=nodeid)

    def pytest_runtest_logreport(self, report):
        message = "" if report.passed and not hasattr(report, "wasxfail") else report.longreprtext[-MESSAGE_CHARS:]
        self.write(event="report", nodeid=report.nodeid, when=report.when, outcome=report.outcome,
                   xfail=hasattr(report, "wasxfail"), duration=round(report.duration, 3), message=message)
        if report.failed and self.context_lost is None and "CUDA" in message:
            lines = [line for line in message.splitlines() if STICKY_CUDA_ERROR.search(line)]
            raised = [line[1:] for line in lines if line.startswith("E ")]  # the exception, not the source line
            if lines:
                self.context_lost = (report.nodeid, (raised or lines)[0].strip()[:300])

    def pytest_runtest_logfinish(self, nodeid, location):
        if self.context_lost is not None:  # after the test's teardown: its results are all logged
            self.write(event="cuda_context_lost", nodeid=self.context_lost[0], message=self.context_lost[1])
            self.file.close()
            os._exit(CONTEXT_LOST_EXIT)

    def pytest_sessionfinish(self, session, exitstatus):
        self.write(event="finished", exitstatus=int(exitstatus))

    def pytest_unconfigure(self, config):
        self.file.close()


def pytest_configure(config):
    shard = config.getoption("shard")
    if shard:
        config._musetalk_shard = parse_shard(shard)
    path = config.getoption("event_log")
    if path:
        config.pluginmanager.register(EventLog(path), "musetalk_fast_event_log")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    shard = getattr(config, "_musetalk_shard", None)
    skip_file, first = config.getoption("skip_ids"), config.getoption("first")
    if shard is None and not skip_file and not first:
        return
    if first:
        prefixes = first.split(",")
        rank = {id(item): next((i for i, p in enumerate(prefixes) if item.nodeid.startswith(p)), len(prefixes))
                for item in items}
        items.sort(key=lambda item: rank[id(item)])  # stable: each module's tests keep their order
    config._musetalk_suite = [item.nodeid for item in items]
    keep = items
    if shard is not None:
        start, stop = shard_bounds(len(items), *shard)
        keep = items[start:stop]
    if skip_file:
        with open(skip_file) as handle:
            skip = set(handle.read().splitlines())
        keep = [item for item in keep if item.nodeid not in skip]
    kept = set(map(id, keep))
    deselected = [item for item in items if id(item) not in kept]
    items[:] = keep
    if deselected:
        config.hook.pytest_deselected(items=deselected)
