"""A pytest plugin for `make gpu-check`'s test step (loaded with `-p musetalk_fast.bench.test_log`).

    --shard I/N      keep the I-th (0-based) of N contiguous slices of the collected tests, so that N
                     processes split one suite; a slice holds neighbouring tests, whose Triton kernels
                     share specialisations, so each process compiles mostly its own
    --event-log P    append one JSON line to P per event, written as it happens: "collected" (how many
                     tests this process runs), "start" (a test begins), "report" (a phase ends: setup,
                     call or teardown, with its outcome and the failure's text). A crash or a timeout
                     leaves every finished result and names the test that was running.

Without either option the plugin does nothing.
"""
import json

import pytest

MESSAGE_CHARS = 4000  # a failure's text, kept from its end (the assertion and the line that raised)


def pytest_addoption(parser):
    group = parser.getgroup("musetalk_fast", "make gpu-check's test step")
    group.addoption("--shard", default=None, metavar="I/N", help="run the I-th (0-based) of N contiguous slices")
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

    def write(self, **event):
        self.file.write(json.dumps(event) + "\n")
        self.file.flush()

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session):
        self.write(event="collected", count=len(session.items))

    def pytest_runtest_logstart(self, nodeid, location):
        self.write(event="start", nodeid=nodeid)

    def pytest_runtest_logreport(self, report):
        message = ""
        if report.outcome != "passed":
            message = report.longreprtext[-MESSAGE_CHARS:]
        self.write(event="report", nodeid=report.nodeid, when=report.when, outcome=report.outcome,
                   xfail=hasattr(report, "wasxfail"), duration=round(report.duration, 3), message=message)

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
    if shard is None:
        return
    start, stop = shard_bounds(len(items), *shard)
    deselected = items[:start] + items[stop:]
    items[:] = items[start:stop]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
