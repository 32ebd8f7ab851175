"""Every Triton kernel compiles for the H100 (sm_90) here, without a GPU: catches what the CPU
interpreter cannot (type merging across runtime branches, loop-carried types, shared memory)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


@pytest.mark.skipif(not CUOBJDUMP.exists(), reason="this Triton ships no NVIDIA backend tools")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "musetalk_fast.bench.hopper_compile", "--quick"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines()[1:] if line.strip()]
    assert len(lines) >= 10 and not any("FAILED" in line for line in lines)
    # The half-precision attention matmuls run on Hopper's wgmma tensor-core path (fp32 and the
    # exact fp64 path do not), every dtype's heuristic config compiles, and nothing spills.
    assert {line.split()[2] for line in lines if line.startswith("gated_attention")} >= {"bf16", "fp16", "fp32", "fp64"}
    for line in lines:
        fields = line.split()
        if (line.startswith("gated_attention") and "preprocess" not in line and fields[2] in ("bf16", "fp16")
                and " ptr " not in line):  # the pointer path (pre-Hopper GPUs, misaligned views) may use mma.sync
            assert fields[-1] == "yes", line
        assert fields[-3] == "0", f"register spill: {line}"
        if line.startswith(("sinkhorn", "mhc")):  # and no spill into the stack frame either
            assert fields[-4] == "0", f"stack spill: {line}"
    # Gated attention's heuristic configs (forward, fused backward, deterministic dQ, the preprocess;
    # bf16 at D64, D128 and D256, fp16, fp32 and fp64 at D128; dense and varlen; tensor descriptors and
    # the pointer path, the head-dim-split backward of float32, float64 and the bf16 pointer path at
    # D256) keep every tile in registers or shared memory: no stack frame.
    attention = [line for line in lines if line.startswith("gated_attention")
                 and "[space]" not in line]  # search-space candidates: `make tune` skips those that spill
    assert {line.split()[3] for line in attention} >= {"D64", "D128", "D256"}
    assert any(" ptr" in line and " split" in line for line in attention)
    assert {line.split()[2] for line in attention if " split" in line} >= {"bf16", "fp32", "fp64"}
    spilling = [line for line in attention if line.split()[-4] != "0"]
    assert not spilling, spilling
    assert {line.split()[1] + " " + line.split()[2] for line in lines if line.startswith("mhc")} >= {
        "pre fwd", "post fwd", "post bwd", "pre bwd"}
    # The lightning indexer's and fused top-k's heuristic configs, every dtype (the fast paths, and the
    # exact fp32/fp64 ones at 1, 3 and 128 heads, where the backward takes the heads 32 at a time):
    # no stack frame either.
    indexer = [line for line in lines if line.startswith("lightning_indexer")]
    assert {line.split()[2] for line in indexer} >= {"fp8", "bf16", "fp32", "fp64"}
    assert {line.split()[2] for line in indexer if " H32 w" in line} >= {"fp32", "fp64"}  # BLOCK_H = 32
    spilling = [line for line in indexer if line.split()[-4] != "0"]
    assert not spilling, spilling
    # The lightning indexer's fp8 x fp8 tl.dot (and the fused top-k's) runs on wgmma too.
    fp8_indexer = [line for line in lines if line.startswith("lightning_indexer") and " fp8 " in line]
    assert len(fp8_indexer) >= 4 and all(line.split()[-1] == "yes" for line in fp8_indexer), fp8_indexer
