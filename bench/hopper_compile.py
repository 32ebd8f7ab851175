"""Compile every Triton kernel for the H100 (sm_90) on any machine, no GPU needed, and report what
the compiler made of it: registers, spills (local memory), shared memory, and whether the matmuls
use Hopper's wgmma. Catches GPU compile errors and spilling configs before a GPU run.

    python -m musetalk_fast.bench.hopper_compile            # every autotune config, as a table
    python -m musetalk_fast.bench.hopper_compile --quick    # one config per kernel (the CI check)
    python -m musetalk_fast.bench.hopper_compile --json out.json

Run it without TRITON_INTERPRET: the interpreter replaces the kernels with Python functions.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

H100_SHARED_BYTES = 227 * 1024  # the most shared memory one block may use on sm_90
FLOAT_ARGS = {"qk_scale", "scale", "eps"}


def compile_sm90(jit_fn, pointer_types, constexprs, num_warps, num_stages):
    """Compile jit_fn for sm_90; pointer_types maps pointer args to e.g. '*bf16', other non-constexpr
    args are i32 (fp32 if in FLOAT_ARGS). Returns the kernel's resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in jit_fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = pointer_types.get(name, "fp32" if name in FLOAT_ARGS else "i32")
    constants = {(jit_fn.arg_names.index(name),): value for name, value in constexprs.items()}
    kernel = triton.compile(ASTSource(jit_fn, signature, constants), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    usage = _resource_usage(kernel.asm["cubin"])
    usage["shared_bytes"] = kernel.metadata.shared
    usage["wgmma"] = "wgmma.mma_async" in kernel.asm["ptx"]
    return usage


def _resource_usage(cubin):
    """REG and LOCAL (spill) bytes from the cuobjdump that ships with Triton."""
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    registers = re.search(r"REG:(\d+)", text)
    local = re.search(r"LOCAL:(\d+)", text)
    return {"registers": int(registers.group(1)) if registers else None,
            "spill_bytes": int(local.group(1)) if local else None}


def kernel_specs(quick):
    """(label, jit fn, pointer types, constexprs, num_warps, num_stages) for every kernel and config."""
    import triton.language as tl

    from musetalk_fast.kernels import gated_attention as ga
    from musetalk_fast.kernels import sinkhorn as sk

    bf16, fp32 = "*bf16", "*fp32"
    attention_ptrs = {"Q": bf16, "K": bf16, "V": bf16, "G": bf16, "dY": bf16, "Out": bf16, "dQ": bf16, "dK": bf16,
                      "dV": bf16, "Lse": fp32, "Delta": fp32}
    specs = []
    for head_dim in (64, 128):
        for is_causal in (False, True):
            base = {"HEAD_DIM": head_dim, "BLOCK_D": head_dim, "IS_CAUSAL": is_causal, "DOT_PRECISION": "tf32"}
            for kind, kernel in (("fwd", ga.gated_attention_fwd_kernel), ("dkdv", ga.gated_attention_bwd_dkdv_kernel),
                                 ("dq", ga.gated_attention_bwd_dq_kernel)):
                configs = ga.H100_CONFIGS[kind][:1] if quick else ga.H100_CONFIGS[kind]
                for block_m, block_n, warps, stages in configs:
                    constexprs = {**base, "BLOCK_M": block_m, "BLOCK_N": block_n}
                    if kind == "fwd":
                        constexprs["HAS_GATE"] = True
                    label = f"gated_attention {kind} D{head_dim} {'causal' if is_causal else 'full'} " \
                            f"M{block_m} N{block_n} w{warps} s{stages}"
                    specs.append((label, kernel.fn, attention_ptrs, constexprs, warps, stages))
            specs.append((f"gated_attention bwd_preprocess D{head_dim}", ga.gated_attention_bwd_preprocess_kernel,
                          {"dY": bf16, "Y": bf16, "G": bf16, "Delta": fp32, "dG": bf16},
                          {"HEAD_DIM": head_dim, "BLOCK_D": head_dim, "HEAD_WISE_GATE": is_causal, "BLOCK_M": 64},
                          4, 1))
            if quick:
                break
    padded, block_b = sk._launch_config(4)
    sinkhorn_consts = {"ACC": tl.float32, "BLOCK_B": block_b, "NP": padded}
    specs.append(("sinkhorn fwd n=4", sk.sinkhorn_fwd_kernel, {"logits_ptr": fp32, "out_ptr": fp32},
                  sinkhorn_consts, 4, 1))
    specs.append(("sinkhorn bwd n=4", sk.sinkhorn_bwd_kernel,
                  {"logits_ptr": fp32, "grad_ptr": fp32, "grad_logits_ptr": fp32}, sinkhorn_consts, 4, 1))
    return specs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one config per kernel")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("hopper_compile: unset TRITON_INTERPRET (the interpreter does not compile kernels)")

    rows, failures = [], 0
    print(f"{'kernel':<58}{'regs':>6}{'spill B':>9}{'smem KB':>9}{'wgmma':>7}")
    for label, fn, pointers, constexprs, warps, stages in kernel_specs(args.quick):
        try:
            usage = compile_sm90(fn, pointers, constexprs, warps, stages)
        except Exception as error:  # report every failing kernel, then fail
            failures += 1
            print(f"{label:<58}  FAILED: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
            rows.append({"kernel": label, "error": str(error)})
            continue
        fits = usage["shared_bytes"] <= H100_SHARED_BYTES
        failures += not fits
        print(f"{label:<58}{usage['registers']:>6}{usage['spill_bytes']:>9}{usage['shared_bytes'] / 1024:>9.1f}"
              f"{'yes' if usage['wgmma'] else 'no':>7}{'' if fits else '  TOO MUCH SHARED MEMORY'}")
        rows.append({"kernel": label, **usage})
    if args.json:
        command = "python -m musetalk_fast.bench.hopper_compile " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.json).write_text(json.dumps({"command": command, "target": "cuda sm_90", "rows": rows}, indent=1))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
