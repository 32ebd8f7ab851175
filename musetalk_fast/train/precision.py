"""Mixed precision for the trainer: bf16 autocast where the device has it (CPU too) and, optionally,
Transformer Engine fp8 linears when transformer-engine is installed and a GPU is there."""
import contextlib
import warnings

import torch


def autocast(device, enabled=True):
    """torch.autocast to bf16 on `device` (a torch.device or 'cpu'/'cuda'); a null context when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def transformer_engine(device):
    """The transformer_engine.pytorch module, or None when it is not installed or `device` (where the
    model is) is not a GPU."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        import transformer_engine.pytorch as te
    except ImportError:
        return None
    return te


FP8_ROWS = 8  # Transformer Engine's fp8 GEMMs take inputs whose rows (all leading dims) are a multiple of 8


def use_fp8_linears(model):
    """Swap every nn.Linear whose sizes fp8 GEMMs take (multiples of 16) for a te.Linear with the same
    weights (frozen ones stay frozen); returns (the number swapped, fp8(enabled=True): the context for the
    forward, te.fp8_autocast). A swapped linear whose input rows are not a multiple of 8 (the time
    embedding's B or B*F rows) runs that call without fp8. Without Transformer Engine (or with a model
    on the CPU) it swaps nothing and warns; the context is then a null one.

    The caller must run forwards that need exact arithmetic (the finite-difference JVP) under
    fp8(enabled=False), and must not use torch.utils.checkpoint: its recompute runs in the backward,
    outside the fp8 context, so TE's saved fp8 state would not match (the trainer turns it off)."""
    te = transformer_engine(next(model.parameters()).device)
    if te is None:
        warnings.warn("fp8 linears asked for, but transformer-engine with a GPU model is not available: "
                      "training without them (pip install transformer-engine[pytorch])", stacklevel=2)
        return 0, lambda enabled=True: contextlib.nullcontext()
    aligned = _aligned_linear(te)
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and child.in_features % 16 == 0 and child.out_features % 16 == 0:
                linear = aligned(child.in_features, child.out_features, bias=child.bias is not None,
                                 params_dtype=child.weight.dtype, device=child.weight.device)
                with torch.no_grad():
                    linear.weight.copy_(child.weight)
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                for mine, theirs in ((linear.weight, child.weight), (linear.bias, child.bias)):
                    if theirs is not None:  # a frozen linear (stage 1's Engram) stays frozen
                        mine.requires_grad_(theirs.requires_grad)
                linear.train(child.training)
                setattr(module, name, linear)
                swapped += 1
    return swapped, lambda enabled=True: te.fp8_autocast(enabled=enabled)


def _aligned_linear(te):
    """te.Linear that runs a call without fp8 when its input rows are not a multiple of FP8_ROWS (TE
    asserts on those); same parameters and state-dict keys as te.Linear."""
    class AlignedLinear(te.Linear):
        def forward(self, inp, *args, **kwargs):
            if (inp.numel() // max(inp.shape[-1], 1)) % FP8_ROWS:
                with te.fp8_autocast(enabled=False):
                    return super().forward(inp, *args, **kwargs)
            return super().forward(inp, *args, **kwargs)

    return AlignedLinear
