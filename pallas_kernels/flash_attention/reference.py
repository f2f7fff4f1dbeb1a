"""The truth for flash_attention: zoo.layers.attention's dense masked softmax (tested there against a
per-query NumPy loop), with the score parts joined into one head dimension."""

from __future__ import annotations

import math

import jax.numpy as jnp


def flash_attention_reference(qs, ks, v, q_pos, q_seg, k_pos, k_seg, *, scale, window=None, sink_tokens=0,
                              sink_logits=None):
    """qs / ks: tuples of parts [B, T, H, D_i] / [B, S, KV_i, D_i]; v [B, S, KV, Dv]. Returns [B, T, H, Dv]."""
    from zoo.layers.attention import attention_mask, dot_product_attention  # layers import the kernels

    if len(qs) == 1 and ks[0].shape[2] == v.shape[2]:  # one grouped key (GQA): no repeat
        q, k = qs[0], ks[0]
    else:
        kv_heads = math.lcm(v.shape[2], *(k.shape[2] for k in ks))  # divides H: each count does
        q = jnp.concatenate(qs, axis=-1)
        k = jnp.concatenate([jnp.repeat(k, kv_heads // k.shape[2], axis=2) for k in ks], axis=-1)
        v = jnp.repeat(v, kv_heads // v.shape[2], axis=2)
    mask = attention_mask(q_pos, q_seg, k_pos, k_seg, window=window, sink_tokens=sink_tokens)
    return dot_product_attention(q, k, v, mask, scale=scale, sink_logits=sink_logits)
