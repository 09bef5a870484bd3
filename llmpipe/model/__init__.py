"""The decoder-only transformer and KV-cache generation, single device."""

from llmpipe.model.generate import generate, sample_next
from llmpipe.model.model import KVCache, Transformer, flops_per_token, parameter_count

__all__ = ["KVCache", "Transformer", "flops_per_token", "generate", "parameter_count", "sample_next"]
