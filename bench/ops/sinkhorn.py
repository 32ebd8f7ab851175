"""sinkhorn over N tokens' n x n mixing logits: ours vs eager PyTorch and torch.compile of the
reference (the open mHC ports run it as unfused torch ops). Memory-bound: read logits, write P."""
import torch

import musetalk_fast
from musetalk_fast import reference
from musetalk_fast.ops.library import has_cuda_kernel

from ..case import Case

ITERS = 20


def _fwd_bwd(fn, logits, grad):
    def run():
        x = logits.detach().requires_grad_()
        fn(x).backward(grad)

    return run


def cases(device):
    tokens_list = [1 << 16, 1 << 20] if device == "cuda" else [1 << 12]
    n = 4
    compiled = torch.compile(lambda x: reference.sinkhorn(x, ITERS))
    out = []
    for tokens in tokens_list:
        logits = torch.randn(tokens, n, n, device=device)
        grad = torch.randn_like(logits)
        ours = {"ours": lambda: musetalk_fast.ops.sinkhorn(logits, ITERS)}
        if device == "cuda" and has_cuda_kernel("sinkhorn_cudacpp"):
            ours["ours (CUDA C++)"] = lambda: torch.ops.musetalk_fast.sinkhorn_cudacpp(logits, ITERS, 1e-6)
        shape = f"N={tokens} n={n} iters={ITERS} fp32"
        nbytes = 2 * logits.numel() * 4
        out.append(Case("sinkhorn fwd", shape, ours,
                        {"torch eager": lambda: reference.sinkhorn(logits, ITERS), "torch.compile": lambda: compiled(logits)},
                        bytes=nbytes))
        out.append(Case("sinkhorn fwd+bwd", shape,
                        {"ours": _fwd_bwd(lambda x: musetalk_fast.ops.sinkhorn(x, ITERS), logits, grad)},
                        {"torch eager": _fwd_bwd(lambda x: reference.sinkhorn(x, ITERS), logits, grad),
                         "torch.compile": _fwd_bwd(compiled, logits, grad)},
                        bytes=2 * nbytes))
    return out
