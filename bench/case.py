"""A benchmark case: one shape of one op, our implementation and its baselines."""
from dataclasses import dataclass, field
from typing import Callable, Dict


@dataclass
class Case:
    op: str  # op family and pass, e.g. "gated_attention fwd"
    shape: str  # human-readable shape
    ours: Dict[str, Callable[[], object]]  # our implementation(s): name -> zero-argument callable
    baselines: Dict[str, Callable[[], object]]  # the best alternatives on the same device
    flops: float = 0.0  # useful FLOPs of one call (matmul-bound ops)
    bytes: float = 0.0  # minimum HBM bytes of one call (memory-bound ops)
    roofline: str = "copy"  # which measured peak bounds it: "bf16", "fp32", "copy", "h2d" (pinned host to GPU)
    items: int = 0  # things one call makes (the model rows: video frames); rows then get items_per_s (FPS)
    notes: Dict[str, str] = field(default_factory=dict)
