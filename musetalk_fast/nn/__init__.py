"""Drop-in nn.Modules built on the ops."""
from .gated_attention import GatedAttention  # noqa: F401
