"""make gpu-check's driver (bench/gpu_check.py) and its pytest plugin (bench/test_log.py): the suite split
into slices run side by side, every result kept through a crash or the time cap, the failures named;
the benchmark's rows kept when it is capped; every benchmark row of ours given its ratio to the best
baseline."""
import json
import re
from pathlib import Path

import pytest

from musetalk_fast.bench import gpu_check
from musetalk_fast.bench import run as bench_run
from musetalk_fast.bench.test_log import shard_bounds

CPU_RESULTS = Path(__file__).parents[1] / "bench" / "results" / "cpu-x86_64.json"

SUITE = """import os, signal, time
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("fixture broke")

def test_ok_1(): assert True
def test_bad(): assert 1 == 2, "one is not two"
@pytest.mark.skip(reason="x")
def test_skip(): pass
@pytest.mark.xfail(reason="known")
def test_xfail(): assert False
def test_setup_error(broken): pass
def test_ok_2(): assert True
"""


def write_suite(root, body):
    (root / "tests").mkdir()
    (root / "tests" / "test_example.py").write_text(body)


def read_log(path):
    return {t["nodeid"].split("::")[-1]: t for t in map(json.loads, path.read_text().splitlines())}


@pytest.mark.parametrize("workers, slices", [(1, None), (2, 3)])
def test_counts_and_names_every_outcome(tmp_path, monkeypatch, workers, slices):
    write_suite(tmp_path, SUITE)
    monkeypatch.chdir(tmp_path)
    line, details, ok = gpu_check.run_tests(tmp_path / "tests.jsonl", timeout=120, workers=workers, slices=slices)
    assert re.fullmatch(r"tests: 2 passed, 1 failed, 1 errors, 2 skipped, 0 not run, crashed: no \| \d+ s \| "
                        rf"{workers} processes", line), line
    assert not ok
    assert sorted(details) == ["ERROR tests/test_example.py::test_setup_error | RuntimeError: fixture broke",
                               "FAILED tests/test_example.py::test_bad | AssertionError: one is not two"], details
    log = read_log(tmp_path / "tests.jsonl")
    assert {name: t["outcome"] for name, t in log.items()} == {
        "test_ok_1": "passed", "test_bad": "failed", "test_skip": "skipped", "test_xfail": "skipped",
        "test_setup_error": "error", "test_ok_2": "passed"}
    assert "assert 1 == 2" in log["test_bad"]["message"] and log["test_ok_1"]["message"] == ""
    assert not list(tmp_path.glob(".tests.jsonl.parts"))  # the slices' own logs are cleaned up


def test_a_passing_suite_is_ok(tmp_path, monkeypatch):
    write_suite(tmp_path, "def test_a(): pass\ndef test_b(): pass\n")
    monkeypatch.chdir(tmp_path)
    line, details, ok = gpu_check.run_tests(tmp_path / "tests.jsonl", timeout=120, workers=2, slices=2)
    assert line.startswith("tests: 2 passed, 0 failed, 0 errors, 0 skipped, 0 not run, crashed: no |"), line
    assert ok and details == []


def test_a_crash_names_its_test_and_keeps_the_other_results(tmp_path, monkeypatch):
    """Slice 0 of 2 holds test_a, test_crash, test_after: the crash ends it before test_after; slice 1
    (test_c, test_d, test_e) runs to its end."""
    write_suite(tmp_path, "import os, signal\n"
                          "def test_a(): pass\n"
                          "def test_crash(): os.kill(os.getpid(), signal.SIGSEGV)\n"
                          "def test_after(): pass\n"
                          "def test_c(): pass\n"
                          "def test_d(): assert False\n"
                          "def test_e(): pass\n")
    monkeypatch.chdir(tmp_path)
    line, details, ok = gpu_check.run_tests(tmp_path / "tests.jsonl", timeout=120, workers=2, slices=2)
    assert line.startswith("tests: 3 passed, 1 failed, 0 errors, 0 skipped, 2 not run, crashed: yes (1 of 2 "
                           "slices) |"), line
    assert not ok
    assert details[0].startswith("CRASHED slice 0/2 (SIGSEGV) in tests/test_example.py::test_crash"), details
    assert details[1].startswith("FAILED tests/test_example.py::test_d"), details
    assert set(read_log(tmp_path / "tests.jsonl")) == {"test_a", "test_c", "test_d", "test_e"}


def test_the_time_cap_keeps_what_finished_and_names_the_running_test(tmp_path, monkeypatch):
    write_suite(tmp_path, "import time\n"
                          "def test_quick(): pass\n"
                          "def test_slow(): time.sleep(600)\n")
    monkeypatch.chdir(tmp_path)
    line, details, ok = gpu_check.run_tests(tmp_path / "tests.jsonl", timeout=20, workers=1, slices=1)
    assert line.startswith("tests: 1 passed, 0 failed, 0 errors, 0 skipped, 1 not run, crashed: yes"), line
    assert details == ["CRASHED slice 0/1 (no result in 20 s) in tests/test_example.py::test_slow"], details
    assert not ok


@pytest.mark.parametrize("total", [0, 1, 7, 64])
@pytest.mark.parametrize("count", [1, 3, 8])
def test_shards_partition_the_suite(total, count):
    bounds = [shard_bounds(total, index, count) for index in range(count)]
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(stop == next_start for (_, stop), (next_start, _) in zip(bounds, bounds[1:]))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_a_bad_shard_is_refused(tmp_path, monkeypatch):
    write_suite(tmp_path, "def test_a(): pass\n")
    monkeypatch.chdir(tmp_path)
    import subprocess
    import sys

    for shard in ("2/2", "x/3"):
        result = subprocess.run([sys.executable, "-m", "pytest", "tests", "-p", "musetalk_fast.bench.test_log",
                                 f"--shard={shard}"], capture_output=True, text=True)
        assert result.returncode == 4 and "--shard" in result.stderr, (shard, result.stderr)


def test_the_benchmark_keeps_its_rows_when_stopped(tmp_path, monkeypatch):
    """bench.run rewrites its JSON after every case: stopped in its second case, the first case's rows
    are there (complete: false); run to its end, complete: true."""
    calls = []
    real = bench_run.run_case

    def run_case(case, device, peaks):
        calls.append(case)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a kill looks like from the file's point of view
        return real(case, device, peaks)

    monkeypatch.setattr(bench_run, "measure_peaks", lambda device: {"copy_bytes": 1e10})
    monkeypatch.setattr(bench_run, "run_case", run_case)
    with pytest.raises(KeyboardInterrupt):
        bench_run.main(["--ops", "sinkhorn", "--out", str(tmp_path)])
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert result["complete"] is False and result["rows"]
    assert {(r["op"], r["shape"]) for r in result["rows"]} == {(calls[0].op, calls[0].shape)}


def test_the_commit_comes_from_the_environment_or_git(tmp_path, monkeypatch):
    monkeypatch.setenv("MUSETALK_FAST_COMMIT", "abc1234")
    assert gpu_check.source_commit() == "abc1234"
    monkeypatch.delenv("MUSETALK_FAST_COMMIT")
    monkeypatch.chdir(tmp_path)  # a copy of the tree without .git
    assert gpu_check.source_commit() == "unknown"
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert gpu_check.source_commit() == "unknown"


def test_bench_lines_give_each_row_of_ours_its_ratio():
    lines = gpu_check.bench_lines(CPU_RESULTS)
    assert lines and all(" | best baseline " in line and re.search(r"\| \d+\.\d\dx \|", line) for line in lines), lines
    assert all(line.split(" | ")[2].startswith("ours") for line in lines)
