"""Tune the Triton kernels' launch configs on the GPU at hand and write its table,
kernels/configs/<GPU name>.json, which later runs read instead of tuning.

    python -m musetalk_fast.bench.tune [--ops gated_attention sinkhorn] [--seconds 480]

Runs every benchmark case's own implementation once with MUSETALK_FAST_AUTOTUNE=1, so each kernel
times its whole search space at each benchmark shape's key (dtype, head dim, causal, size buckets)
and keeps the fastest. Keys tuned here replace the table's entries for the same key; the rest of
the table stays. The table is rewritten after every case, so a stopped run keeps what it tuned;
`--seconds` starts no case past that many seconds (on a machine whose commands are time-capped: split
the ops over several commands) and names the cases it left. Commit the file to ship it.
"""
import argparse
import importlib
import os
import sys
import time

import torch

from musetalk_fast.kernels import tuning

from .run import OPS


def tune_cases(cases, seconds=None, clock=time.monotonic):
    """Run each case's implementations of ours once (each new key tunes) and write the tables after each
    case; past `seconds`, start no new case. Returns the (op, shape) of the cases left."""
    start = clock()
    for index, case in enumerate(cases):
        if seconds is not None and clock() - start > seconds:
            return [(c.op, c.shape) for c in cases[index:]]
        for impl, fn in case.ours.items():
            print(f"tuning {case.op} {case.shape} ({impl})", flush=True)
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        tuning.write_tuned_tables()
    return []


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="*", default=OPS, choices=OPS)
    parser.add_argument("--seconds", type=float, default=None, help="start no case after this many seconds")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("tune: needs a CUDA GPU (the table is per GPU)")
    # Set here, before any case is built or launched (tuning reads it at each new key), not at import: an
    # import (e.g. by the tests) must not turn tuning on for every later launch of that process.
    os.environ[tuning.AUTOTUNE_ENV] = "1"
    cases = [case for name in args.ops for case in importlib.import_module(f"musetalk_fast.bench.ops.{name}").cases("cuda")]
    left = tune_cases(cases, args.seconds)
    for kernel, entry in tuning.tuned_entries():
        print(f"{kernel:<34} {entry['match']} {entry['sizes']} -> {entry['config']} {entry['ms']} ms")
    for path in tuning.write_tuned_tables():
        print(f"wrote {path}")
    for op, shape in left:
        print(f"not tuned (past --seconds {args.seconds:g}): {op} | {shape}")


if __name__ == "__main__":
    main()
