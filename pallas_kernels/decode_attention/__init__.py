"""GQA / MQA / MHA decode: one query token per sequence over a key/value cache read in place (full or ring
buffer, masked by the slots' positions), split-K over long contexts, learned sink logits (ops.decode_attention)."""

from zoo.pallas_kernels.decode_attention.ops import decode_attention

__all__ = ["decode_attention"]
