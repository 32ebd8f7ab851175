"""make gpu-check's driver (bench/gpu_check.py): counts tests, reports a crash instead of dying with
it, and gives every benchmark row of ours its ratio to the best baseline."""
import re
from pathlib import Path

from musetalk_fast.bench import gpu_check

CPU_RESULTS = Path(__file__).parents[1] / "bench" / "results" / "cpu-x86_64.json"


def write_suite(root, body):
    (root / "tests").mkdir()
    (root / "tests" / "test_example.py").write_text(body)


def test_counts_passed_failed_skipped(tmp_path, monkeypatch):
    write_suite(tmp_path, "import pytest\n"
                          "def test_ok(): assert True\n"
                          "def test_bad(): assert 1 == 2\n"
                          "@pytest.mark.skip(reason='x')\n"
                          "def test_skip(): pass\n")
    monkeypatch.chdir(tmp_path)
    line = gpu_check.run_tests(tmp_path / "junit.xml", timeout=120)
    assert re.fullmatch(r"tests: 1 passed, 1 failed, 0 errors, 1 skipped, crashed: no \| \d+ s", line), line


def test_a_crash_is_reported_not_fatal(tmp_path, monkeypatch):
    write_suite(tmp_path, "import os, signal\n"
                          "def test_crash(): os.kill(os.getpid(), signal.SIGSEGV)\n")
    monkeypatch.chdir(tmp_path)
    line = gpu_check.run_tests(tmp_path / "junit.xml", timeout=120)
    assert "crashed: yes (SIGSEGV)" in line, line


def test_bench_lines_give_each_row_of_ours_its_ratio():
    lines = gpu_check.bench_lines(CPU_RESULTS)
    assert lines and all(" | best baseline " in line and re.search(r"\| \d+\.\d\dx \|", line) for line in lines), lines
    assert all(line.split(" | ")[2].startswith("ours") for line in lines)
