"""Flash attention for training and prefill: causal, sliding window, attention sinks (tokens and logits),
packed documents, GQA, and MLA's split no-RoPE / RoPE scores, with a Pallas backward (ops.flash_attention)."""

from zoo.pallas_kernels.flash_attention.ops import flash_attention

__all__ = ["flash_attention"]
