"""Naive float64 NumPy references for the attention family: explicit per-(query, key) visibility
loops and an explicit softmax, written independently of zoo's jnp code (RoPE here is a complex
rotation of feature pairs, not zoo's rotate-half)."""

from __future__ import annotations

import numpy as np

# Tolerances against these float64 references, per compute dtype: max |zoo - ref| / max |ref|.
TOLERANCE = {"float32": 1e-5, "bfloat16": 4e-2}
# RetNet normalises each head's retention output (GroupNorm, eps 1e-6). Where a head's output nearly
# cancels (q.k ~ 0, e.g. on a document's first token) its variance is near eps, and float32 rounding
# of that dot product passes through undamped: at worst ~ u |q||k||v| / sqrt(eps) ~ 1e-3 of the output
# (measured: 1e-4 in 1 of 40 seeds of the tiny model). Two float32 paths through RetNet agree to this.
RETNET_FLOAT32_TOLERANCE = 1e-3
# Gradients through that GroupNorm, chunked vs step form of the tiny retention mixer
# (test_gradients_of_chunked_match_naive), 50 seeds: median 5.6e-7, p99 5.8e-4, max 9.4e-4 (seed 41);
# CI on 2026-11-23 hit 3.2e-4 (seed 1788449748) against the generic 1e-4.
RETNET_GRAD_FLOAT32_TOLERANCE = 5e-3
# mLSTM on the scan kernels against xlstm.mlstm_chunked (test_mlstm_scan_matches_the_chunkwise_form), float32
# gradients of q, k, v and both gates, 181 seeds: median 6.9e-7, p99 4.5e-6, max 1.3e-5 (seed 40480990, which CI
# drew on 2026-12-01; its normalisers were 1.2e-3 from their switch, so not the kink: float32 rounding of the
# exponential gates summed over the chunks) against the generic 1e-5.
MLSTM_SCAN_GRAD_FLOAT32_TOLERANCE = 5e-5
# The same in bf16 (the kernels' matmuls take bf16 operands: scores, gated keys, the carried state), relative RMS
# against the float32 chunked form on the same bf16 inputs (bench/mlstm_scan_tolerance.py), 73 draws (seeds 0-71
# and CI's 809549362): h, v and the C gradient at most 1.6%, but the gradients of q, k and both gates, which pass
# through the normaliser's division and the exponential gates, median 0.6-0.7%, p95 2.5-3.4%, max 5.8% (log_i,
# seed 13). CI hit 4.4% (k, seed 809549362) against the generic 4e-2 on 2026-12-05.
MLSTM_SCAN_GRAD_BF16_RMS_TOLERANCE = 8e-2
# The xLSTM[7:1] model stacks seven mLSTM blocks, each dividing by its normaliser max(|n.q|, exp(-m))
# and then normalising each head (LayerNorm): the same near-cancellation as RetNet's, damped by the
# normaliser's floor. Measured: 2.0e-5 for decode vs forward (seed 2015419404, CI on 2026-11-22),
# within 1e-5 for other seeds seen.
XLSTM_MODEL_FLOAT32_TOLERANCE = 1e-4
# Gated DeltaNet's chunked form solves (I + A) X = rhs per chunk (the UT transform), whose float32
# rounding grows with the system's conditioning (beta near 1, similar consecutive keys); decode applies
# the rank-one updates token by token. Decode vs forward of the tiny gdn model, 30 seeds: median 4e-6,
# max 1.08e-5 (seed 10; CI on 2026-11-23 also hit it).
GATED_DELTA_MODEL_FLOAT32_TOLERANCE = 5e-5
# bf16 decode vs forward of the tiny retnet model, relative RMS over the logits: 120 seeds median 0.1%,
# max 0.66%; seed 1968383146 (2026-11-23) gave 4.16%, failing on main as well: a head whose GroupNorm
# variance is near eps amplifies one bf16 rounding difference. 6e-2 keeps that outlier's class.
RETNET_BF16_RMS_TOLERANCE = 6e-2
# The mLSTM core divides by its normaliser max(|n.q|, exp(-m)); where |n.q| is small the float32 rounding
# of C q and n.q is amplified. Chunked and step forms vs the float64 loop (test_mlstm_core_matches_reference,
# length 37), 300 seeds: median 8.4e-7, p99 9.3e-6, max 1.49e-5 (seed 234); CI hit 1.14e-5 (seed 173106801).
MLSTM_CORE_FLOAT32_TOLERANCE = 5e-5
# The same division in the gradients: chunked vs step form of the tiny mLSTM mixer
# (test_gradients_of_chunked_match_naive), every leaf but the input-gate bias (see that test), 100 seeds:
# median 2.0e-6, p99 1.3e-4, max 6.1e-4 (seed 89, on every leaf at once); CI hit 1.7e-4 (seed 173106801).
MLSTM_GRAD_FLOAT32_TOLERANCE = 3e-3
MODEL_FLOAT32_TOLERANCE = {"xlstm-7-1": XLSTM_MODEL_FLOAT32_TOLERANCE, "gdn": GATED_DELTA_MODEL_FLOAT32_TOLERANCE,
                           "gdn-h1": GATED_DELTA_MODEL_FLOAT32_TOLERANCE, "gdn-h2": GATED_DELTA_MODEL_FLOAT32_TOLERANCE}


def tolerance(mixer_or_family: str, dtype: str) -> float:
    if dtype == "float32" and mixer_or_family == "retnet":
        return RETNET_FLOAT32_TOLERANCE
    if dtype == "float32" and mixer_or_family in MODEL_FLOAT32_TOLERANCE:
        return MODEL_FLOAT32_TOLERANCE[mixer_or_family]
    return TOLERANCE[dtype]


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def relative_rms_error(actual, expected) -> float:
    """||actual - expected||_F / ||expected||_F: steadier than the max-based error for approximations."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def rope(x, positions, base, rotary_dim=None):
    """x [B,T,H,D]; pairs (i, i + r/2) of the first r features rotate by angle p * base^(-2i/r)."""
    x = np.asarray(x, np.float64)
    r = x.shape[-1] if rotary_dim is None else rotary_dim
    half = r // 2
    z = x[..., :half] + 1j * x[..., half:r]
    theta = np.asarray(positions, np.float64)[:, :, None, None] * base ** (-np.arange(half) * 2.0 / r)
    z = z * np.exp(1j * theta)
    return np.concatenate([z.real, z.imag, x[..., r:]], axis=-1)


def visible(q_pos, q_seg, k_pos, k_seg, window=None, sink_tokens=0) -> bool:
    if k_pos < 0 or k_seg != q_seg or k_pos > q_pos:
        return False
    if window is None:
        return True
    return q_pos - k_pos < window or k_pos < sink_tokens


def softmax_attend(q, k, v, positions, segment_ids, *, scale, window=None, sink_tokens=0, sink_logits=None,
                   k_positions=None, k_segment_ids=None):
    """q [B,T,H,D], k/v [B,S,KV,*]; head h reads kv head h // (H/KV)."""
    k_positions = positions if k_positions is None else k_positions
    k_segment_ids = segment_ids if k_segment_ids is None else k_segment_ids
    batch, length, heads, _ = q.shape
    group = heads // k.shape[2]
    out = np.zeros((batch, length, heads, v.shape[-1]))
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                logits, values = [], []
                for j in range(k.shape[1]):
                    if visible(positions[b, i], segment_ids[b, i], k_positions[b, j], k_segment_ids[b, j], window, sink_tokens):
                        logits.append(scale * q[b, i, h] @ k[b, j, h // group])
                        values.append(v[b, j, h // group])
                logits = np.array(logits)
                top = logits.max() if sink_logits is None else max(logits.max(), sink_logits[h])
                weights = np.exp(logits - top)
                denominator = weights.sum() + (0.0 if sink_logits is None else np.exp(sink_logits[h] - top))
                out[b, i, h] = (weights / denominator) @ np.array(values)
    return out


def f64(tree):
    import jax

    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def attention(params, x, positions, segment_ids, cfg):
    p = f64(params)
    x = np.asarray(x, np.float64)

    def project(name):
        y = np.einsum("btd,dhk->bthk", x, p[name])
        return y + p[f"{name}_bias"] if cfg.qkv_bias else y

    q = rope(project("q_proj"), positions, cfg.rope_base, cfg.rotary_dim)
    k = rope(project("k_proj"), positions, cfg.rope_base, cfg.rotary_dim)
    out = softmax_attend(q, k, project("v_proj"), positions, segment_ids, scale=cfg.head_dim**-0.5,
                         window=cfg.window, sink_tokens=cfg.sink_tokens, sink_logits=p.get("sink_logits"))
    return np.einsum("bthk,hkd->btd", out, p["o_proj"])


def rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def mla(params, x, positions, segment_ids, cfg):
    """DeepSeek-V2 MLA, expanded form, straight from the paper's equations."""
    p = f64(params)
    x = np.asarray(x, np.float64)
    nope, rank = cfg.qk_nope_head_dim, cfg.kv_lora_rank
    if cfg.q_lora_rank:
        q = np.einsum("btc,chk->bthk", rms_norm(x @ p["q_down"], p["q_norm"], cfg.norm_eps), p["q_up"])
    else:
        q = np.einsum("btd,dhk->bthk", x, p["q_proj"])
    compressed = x @ p["kv_down"]
    c = rms_norm(compressed[..., :rank], p["kv_norm"], cfg.norm_eps)
    k_pe = rope(compressed[..., None, rank:], positions, cfg.rope_base)
    k_nope = np.einsum("btr,rhn->bthn", c, p["k_up"])
    heads = k_nope.shape[2]
    k = np.concatenate([k_nope, np.repeat(k_pe, heads, axis=2)], axis=-1)
    q = np.concatenate([q[..., :nope], rope(q[..., nope:], positions, cfg.rope_base)], axis=-1)
    v = np.einsum("btr,rhv->bthv", c, p["v_up"])
    out = softmax_attend(q, k, v, positions, segment_ids, scale=(nope + cfg.qk_rope_head_dim) ** -0.5)
    return np.einsum("bthv,hvd->btd", out, p["o_proj"])
