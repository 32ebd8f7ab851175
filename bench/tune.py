"""Tune the Triton kernels' launch configs on the GPU at hand and write its table,
kernels/configs/<GPU name>.json, which later runs read instead of tuning.

    python -m musetalk_fast.bench.tune [--ops gated_attention sinkhorn]

Runs every benchmark case's own implementation once with MUSETALK_FAST_AUTOTUNE=1, so each kernel
times its whole search space at each benchmark shape's key (dtype, head dim, causal, size buckets)
and keeps the fastest. Keys tuned here replace the table's entries for the same key; the rest of
the table stays. Commit the file to ship it.
"""
import argparse
import importlib
import os
import sys

os.environ["MUSETALK_FAST_AUTOTUNE"] = "1"  # before any launch: read at each new key

import torch  # noqa: E402

from musetalk_fast.kernels import tuning  # noqa: E402

from .run import OPS  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="*", default=OPS, choices=OPS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("tune: needs a CUDA GPU (the table is per GPU)")
    for name in args.ops:
        module = importlib.import_module(f"musetalk_fast.bench.ops.{name}")
        for case in module.cases("cuda"):
            for impl, fn in case.ours.items():
                print(f"tuning {case.op} {case.shape} ({impl})", flush=True)
                fn()
    torch.cuda.synchronize()
    for kernel, entry in tuning.tuned_entries():
        print(f"{kernel:<34} {entry['match']} {entry['sizes']} -> {entry['config']} {entry['ms']} ms")
    for path in tuning.write_tuned_tables():
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
