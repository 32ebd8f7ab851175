"""make gpu-check's driver (bench/gpu_check.py), its test step (bench/test_slices.py) and pytest plugin
(bench/test_log.py): the suite split into slices run side by side, every result kept through a crash
(the slice going on without the test that crashed) or the time cap, the failures named;
the benchmark's rows kept when it is capped; every benchmark row of ours given its ratio to the best
baseline."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from musetalk_fast.bench import gpu_check, test_slices
from musetalk_fast.bench import run as bench_run
from musetalk_fast.bench.test_log import shard_bounds
from musetalk_fast.bench.test_slices import run_tests

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
def test_skip_in_body(): pytest.skip("not here")
@pytest.mark.xfail(reason="known")
def test_xfail(): assert False
@pytest.mark.xfail(reason="fixed?")
def test_xpass(): pass
def test_setup_error(broken): pass
def test_ok_2(): assert True
"""


def write_suite(root, body, name="test_example.py"):
    (root / "tests").mkdir(exist_ok=True)
    (root / "tests" / name).write_text(body)


def read_log(path):
    return {t["nodeid"].split("::")[-1]: t for t in map(json.loads, path.read_text().splitlines())}


def run(tmp_path, monkeypatch, timeout=120, workers=2, slices=2):
    monkeypatch.chdir(tmp_path)
    return run_tests(tmp_path / "tests.jsonl", timeout=timeout, workers=workers, slices=slices)


@pytest.mark.parametrize("workers, slices", [(1, 1), (2, 3)])
def test_counts_and_names_every_outcome(tmp_path, monkeypatch, workers, slices):
    write_suite(tmp_path, SUITE)
    line, details, ok = run(tmp_path, monkeypatch, workers=workers, slices=slices)
    assert re.fullmatch(r"tests: 3 passed, 1 failed, 1 errors, 3 skipped, 0 not run, crashed: no \| \d+ s \| "
                        rf"{workers} processes", line), line
    assert not ok
    assert sorted(details) == ["ERROR tests/test_example.py::test_setup_error | RuntimeError: fixture broke",
                               "FAILED tests/test_example.py::test_bad | AssertionError: one is not two"], details
    log = read_log(tmp_path / "tests.jsonl")
    assert {name: t["outcome"] for name, t in log.items()} == {
        "test_ok_1": "passed", "test_bad": "failed", "test_skip": "skipped", "test_skip_in_body": "skipped",
        "test_xfail": "xfailed", "test_xpass": "xpassed", "test_setup_error": "error", "test_ok_2": "passed"}
    assert "assert 1 == 2" in log["test_bad"]["message"] and log["test_ok_1"]["message"] == ""
    assert "not here" in log["test_skip_in_body"]["message"]  # a skip keeps its reason
    assert not (tmp_path / ".tests.jsonl.parts").exists()  # the slices' own files are cleaned up


def test_a_passing_suite_is_ok_and_an_empty_one_is_not(tmp_path, monkeypatch):
    write_suite(tmp_path, "def test_a(): pass\ndef test_b(): pass\n")
    line, details, ok = run(tmp_path, monkeypatch)
    assert line.startswith("tests: 2 passed, 0 failed, 0 errors, 0 skipped, 0 not run, crashed: no |"), line
    assert ok and details == []
    write_suite(tmp_path, "x = 1\n")
    line, details, ok = run(tmp_path / "tests", monkeypatch)  # a root with no tests
    assert not ok and "NO TESTS collected" in details, (line, details)


def test_a_module_that_fails_to_collect_is_an_error_and_the_rest_runs(tmp_path, monkeypatch):
    write_suite(tmp_path, "def test_a(): pass\ndef test_b(): assert False\n")
    write_suite(tmp_path, "def test_x(:\n", name="test_syntax.py")
    write_suite(tmp_path, "import pytest\npytest.importorskip('no_such_module_here')\n", name="test_optional.py")
    line, details, ok = run(tmp_path, monkeypatch)
    assert line.startswith("tests: 1 passed, 1 failed, 1 errors, 1 skipped, 0 not run, crashed: no |"), line
    assert not ok
    assert any(d.startswith("ERROR tests/test_syntax.py | ") for d in details), details
    assert set(read_log(tmp_path / "tests.jsonl")) == {"tests/test_syntax.py", "tests/test_optional.py",
                                                       "test_a", "test_b"}


def test_a_crash_names_its_test_and_the_slice_goes_on_without_it(tmp_path, monkeypatch):
    """Slice 0 of 2 holds test_a, test_crash, test_after: the crash ends its process, the test is named
    with Python's fatal error and its frame, and the slice starts again without test_a and test_crash;
    slice 1 (test_c, test_d, test_e) runs as usual. Only the crashed test is not run."""
    write_suite(tmp_path, "import os, signal\n"
                          "def test_a(): pass\n"
                          "def test_crash(): os.kill(os.getpid(), signal.SIGSEGV)\n"
                          "def test_after(): pass\n"
                          "def test_c(): pass\n"
                          "def test_d(): assert False\n"
                          "def test_e(): pass\n")
    line, details, ok = run(tmp_path, monkeypatch)
    assert line.startswith("tests: 4 passed, 1 failed, 0 errors, 0 skipped, 1 not run, crashed: yes (1) |"), line
    assert not ok
    assert re.match(r"CRASHED slice 0/2 \(SIGSEGV\) in tests/test_example.py::test_crash: Fatal Python error: "
                    r"Segmentation fault / File .*test_example.py\", line 3 in test_crash$", details[0]), details
    assert details[1].startswith("FAILED tests/test_example.py::test_d"), details
    log = read_log(tmp_path / "tests.jsonl")
    assert {name: t["outcome"] for name, t in log.items()} == {
        "test_a": "passed", "test_crash": "crashed", "test_after": "passed", "test_c": "passed",
        "test_d": "failed", "test_e": "passed"}  # a line per test of the suite, in its order
    assert list(log) == ["test_a", "test_crash", "test_after", "test_c", "test_d", "test_e"]


def test_an_exit_in_the_middle_is_a_crash_and_a_module_that_keeps_crashing_is_left(tmp_path, monkeypatch):
    """os._exit(0) in a test ends its process with a clean exit code: still a crash. A module whose every
    test kills its process (a module-scoped fixture, say) is left out after MODULE_CRASHES crashes, and
    the next module of the slice runs."""
    write_suite(tmp_path, "import os\n"
                          "def test_exit(): os._exit(0)\n"
                          "def test_after(): pass\n")
    line, details, ok = run(tmp_path, monkeypatch, workers=1, slices=1)
    assert line.startswith("tests: 1 passed, 0 failed, 0 errors, 0 skipped, 1 not run, crashed: yes (1) |"), line
    assert len(details) == 1 and details[0].startswith(
        "CRASHED slice 0/1 (exit 0) in tests/test_example.py::test_exit"), details
    body = "import os\n" + "".join(f"def test_{i}(): os._exit(3)\n" for i in range(6))
    (tmp_path / "tests" / "test_example.py").write_text(body)
    write_suite(tmp_path, "def test_fine(): pass\n", name="test_later.py")
    line, details, ok = run(tmp_path, monkeypatch, workers=1, slices=1)
    assert line.startswith("tests: 1 passed, 0 failed, 0 errors, 0 skipped, 6 not run, crashed: yes (2) |"), line
    outcomes = [t["outcome"] for t in read_log(tmp_path / "tests.jsonl").values()]
    assert outcomes == ["crashed"] * test_slices.MODULE_CRASHES + ["not run"] * 4 + ["passed"], outcomes


def test_a_module_whose_import_crashes_is_named_and_left_out(tmp_path, monkeypatch):
    write_suite(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\ndef test_never(): pass\n",
                name="test_boom.py")
    write_suite(tmp_path, "".join(f"def test_{i}(): pass\n" for i in range(4)), name="test_fine.py")
    line, details, ok = run(tmp_path, monkeypatch)
    assert line.startswith("tests: 4 passed, 0 failed, 1 errors, 0 skipped, 0 not run, crashed: yes"), line
    assert not ok
    assert all(d.startswith("CRASHED slice") and "while collecting tests/test_boom.py" in d
               for d in details if d.startswith("CRASHED")), details
    assert "ERROR tests/test_boom.py | the process died collecting this module (left out of later processes)" \
        in details, details


def test_a_test_that_poisons_the_cuda_context_ends_its_process_and_the_slice_goes_on(tmp_path, monkeypatch):
    """A CUDA error such as an illegal address leaves the process's context unusable: the test is failed,
    its process ends after its teardown, and the next test runs in a fresh process (another pid)."""
    pid = tmp_path / "pid"
    write_suite(tmp_path, "import os\n"
                          "def test_bad_kernel():\n"
                          f"    open({str(pid)!r}, 'w').write(str(os.getpid()))\n"
                          "    raise RuntimeError('CUDA error: an illegal memory access was encountered')\n"
                          "def test_next():\n"
                          f"    assert open({str(pid)!r}).read() != str(os.getpid())\n"
                          "def test_plain_failure(): raise RuntimeError('CUDA out of memory')\n"
                          "def test_last(): pass\n")
    line, details, ok = run(tmp_path, monkeypatch, workers=1, slices=1)
    assert line.startswith("tests: 2 passed, 2 failed, 0 errors, 0 skipped, 0 not run, crashed: yes (1) |"), line
    assert details[0] == ("CRASHED slice 0/1 (ended) after tests/test_example.py::test_bad_kernel (its CUDA "
                          "context lost): RuntimeError: CUDA error: an illegal memory access was "
                          "encountered"), details
    assert not ok


def test_a_crash_at_exit_after_every_test_is_named_once_per_process_not_restarted(tmp_path, monkeypatch):
    write_suite(tmp_path, "import atexit, os, signal\n"
                          "atexit.register(lambda: os.kill(os.getpid(), signal.SIGSEGV))\n"
                          "def test_a(): pass\ndef test_b(): pass\n")
    line, details, ok = run(tmp_path, monkeypatch)
    assert line.startswith("tests: 2 passed, 0 failed, 0 errors, 0 skipped, 0 not run, crashed: yes (2) |"), line
    assert sorted(d.split(":")[0] for d in details) == ["CRASHED slice 0/2 (SIGSEGV) at exit, after its tests",
                                                  "CRASHED slice 1/2 (SIGSEGV) at exit, after its tests"], details
    assert not ok


def test_nothing_a_slice_started_outlives_it(tmp_path, monkeypatch):
    """A test that leaves a child process behind (a compile worker, a server): it dies with its slice."""
    import os

    write_suite(tmp_path, "import subprocess\n"
                          "def test_spawn(tmp_path_factory):\n"
                          "    child = subprocess.Popen(['sleep', '300'])\n"
                          f"    open({str(tmp_path / 'pid')!r}, 'w').write(str(child.pid))\n")
    line, details, ok = run(tmp_path, monkeypatch, workers=1, slices=1)
    assert ok, (line, details)
    pid = int((tmp_path / "pid").read_text())
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        if open(f"/proc/{pid}/stat").read().split()[2] == "Z":  # killed, not yet reaped by its new parent
            break
        __import__("time").sleep(0.1)
    else:
        pytest.fail(f"the slice's child {pid} is still running")


def test_first_runs_the_tests_that_matter_most_first(tmp_path, monkeypatch):
    """--first tests/ops/: under a cap that lets one slice of two run, the ops tests are the ones that ran."""
    write_suite(tmp_path, "import time\ndef test_slow_1(): time.sleep(600)\ndef test_slow_2(): pass\n")
    (tmp_path / "tests" / "ops").mkdir()
    (tmp_path / "tests" / "ops" / "test_kernel.py").write_text("def test_k1(): pass\ndef test_k2(): pass\n")
    monkeypatch.chdir(tmp_path)
    line, details, ok = run_tests(tmp_path / "tests.jsonl", timeout=20, workers=1, slices=2, first=("tests/ops/",))
    log = read_log(tmp_path / "tests.jsonl")
    assert list(log) == ["test_k1", "test_k2", "test_slow_1", "test_slow_2"]  # the suite's order, ops first
    assert [log[name]["outcome"] for name in log] == ["passed", "passed", "not run", "not run"], (line, details)


@pytest.mark.parametrize("total", [0, 1, 7, 64])
@pytest.mark.parametrize("count", [1, 3, 8])
def test_shards_partition_the_suite(total, count):
    bounds = [shard_bounds(total, index, count) for index in range(count)]
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(stop == next_start for (_, stop), (next_start, _) in zip(bounds, bounds[1:]))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_a_bad_shard_or_worker_count_is_refused(tmp_path, monkeypatch):
    write_suite(tmp_path, "def test_a(): pass\n")
    monkeypatch.chdir(tmp_path)
    for shard in ("2/2", "x/3"):
        result = subprocess.run([sys.executable, "-m", "pytest", "tests", "-p", "musetalk_fast.bench.test_log",
                                 f"--shard={shard}"], capture_output=True, text=True)
        assert result.returncode == 4 and "--shard" in result.stderr, (shard, result.stderr)
    with pytest.raises(ValueError, match="workers"):
        run_tests(tmp_path / "tests.jsonl", timeout=10, workers=0)


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
    json_path = next(tmp_path.glob("*.json"))
    result = json.loads(json_path.read_text())
    assert result["complete"] is False and result["rows"]
    assert {(r["op"], r["shape"]) for r in result["rows"]} == {(calls[0].op, calls[0].shape)}
    assert result["ops"] == ["sinkhorn"] and result["ops_done"] == []
    # gpu-check's summary names what was not reached, with the command that runs just that
    assert gpu_check.ops_not_reached(json_path, tmp_path) == [
        f"bench: not reached: sinkhorn (run them: python -m musetalk_fast.bench.run --ops sinkhorn --out {tmp_path}/more)"]


def test_a_finished_benchmark_leaves_nothing_unreached(tmp_path):
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"complete": True, "ops": ["sinkhorn", "mhc"], "ops_done": ["sinkhorn", "mhc"], "rows": []}))
    assert gpu_check.ops_not_reached(path, tmp_path) == []
    path.write_text(json.dumps({"complete": False, "ops": ["sinkhorn", "mhc", "model"], "ops_done": ["sinkhorn"],
                                "rows": []}))
    assert gpu_check.ops_not_reached(path, tmp_path)[0].startswith("bench: not reached: mhc model (run them: ")
    assert gpu_check.ops_not_reached(tmp_path / "missing.json", tmp_path)[0].startswith("bench: no rows written")


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
