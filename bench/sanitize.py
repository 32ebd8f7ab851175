"""compute-sanitizer's memcheck over the tests of the kernels that read memory at data-dependent
addresses (`make gpu-sanitize` on a GPU machine): sparse attention (any index value), top-k and the
lightning indexer (ragged key ranges), the Engram gather (row ids), gated attention (varlen offsets).

    python -m musetalk_fast.bench.sanitize [--results bench/results] [--files tests/ops/test_topk.py ...]
        [--seconds 540] [-k EXPRESSION]

Each test file runs in its own `compute-sanitizer --tool memcheck python -m pytest FILE` with PyTorch's
caching allocator off (PYTORCH_NO_CUDA_MEMORY_CACHING=1): every tensor is its own allocation, so a read
past a tensor's end is outside any allocation and memcheck reports it (inside the cache's blocks it would
not). Writes <results>/<gpu>-memcheck.txt, a line per file:

    <file> | memcheck errors <n> | tests <pytest's last line> | <s> s

and exits non-zero if memcheck reported an error, a file's tests failed, or the time ran out.
"""
import argparse
import glob
import os
import re
import shutil
import sys
import time
from pathlib import Path

from .processes import run_capped

FILES = ["tests/ops/test_sparse_attention.py", "tests/ops/test_topk.py", "tests/ops/test_lightning_indexer.py",
         "tests/ops/test_engram.py", "tests/ops/test_gated_attention.py"]
SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) error")
PYTEST_LAST_LINE = re.compile(r"(\d+ (passed|failed|errors?|skipped|deselected|xfailed|xpassed)\b.* in [\d.]+s|no tests ran)")


def find_sanitizer():
    """compute-sanitizer on the PATH, else in the CUDA toolkit ($CUDA_HOME, /usr/local/cuda*)."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), *sorted(glob.glob("/usr/local/cuda*"))]
    for root in filter(None, roots):
        for candidate in (Path(root) / "bin" / "compute-sanitizer",
                          Path(root) / "compute-sanitizer" / "compute-sanitizer"):
            if candidate.is_file():
                return str(candidate)
    return None


def sanitize_file(sanitizer, path, timeout, keyword=None):
    """One file under memcheck: (memcheck errors or None if no summary was printed, pytest's last line,
    seconds, the output's tail)."""
    command = [sanitizer, "--tool", "memcheck", "--target-processes", "all", "--print-limit", "20",
               sys.executable, "-m", "pytest", path, "-q", "-p", "no:cacheprovider", *(["-k", keyword] if keyword else [])]
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    start = time.time()
    code, output = run_capped(command, timeout, capture=True, env=env)  # the sanitizer and the python under it
    if code is None:
        output += f"\nno result in {timeout:.0f} s"
    errors = [int(n) for n in SUMMARY.findall(output)]
    tests = [line for line in output.splitlines() if PYTEST_LAST_LINE.search(line)]
    return (sum(errors) if errors else None), (tests[-1].strip("= ") if tests else "no pytest summary"), \
        time.time() - start, output[-3000:]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="bench/results")
    parser.add_argument("--files", nargs="+", default=FILES)
    parser.add_argument("--seconds", type=float, default=540, help="for all files together")
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression for every file")
    args = parser.parse_args(argv)

    sanitizer = find_sanitizer()
    if sanitizer is None:
        sys.exit("sanitize: compute-sanitizer not found (on the PATH, $CUDA_HOME/bin or /usr/local/cuda*/bin)")
    import torch

    from musetalk_fast.bench.run import device_name

    if not torch.cuda.is_available():
        print("sanitize: no GPU here: memcheck watches CUDA kernels only, so it checks nothing of the CPU kernels")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    start, lines, ok = time.time(), [], True
    for path in args.files:
        left = args.seconds - (time.time() - start)
        if left <= 0:
            lines.append(f"{path} | not run (past --seconds {args.seconds:g})")
            ok = False
            continue
        errors, tests, seconds, tail = sanitize_file(sanitizer, path, left, args.keyword)
        lines.append(f"{path} | memcheck errors {'no summary' if errors is None else errors} | tests {tests} | "
                     f"{seconds:.0f} s")
        print(lines[-1], flush=True)
        if errors != 0 or not re.search(r"\bpassed\b", tests) or re.search(r"\b(failed|error)", tests):
            ok = False
            print(tail, flush=True)
    text = "\n".join([f"memcheck {device_name('cuda' if torch.cuda.is_available() else 'cpu')} | {sanitizer}",
                      *lines]) + "\n"
    out = results / f"{device_name('cuda' if torch.cuda.is_available() else 'cpu')}-memcheck.txt"
    out.write_text(text)
    print("\n" + text + f"wrote {out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
