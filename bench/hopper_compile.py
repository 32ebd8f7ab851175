"""Compile every Triton kernel for the H100 (sm_90) on any machine, no GPU needed, and report what
the compiler made of it: registers, the stack frame (where ptxas puts spilled registers), local-memory
spills, shared memory, and whether the matmuls use Hopper's wgmma. Catches GPU compile errors and
spilling configs before a GPU run.

    python -m musetalk_fast.bench.hopper_compile            # every config, as a table
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
FLOAT_ARGS = {"qk_scale", "scale", "eps", "sm_scale"}  # fp32 scalars; the rest of the non-pointer args are i32


def compile_sm90(jit_fn, pointer_types, constexprs, num_warps, num_stages, divisible=()):
    """Compile jit_fn for sm_90; pointer_types maps pointer args to e.g. '*bf16', other non-constexpr
    args are i32 (fp32 if in FLOAT_ARGS); the args named in `divisible` are known multiples of 16, as
    Triton's launcher specialises them at run time (torch's allocations, strides of the benchmarks'
    shapes). Returns the kernel's resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # a constexpr left out takes the kernel's default (else it would compile as a run-time i32)
    constexprs = {**{p.name: p.default for p in jit_fn.params if p.is_constexpr and p.has_default}, **constexprs}
    signature = {}
    for name in jit_fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = pointer_types.get(name, "fp32" if name in FLOAT_ARGS else "i32")
    constants = {(jit_fn.arg_names.index(name),): value for name, value in constexprs.items()}
    attrs = {(jit_fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    kernel = triton.compile(ASTSource(jit_fn, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    usage = _resource_usage(kernel.asm["cubin"])
    usage["shared_bytes"] = kernel.metadata.shared
    usage["wgmma"] = "wgmma.mma_async" in kernel.asm["ptx"]
    return usage


def _resource_usage(cubin):
    """REG, LOCAL (spill) and STACK bytes from the cuobjdump that ships with Triton."""
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    registers = re.search(r"REG:(\d+)", text)
    local = re.search(r"LOCAL:(\d+)", text)
    # ptxas (ABI mode, as Triton compiles) places register spills in the stack frame: STACK counts them
    # where LOCAL shows 0 (`ptxas -v` says "N bytes stack frame, N bytes spill stores").
    stack = re.search(r"STACK:(\d+)", text)
    return {"registers": int(registers.group(1)) if registers else None,
            "spill_bytes": int(local.group(1)) if local else None,
            "stack_bytes": int(stack.group(1)) if stack else None}


TRITON_TYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32", "fp64": "*fp64"}


def _attention_pointers(dtype):
    data, stats = TRITON_TYPES[dtype], "*fp64" if dtype == "fp64" else "*fp32"
    pointers = {name: data for name in ("Q", "K", "V", "G", "dY", "Out", "dQ", "dK", "dV", "Y", "dG")}
    return {**pointers, "Lse": stats, "Delta": stats, "dQacc": stats, "CuQ": "*i32", "CuK": "*i32"}


def _attention_spec(kind, configs, match, config):
    """One attention kernel compiled with `config` for the key `match`."""
    import torch
    import triton.language as tl

    from musetalk_fast.kernels import gated_attention as ga
    from musetalk_fast.kernels.float64_scalars import float64_scalars

    kernel = {"fwd": ga.gated_attention_fwd_kernel, "bwd": ga.gated_attention_bwd_kernel,
              "dq": ga.gated_attention_bwd_dq_kernel, "bwd_preprocess": ga.gated_attention_bwd_preprocess_kernel}[kind]
    exact = match["dtype"] == "fp64"
    constexprs = {"HEAD_DIM": match["D"], "BLOCK_D": match["D"], "ACC": tl.float64 if exact else tl.float32}
    if kind == "bwd_preprocess":
        constexprs.update(HEAD_WISE_GATE=match.get("causal", False), BLOCK_M=config["BLOCK_M"])
    else:
        constexprs.update(IS_CAUSAL=match["causal"], BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
                          DOT_PRECISION="tf32" if match["dtype"] in ("bf16", "fp16") else "ieee")
    if kind != "bwd_preprocess":  # the H100 path: tensor descriptors (TMA) for the tiles, an element-wise gate
        constexprs.update(USE_TMA=True, GATE_TMA=True, HEAD_WISE_GATE=False)
    if kind == "fwd":
        constexprs["HAS_GATE"] = True
    if config.get("SPLIT_D"):
        constexprs["SPLIT_D"] = config["SPLIT_D"]
    if exact and kind != "bwd_preprocess":  # float64 passes its scales as constexprs too (exact on the GPU)
        scale = match["D"] ** -0.5
        constexprs.update(float64_scalars(torch.float64, qk_scale=scale * ga.LOG2E,
                                          **({"scale": scale} if kind != "fwd" else {})))
    blocks = " ".join(f"{k[6]}{v}" for k, v in config.items() if k.startswith("BLOCK_"))
    blocks += f" split{config['SPLIT_D']}" if config.get("SPLIT_D") else ""
    label = f"gated_attention {kind} {match['dtype']} D{match['D']} {'causal' if match.get('causal') else 'full'} " \
            f"{blocks} w{config['num_warps']} s{config.get('num_stages', 1)}"
    return label, kernel, _attention_pointers(match["dtype"]), constexprs, config["num_warps"], config.get("num_stages", 1)


def _engram_specs(quick):
    """The Engram kernels at each table dtype, 80-wide rows (the H100 benchmark's), their heuristic
    configs (every search-space config unless quick). col_stride 1 is what Triton specialises a
    unit stride to at launch."""
    import triton.language as tl

    from musetalk_fast.kernels import engram as en

    ids = {name: "*i64" for name in ("ids_ptr", "multipliers_ptr", "moduli_ptr", "offsets_ptr", "rows_ptr",
                                     "sorted_rows_ptr", "order_ptr")}
    specs = []
    for dtype in ("bf16", "fp16", "fp32", "fp64"):
        match = {"dtype": dtype, "E": 128}
        data = {"table_ptr": TRITON_TYPES[dtype], "out_ptr": TRITON_TYPES[dtype], "grad_ptr": TRITON_TYPES[dtype]}
        pointers = {**ids, **data, "pad_id": "i64"}
        for name, configs, kernel in (("gather", en.GATHER, en.engram_gather_kernel),
                                      ("lookup", en.LOOKUP, en.engram_lookup_kernel)):
            for config, tag in _heuristic_then_space(configs.heuristic_config(match), configs.space(match), quick):
                constexprs = {"BLOCK_N": config["BLOCK_N"], "BLOCK_E": config["BLOCK_E"], "col_stride": 1, "WIDTH": 80,
                              "ALIGN": 16 // {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}[dtype]}
                specs.append((f"engram {name} {dtype} E80 N{config['BLOCK_N']} E{config['BLOCK_E']} "
                              f"w{config['num_warps']}{tag}", kernel, pointers, constexprs, config["num_warps"], 1))
        for config, tag in _heuristic_then_space(en.BWD.heuristic_config(match), en.BWD.space(match), quick):
            constexprs = {"ACC": tl.float64 if dtype == "fp64" else tl.float32, "BLOCK_E": config["BLOCK_E"]}
            specs.append((f"engram bwd {dtype} E80 E{config['BLOCK_E']} w{config['num_warps']}{tag}",
                          en.engram_gather_bwd_kernel, pointers, constexprs, config["num_warps"], 1))
    for config, tag in _heuristic_then_space(en.HASH.heuristic_config({"heads": 8}), en.HASH.space, quick):
        specs.append((f"engram hash Hh8 T{config['BLOCK_T']} w{config['num_warps']}{tag}", en.engram_hash_kernel,
                      {**ids, "pad_id": "i64"}, {"BLOCK_T": config["BLOCK_T"], "BLOCK_H": 8}, config["num_warps"], 1))
    return specs


def _heuristic_then_space(heuristic, space, quick):
    """(config, label tag): the heuristic config, then (unless quick) every search-space config, tagged
    [space] (candidates of `make tune`, which skips at run time any config that spills)."""
    return [(heuristic, "")] + ([] if quick else [(config, " [space]") for config in space])


def kernel_specs(quick):
    """Every search-space config of the attention kernels at bf16 D64/D128 (the first config of each
    with --quick), labelled [space]: candidates of `make tune`, which skips at run time any config that
    spills; then each kernel's heuristic config, fitted to the H100's shared memory, at every dtype and
    head dim it accepts (what runs where no tuned table entry matches)."""
    import torch
    import triton.language as tl

    from musetalk_fast.kernels import gated_attention as ga
    from musetalk_fast.kernels import sinkhorn as sk
    from musetalk_fast.kernels.float64_scalars import float64_scalars

    attention = {"fwd": ga.FWD, "bwd": ga.BWD, "dq": ga.DQ, "bwd_preprocess": ga.PREPROCESS}
    specs = []
    for head_dim in (64, 128):
        for is_causal in (False, True):
            match = {"dtype": "bf16", "D": head_dim, "causal": is_causal}
            for kind, configs in attention.items():
                space = configs.space(match) if callable(configs.space) else configs.space
                for config in space[:1] if quick else space:  # what `make tune` may time
                    label, *spec = _attention_spec(kind, configs, match, config)
                    specs.append((label + " [space]", *spec))
            if quick:
                break
    for dtype in ("bf16", "fp16", "fp32", "fp64"):
        quick_dims = (64, 128, 256) if dtype == "bf16" else (128,)  # D128: the bench shapes', the most shared memory
        for head_dim in quick_dims if quick else (16, 32, 64, 128, 256):
            for is_causal in (False,) if quick else (False, True):
                match = {"dtype": dtype, "D": head_dim, "causal": is_causal}
                for kind, configs in attention.items():
                    specs.append(_attention_spec(kind, configs, match, configs.heuristic_config(match, H100_SHARED_BYTES)))
                    if dtype != "fp16" and kind != "bwd_preprocess":  # the pointer path: its own heuristic
                        pointers = dict(match, tma=False)
                        label, *spec = _attention_spec(kind, configs, pointers,
                                                       configs.heuristic_config(pointers, H100_SHARED_BYTES))
                        spec[2] = {**spec[2], "USE_TMA": False, "GATE_TMA": False}
                        specs.append((label + " ptr", *spec))
    for kind, configs in attention.items():  # varlen (packed sequences): the same kernels, VARLEN on
        match = {"dtype": "bf16", "D": 128, "causal": True}
        label, *spec = _attention_spec(kind, configs, match, configs.heuristic_config(match, H100_SHARED_BYTES))
        spec[2] = {**spec[2], "VARLEN": True}
        specs.append((label + " varlen", *spec))
    for dtype, acc, torch_dtype in (("fp32", tl.float32, torch.float32), ("fp64", tl.float64, torch.float64)):
        match = {"dtype": dtype, "n": 4}
        for name, configs, kernel, pointers in (
                ("fwd", sk.FWD, sk.sinkhorn_fwd_kernel, ("logits_ptr", "out_ptr")),
                ("bwd", sk.BWD, sk.sinkhorn_bwd_kernel, ("logits_ptr", "grad_ptr", "grad_logits_ptr"))):
            config = configs.heuristic_config(match)
            specs.append((f"sinkhorn {name} {dtype} n=4 B{config['BLOCK_B']} w{config['num_warps']}", kernel,
                          {p: TRITON_TYPES[dtype] for p in pointers},
                          {"ACC": acc, "BLOCK_B": config["BLOCK_B"], "NP": 4, **float64_scalars(torch_dtype, eps=1e-6),
                           **({"UNROLLED_ITERS": sk.unrolled_iters(20, torch_dtype)} if name == "bwd" else {})},
                          config["num_warps"], 1))
    specs += _mhc_specs(quick)
    specs += _engram_specs(quick)
    specs += _indexer_specs(quick)
    specs += _sparse_attention_specs(quick)
    return specs


def _mhc_specs(quick):
    """Each mHC kernel's heuristic config at n = 4 and 8 for bf16, fp32 and fp64 streams (the bench
    shape is bf16 n = 4), and with --quick at bf16 n = 4 only."""
    import torch
    import triton.language as tl

    from musetalk_fast.kernels import mhc
    from musetalk_fast.kernels.sinkhorn import unrolled_iters

    kernels = {
        "pre fwd": (mhc.PRE_FWD, mhc.mhc_pre_fwd_kernel, ("x_ptr", "x_in_ptr"),
                    ("phi_ptr", "alpha_ptr", "bias_ptr", "h_post_ptr", "h_res_ptr", "y_ptr", "r_ptr"), True),
        "post fwd": (mhc.POST_FWD, mhc.mhc_post_fwd_kernel, ("x_ptr", "f_ptr", "out_ptr"),
                     ("h_post_ptr", "h_res_ptr"), False),
        "post bwd": (mhc.POST_BWD, mhc.mhc_post_bwd_kernel, ("grad_ptr", "x_ptr", "f_ptr", "dx_ptr", "df_ptr"),
                     ("h_post_ptr", "h_res_ptr", "dh_post_ptr", "dh_res_ptr"), False),
        "pre bwd token": (mhc.PRE_BWD_TOKEN, mhc.mhc_pre_bwd_token_kernel, ("grad_x_in_ptr", "x_ptr"),
                          ("grad_h_post_ptr", "grad_h_res_ptr", "alpha_ptr", "bias_ptr", "y_ptr", "r_ptr",
                           "h_pre_ptr", "g_s_ptr", "through_r_ptr", "partial_ptr"), False),
        "pre bwd stream": (mhc.PRE_BWD_STREAM, mhc.mhc_pre_bwd_stream_kernel, ("grad_x_in_ptr", "x_ptr", "dx_ptr"),
                           ("phi_ptr", "h_pre_ptr", "g_s_ptr", "through_r_ptr", "dphi_ptr"), True),
    }
    specs = []
    for dtype in ("bf16",) if quick else ("bf16", "fp32", "fp64"):
        coef = "fp64" if dtype == "fp64" else "fp32"
        for n in (4,) if quick else (4, 8):
            padded = mhc.padded_streams(n)
            match = {"dtype": {"bf16": "bfloat16", "fp32": "float32", "fp64": "float64"}[dtype], "n": padded}
            for name, (configs, kernel, streams, coefficients, dots) in kernels.items():
                config = configs.heuristic_config(match)
                constexprs = {"ACC": tl.float64 if dtype == "fp64" else tl.float32, "NP": padded,
                              **{k: v for k, v in config.items() if k.startswith("BLOCK_")}}
                if name == "pre bwd token":  # at the paper's (and the bench's) 20 iterations
                    constexprs["UNROLLED_ITERS"] = unrolled_iters(20, torch.float64 if dtype == "fp64" else torch.float32)
                if dots:
                    constexprs.update(DOT_PRECISION={"bf16": "tf32", "fp32": "tf32x3", "fp64": "ieee"}[dtype],
                                      WC=max(padded, 16))
                pointers = {**{p: TRITON_TYPES[dtype] for p in streams}, **{p: TRITON_TYPES[coef] for p in coefficients}}
                blocks = " ".join(f"{k[6:]}{v}" for k, v in config.items() if k.startswith("BLOCK_"))
                specs.append((f"mhc {name} {dtype} n={n} {blocks} w{config['num_warps']}", kernel, pointers,
                              constexprs, config["num_warps"], config.get("num_stages", 1)))
    return specs


INDEXER_POINTERS = {"k_scale_ptr": "*fp32", "w_ptr": "*fp32", "ks_ptr": "*i32", "ke_ptr": "*i32", "out_ptr": "*fp32"}
INDEXER_TYPES = {"fp8": "*fp8e4nv", **TRITON_TYPES}


def _indexer_specs(quick):
    """The lightning indexer's and top-k's kernels (kernels/lightning_indexer.py, kernels/topk.py) at their
    heuristic configs: fp8 (the wgmma path) at every head count H of the benchmarks and more, every dtype."""
    import triton.language as tl

    from musetalk_fast.kernels import lightning_indexer as li
    from musetalk_fast.kernels import topk

    specs = []

    def add(label, kernel, pointers, constexprs, config):
        blocks = " ".join(f"{k[6]}{v}" for k, v in config.items() if k.startswith("BLOCK_"))
        specs.append((f"{label} {blocks} w{config['num_warps']} s{config.get('num_stages', 1)}", kernel, pointers,
                      {**constexprs, **{k: v for k, v in config.items() if k.startswith("BLOCK_") or k == "CHUNK"}},
                      config["num_warps"], config.get("num_stages", 1)))

    keys = [("fp8", 64), ("fp8", 32)] if quick else [(d, h) for d in ("fp8", "bf16", "fp16", "fp32", "fp64")
                                                     for h in (1, 3, 32, 64, 128)]
    # --quick adds the exact dtypes where spills were found: fp32 and fp64 at 1 and 3 heads (the fused
    # top-k) and at 128 (the backward, heads split in chunks of 32)
    exact = [("fp32", 1), ("fp64", 3), ("fp32", 128), ("fp64", 128)]
    for dtype, heads in keys + ([("bf16", 64)] + exact if quick else []):
        match = {"dtype": dtype, "HP": li.triton.next_power_of_2(heads), "D": 128}
        acc_type = "*fp64" if dtype == "fp64" else "*fp32"
        data = {"q_ptr": INDEXER_TYPES[dtype], "k_ptr": INDEXER_TYPES[dtype]}
        floats = {name: acc_type for name in ("k_scale_ptr", "w_ptr", "out_ptr", "grad_ptr", "dq_ptr", "dw_ptr",
                                              "dk_ptr", "dks_ptr", "buf_val_ptr")}
        pointers = {**INDEXER_POINTERS, **floats, **data, "buf_idx_ptr": "*i32"}
        constexprs = dict(HP=match["HP"], D=128, ACC=tl.float64 if dtype == "fp64" else tl.float32,
                          DOT_PRECISION="ieee" if dtype in ("fp32", "fp64") else "tf32")
        label = f"{dtype} H{heads} D128"
        add(f"lightning_indexer fwd {label}", li.lightning_indexer_fwd_kernel, pointers, constexprs,
            li.FWD.heuristic_config(match, H100_SHARED_BYTES))
        fused = topk.FUSED.heuristic_config(dict(match, k=2048), H100_SHARED_BYTES)
        cap = li.triton.next_power_of_2(2048 + fused["BLOCK_S"])
        add(f"lightning_indexer_topk {label} k2048", topk.lightning_indexer_topk_kernel,
            {**pointers, "out_ptr": "*i32"},
            dict(constexprs, CAP=cap, IS_FP64=dtype == "fp64", KEY_BITS=64 if dtype == "fp64" else 32), fused)
        if dtype != "fp8":  # the backward is for floating inputs
            add(f"lightning_indexer bwd_dq {label}", li.lightning_indexer_bwd_dq_kernel, pointers, constexprs,
                li.BWD_DQ.heuristic_config(match, H100_SHARED_BYTES))
            add(f"lightning_indexer bwd_dk {label}", li.lightning_indexer_bwd_dk_kernel, pointers, constexprs,
                li.BWD_DK.heuristic_config(match, H100_SHARED_BYTES))
    for dtype in ("fp32", "fp64"):
        add(f"topk_indices {dtype}", topk.topk_indices_kernel,
            {"logits_ptr": TRITON_TYPES[dtype], "ks_ptr": "*i32", "ke_ptr": "*i32", "out_ptr": "*i32"},
            dict(HAS_KS=True, HAS_KE=True, IS_FP64=dtype == "fp64", KEY_BITS=64 if dtype == "fp64" else 32),
            topk.TOPK.heuristic_config({"dtype": dtype}))
    for dtype in ("bf16", "fp32", "fp64"):
        add(f"fp8_quantize {dtype}", li.fp8_quantize_kernel,
            {"x_ptr": TRITON_TYPES[dtype], "out_ptr": "*fp8e4nv", "scale_ptr": "*fp32"}, dict(UE8M0=True),
            li.QUANTIZE.heuristic_config({"dtype": dtype}))
    return specs


SPARSE_ATTENTION_STRIDES = ("sq_t", "sq_h", "sk_s", "sk_h", "sv_s", "sv_h", "s_idx_t", "s_idx_h", "sdo_t", "sdo_h")


def _sparse_attention_specs(quick):
    """kernels/sparse_attention.py at its heuristic configs: the benchmarks' GQA group 16 and MQA 64 at
    D128, MHA, MLA's 576/512, every dtype; the deterministic dk/dv segment kernel. Pointers and strides
    are compiled as multiples of 16 (what runs: the gathers vectorise only with that knowledge)."""
    import torch
    import triton.language as tl

    from musetalk_fast.kernels import sparse_attention as sa

    keys = [("bf16", 16, 128, 128), ("bf16", 64, 128, 128)]
    if not quick:
        keys += [(d, h, 128, 128) for d in ("fp16", "fp32", "fp64") for h in (1, 16, 64)] + [
            ("bf16", 1, 128, 128), ("bf16", 64, 576, 512), ("bf16", 128, 576, 512), ("bf16", 16, 64, 64)]
    specs = []
    for dtype, group, qk_dim, v_dim in keys:
        data, stats = TRITON_TYPES[dtype], "*fp64" if dtype == "fp64" else "*fp32"
        pointers = {**{n: data for n in ("Q", "K", "V", "Out", "DOut", "DQ")}, "Idx": "*i32", "Order": "*i64",
                    "Offsets": "*i64", **{n: stats for n in ("Lse", "DLse", "DK", "DV", "PBuf", "DSBuf")}}
        block_dqk, block_dt = sa.qk_blocks(qk_dim)
        block_dv = max(sa.triton.next_power_of_2(v_dim), 16)
        match = dict(dtype=dtype, H=sa.head_block(group, block_dqk + block_dt, block_dv, dtype in ("fp32", "fp64")),
                     Dqk=block_dqk + block_dt, Dv=block_dv)
        constexprs = dict(QK_DIM=qk_dim, V_DIM=v_dim, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv,
                          ACC=tl.float64 if dtype == "fp64" else tl.float32)
        dot = dict(DOT_PRECISION="tf32" if dtype in ("bf16", "fp16") else "ieee")
        # float64 also passes its softmax scales as constexprs (exact on the GPU): compiled as it runs
        q_dtype = torch.float64 if dtype == "fp64" else torch.float32
        fwd_scales, bwd_scales = (sa.exact_scales(q_dtype, qk_dim ** -0.5, backward) for backward in (False, True))
        label = f"sparse_attention {{}} {dtype} G{group}/{match['H']} D{qk_dim}/{v_dim}"
        for name, configs, kernel, extra in (
                ("fwd", sa.FWD, sa.sparse_attention_fwd_kernel,
                 dict(dot, BLOCK_H=match["H"], KEYS_AS_M=False, BLOCK_DT=block_dt, **fwd_scales)),
                ("bwd", sa.BWD, sa.sparse_attention_bwd_kernel,
                 dict(dot, BLOCK_H=match["H"], DETERMINISTIC=False, BLOCK_DT=block_dt, **bwd_scales)),
                ("bwd_det", sa.BWD, sa.sparse_attention_bwd_kernel,
                 dict(dot, BLOCK_H=match["H"], DETERMINISTIC=True, BLOCK_DT=block_dt, **bwd_scales)),
                ("bwd_dkdv_det", sa.DKDV, sa.sparse_attention_bwd_dkdv_kernel,
                 dict(BLOCK_H=min(match["H"], 16), BLOCK_DQK=max(sa.triton.next_power_of_2(qk_dim), 16)))):
            config = configs.heuristic_config(match, H100_SHARED_BYTES)
            blocks = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
            divisible = [arg for arg in kernel.arg_names if arg in pointers or arg in SPARSE_ATTENTION_STRIDES]
            specs.append((f"{label.format(name)}{' keys-as-M' if blocks.get('KEYS_AS_M') else ''} "
                          f"K{blocks.get('BLOCK_K', '-')} w{config['num_warps']} "
                          f"s{config.get('num_stages', 1)}", kernel, pointers, {**constexprs, **extra, **blocks},
                          config["num_warps"], config.get("num_stages", 1), divisible))
    return specs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one config per kernel")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--only", metavar="PREFIX", help="only the kernels whose label starts with PREFIX")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("hopper_compile: unset TRITON_INTERPRET (the interpreter does not compile kernels)")

    rows, failures = [], 0
    print(f"{'kernel':<66}{'regs':>6}{'stack B':>9}{'spill B':>9}{'smem KB':>9}{'wgmma':>7}")
    for label, fn, pointers, constexprs, warps, stages, *divisible in kernel_specs(args.quick):
        if args.only and not label.startswith(args.only):
            continue
        try:
            usage = compile_sm90(fn, pointers, constexprs, warps, stages, *divisible)
        except Exception as error:  # report every failing kernel, then fail
            failures += 1
            print(f"{label:<66}  FAILED: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
            rows.append({"kernel": label, "error": str(error)})
            continue
        fits = usage["shared_bytes"] <= H100_SHARED_BYTES
        failures += not fits
        print(f"{label:<66}{usage['registers']:>6}{usage['stack_bytes']:>9}{usage['spill_bytes']:>9}"
              f"{usage['shared_bytes'] / 1024:>9.1f}"
              f"{'yes' if usage['wgmma'] else 'no':>7}{'' if fits else '  TOO MUCH SHARED MEMORY'}")
        rows.append({"kernel": label, **usage})
    if args.json:
        command = "python -m musetalk_fast.bench.hopper_compile " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.json).write_text(json.dumps({"command": command, "target": "cuda sm_90", "rows": rows}, indent=1))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
