"""The truth for decode_attention: flash_attention's reference (zoo.layers.attention's dense masked softmax)
with one query per row."""

from __future__ import annotations

from zoo.pallas_kernels.flash_attention.reference import flash_attention_reference


def decode_attention_reference(q, k, v, k_pos, k_seg, q_pos, q_seg, *, scale, window=None, sink_tokens=0,
                               sink_logits=None):
    """q [B, H, D], k [B, S, KV, D], v [B, S, KV, Dv], k_pos / k_seg [B, S], q_pos / q_seg [B] -> [B, H, Dv]."""
    out = flash_attention_reference((q[:, None],), (k,), v, q_pos[:, None], q_seg[:, None], k_pos, k_seg, scale=scale,
                                    window=window, sink_tokens=sink_tokens, sink_logits=sink_logits)
    return out[:, 0]
