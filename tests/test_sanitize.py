"""make gpu-sanitize's driver (bench/sanitize.py): each file under the sanitizer with PyTorch's caching
allocator off, memcheck's error summary and pytest's result read per file, a non-zero exit on any
error. A stand-in sanitizer (a script that runs the command after its options and prints a summary)
checks the driver here; the real memcheck needs a GPU."""
import stat

import pytest

from musetalk_fast.bench import sanitize

FAKE = """#!/bin/sh
shift 6  # --tool memcheck --target-processes all --print-limit 20
"$@"
code=$?
echo "========= ERROR SUMMARY: ${FAKE_ERRORS:-0} errors"
exit $code
"""


@pytest.fixture
def fake_sanitizer(tmp_path, monkeypatch):
    path = tmp_path / "bin" / "compute-sanitizer"
    path.parent.mkdir()
    path.write_text(FAKE)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{path.parent}:{__import__('os').environ['PATH']}")
    assert sanitize.find_sanitizer() == str(path)
    return path


def write_test(tmp_path, body):
    path = tmp_path / "test_kernel.py"
    path.write_text(body)
    return str(path)


def run(tmp_path, files, *extra):
    with pytest.raises(SystemExit) as exit_info:
        sanitize.main(["--results", str(tmp_path / "res"), "--files", *files, *extra])
    (report,) = (tmp_path / "res").glob("*-memcheck.txt")
    return exit_info.value.code, report.read_text().splitlines()


def test_a_clean_file_passes_with_the_caching_allocator_off(tmp_path, fake_sanitizer):
    test = write_test(tmp_path, "import os\n"
                                "def test_allocator_off(): assert os.environ['PYTORCH_NO_CUDA_MEMORY_CACHING'] == '1'\n")
    code, lines = run(tmp_path, [test])
    assert code == 0, lines
    assert lines[1].startswith(f"{test} | memcheck errors 0 | tests 1 passed in "), lines


def test_memcheck_errors_or_failed_tests_fail_the_run(tmp_path, fake_sanitizer, monkeypatch):
    passing = write_test(tmp_path, "def test_ok(): pass\n")
    monkeypatch.setenv("FAKE_ERRORS", "3")
    code, lines = run(tmp_path, [passing])
    assert code == 1 and "| memcheck errors 3 |" in lines[1], lines
    monkeypatch.setenv("FAKE_ERRORS", "0")
    failing = str(tmp_path / "test_bad.py")
    (tmp_path / "test_bad.py").write_text("def test_bad(): assert False\n")
    code, lines = run(tmp_path, [failing])
    assert code == 1 and "| tests 1 failed in " in lines[1], lines


def test_files_past_the_time_are_named_not_run(tmp_path, fake_sanitizer):
    slow = write_test(tmp_path, "import time\ndef test_slow(): time.sleep(60)\n")
    code, lines = run(tmp_path, [slow, slow], "--seconds", "5")
    assert code == 1, lines
    assert "memcheck errors no summary | tests no pytest summary" in lines[1], lines
    assert lines[2] == f"{slow} | not run (past --seconds 5)", lines


def test_no_sanitizer_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(sanitize.glob, "glob", lambda pattern: [])
    with pytest.raises(SystemExit, match="compute-sanitizer not found"):
        sanitize.main(["--results", str(tmp_path)])
