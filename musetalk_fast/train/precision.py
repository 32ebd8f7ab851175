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


def transformer_engine():
    """The transformer_engine.pytorch module, or None when it is not installed (or no GPU)."""
    if not torch.cuda.is_available():
        return None
    try:
        import transformer_engine.pytorch as te
    except ImportError:
        return None
    return te


def use_fp8_linears(model):
    """Swap every nn.Linear whose sizes fp8 GEMMs take (multiples of 16) for te.Linear with the same
    weights; returns (the number swapped, a context manager for the forward: te.fp8_autocast). Without
    Transformer Engine it swaps nothing and warns once; the context is then a null one."""
    te = transformer_engine()
    if te is None:
        warnings.warn("fp8 linears asked for, but transformer-engine (with a GPU) is not available: "
                      "training without them (pip install transformer-engine[pytorch])", stacklevel=2)
        return 0, contextlib.nullcontext
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and child.in_features % 16 == 0 and child.out_features % 16 == 0:
                linear = te.Linear(child.in_features, child.out_features, bias=child.bias is not None,
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
    return swapped, lambda: te.fp8_autocast(enabled=True)
