"""GQA / MHA attention layers to MLA (or TPLA) layers, in the manner of MHA2MLA (Ji et al. 2025, arXiv
2502.14837) and TransMLA (Meng et al. 2025, arXiv 2502.07864).

For each converted layer with query weights Wq [D, H, Dh], keys Wk and values Wv [D, KV, Dh]:
1. Partial RoPE. Of each KV group's RoPE pairs, `rope_pairs` keep their rotation ("high": the highest
   frequencies, MHA2MLA's S_high; "norm": the pairs whose query and key weights have the largest norm product
   in that group, a weight-only stand-in for MHA2MLA's 2-norm selection). The kept pairs of all groups form
   MLA's one shared RoPE key k_pe of width P = KV * 2 * rope_pairs, laid out so that MLA's rotate-half pairs
   are the source's pairs, each at its own frequency (MLAConfig.rope_frequencies); a query head's RoPE
   features are zero outside its own group's block, so q_pe . k_pe is exactly the source's score over the
   kept pairs. The other pairs lose their rotation (the approximation MHA2MLA fine-tunes away) and join the
   no-RoPE features, n = Dh - 2 * rope_pairs of them per head.
2. Low rank. The no-RoPE key weights and the value weights of all groups, M = [Wk_nope | Wv] of shape
   [D, KV * (n + Dh)], are factored jointly by SVD, M ~ (U S^1/2)(S^1/2 V^T) truncated to `rank`: the first
   factor is MLA's kv_down (latent part), the second its k_up / v_up, repeated over the heads of each group.
   At full rank (min(D, KV * (n + Dh))) the factorisation is exact.
3. Scales. MLA scores with (n + P)^-1/2, the source with Dh^-1/2 (and YaRN's attention factor squared on
   rotated features); the ratio is folded into the query weights. The latent has no RMSNorm (kv_norm=False),
   so keys and values stay linear in x as in the source.
With every RoPE pair kept and full rank, the converted layer computes the source layer's function up to
float rounding (tested). The decode cache per token and layer shrinks from 2 * KV * Dh to rank + P.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from zoo.config import ModelConfig
from zoo.errors import ConfigError
from zoo.layers.attention import AttentionConfig
from zoo.layers.mla import MLAConfig, TPLAConfig
from zoo.layers.rope import rope_attention_factor, rope_inverse_frequencies
from zoo.train.mesh import host_array

ROPE_KEEP = ("high", "norm")


@dataclasses.dataclass(frozen=True)
class MLAConversion:
    rank: int | None = None  # latent width; None: full rank (exact factorisation)
    rope_pairs: int = 4  # RoPE pairs kept per KV group
    keep: str = "high"  # which pairs: one of ROPE_KEEP
    tp: int | None = None  # convert to TPLA with this many latent shards (Hadamard transform)
    layers: tuple[int, ...] | None = None  # which layers; None: every attention layer

    def validate(self) -> None:
        if self.keep not in ROPE_KEEP:
            raise ConfigError("keep", f"must be one of {ROPE_KEEP}, got {self.keep!r}")
        if self.rope_pairs < 1:
            raise ConfigError("rope_pairs", f"must be at least 1, got {self.rope_pairs}")
        if self.rank is not None and self.rank < 1:
            raise ConfigError("rank", f"must be positive, got {self.rank}")


def _check_layer(i: int, a: AttentionConfig, conversion: MLAConversion) -> None:
    """Raise ConfigError unless layer i converts with these settings."""
    field = f"layers[{i}]"
    problems = [name for name, bad in (("q/k/v biases", a.qkv_bias), ("a sliding window", a.window is not None),
                                       ("sink tokens or logits", a.sink_tokens or a.sink_logits),
                                       ("shared KV", a.shared_kv_source is not None)) if bad]
    if problems:
        raise ConfigError(field, f"has {', '.join(problems)}: MLA conversion takes plain causal GQA/MHA layers")
    pairs = (a.rotary_dim or a.head_dim) // 2
    if conversion.rope_pairs > pairs:
        raise ConfigError("rope_pairs", f"layer {i} has only {pairs} RoPE pairs per head, {conversion.rope_pairs} asked")
    if conversion.rope_pairs == pairs and a.rotary_dim in (None, a.head_dim):
        raise ConfigError("rope_pairs", f"keeping all {pairs} pairs of layer {i} leaves no no-RoPE features; keep fewer")


def _kept_pairs(wq, wk, pairs: int, keep_count: int, keep: str) -> list[np.ndarray]:
    """Per KV group, the sorted indices of the RoPE pairs that keep their rotation."""
    if keep == "high":  # inverse frequencies fall with the pair index
        return [np.arange(keep_count)] * wk.shape[1]
    heads_per_group = wq.shape[1] // wk.shape[1]
    chosen = []
    for g in range(wk.shape[1]):
        q = wq[:, g * heads_per_group:(g + 1) * heads_per_group]
        score = [np.linalg.norm(q[..., [i, i + pairs]]) * np.linalg.norm(wk[:, g][:, [i, i + pairs]])
                 for i in range(pairs)]
        chosen.append(np.sort(np.argsort(score)[::-1][:keep_count]))
    return chosen


def convert_layer(a: AttentionConfig, p: dict, *, rank: int | None, rope_pairs: int, keep: str, norm_eps: float,
                  index: int = 0) -> tuple[MLAConfig, dict, dict]:
    """(MLAConfig, MLA params, report) for one attention layer's config and params."""
    wq, wk, wv, wo = (host_array(p[n]).astype(np.float64) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    dtype = np.dtype(p["q_proj"].dtype)
    d_model, heads, head_dim = wq.shape
    groups = wk.shape[1]
    heads_per_group = heads // groups
    rotary = a.rotary_dim or head_dim
    pairs = rotary // 2
    inv_freq = np.asarray(rope_inverse_frequencies(rotary, a.rope_base, a.rope_scaling), np.float64)
    magnitude = rope_attention_factor(a.rope_scaling) ** 2  # YaRN scales rotated features' scores
    kept = _kept_pairs(wq, wk, pairs, rope_pairs, keep)

    rope_width = groups * 2 * rope_pairs
    half = rope_width // 2
    nope = head_dim - 2 * rope_pairs
    rope_dims = [np.concatenate([k, k + pairs]) for k in kept]
    nope_dims = [np.setdiff1d(np.arange(head_dim), d) for d in rope_dims]
    rotated = np.zeros(head_dim, bool)
    rotated[:rotary] = True

    q_scale = np.sqrt((nope + rope_width) / head_dim)
    q_proj = np.zeros((d_model, heads, nope + rope_width))
    k_pe = np.zeros((d_model, rope_width))
    frequencies = np.zeros(half)
    for g in range(groups):
        slots = np.concatenate([g * rope_pairs + np.arange(rope_pairs), half + g * rope_pairs + np.arange(rope_pairs)])
        k_pe[:, slots] = wk[:, g][:, rope_dims[g]]
        frequencies[g * rope_pairs:(g + 1) * rope_pairs] = inv_freq[kept[g]]
        for h in range(g * heads_per_group, (g + 1) * heads_per_group):
            nope_scale = np.where(rotated[nope_dims[g]], magnitude, 1.0) * q_scale
            q_proj[:, h, :nope] = wq[:, h][:, nope_dims[g]] * nope_scale
            q_proj[:, h, nope + slots] = wq[:, h][:, rope_dims[g]] * magnitude * q_scale

    joint = np.concatenate([np.stack([wk[:, g][:, nope_dims[g]] for g in range(groups)], 1).reshape(d_model, -1),
                            wv.reshape(d_model, -1)], axis=1)
    u, s, vt = np.linalg.svd(joint, full_matrices=False)
    full_rank = s.shape[0]
    rank = full_rank if rank is None else rank
    if rank > full_rank:
        raise ConfigError("rank", f"layer {index}'s joint K/V matrix has rank at most {full_rank}, {rank} asked")
    root = np.sqrt(s[:rank])
    down, up = u[:, :rank] * root, root[:, None] * vt[:rank]
    k_up = up[:, :groups * nope].reshape(rank, groups, nope)
    v_up = up[:, groups * nope:].reshape(rank, groups, head_dim)
    group_of = np.arange(heads) // heads_per_group

    config = MLAConfig(num_heads=heads, kv_lora_rank=rank, qk_nope_head_dim=nope, qk_rope_head_dim=rope_width,
                       v_head_dim=head_dim, rope_base=a.rope_base, norm_eps=norm_eps, impl=a.impl, kv_norm=False,
                       rope_frequencies=tuple(frequencies.tolist()))
    params = {"q_proj": q_proj, "kv_down": np.concatenate([down, k_pe], axis=1), "k_up": k_up[:, group_of],
              "v_up": v_up[:, group_of], "o_proj": wo}
    energy = float(np.sum(s[:rank] ** 2) / np.sum(s**2))
    report = {"layer": index, "rank": rank, "full_rank": full_rank, "kv_energy_kept": energy,
              "rope_pairs": [k.tolist() for k in kept], "cache_per_token": rank + rope_width,
              "source_cache_per_token": 2 * groups * head_dim}
    return config, {k: v.astype(dtype) for k, v in params.items()}, report


def convert_model(config: ModelConfig, params: dict, conversion: MLAConversion) -> tuple[ModelConfig, dict, list]:
    """(config, params, per-layer reports) with the chosen attention layers replaced by MLA (or TPLA) layers."""
    conversion.validate()
    chosen = conversion.layers if conversion.layers is not None else tuple(
        i for i, l in enumerate(config.layers) if l.mixer == "attention")
    if not chosen:
        raise ConfigError("layers", "the model has no attention layer to convert")
    layers, params, reports = list(config.layers), dict(params), []
    for i in chosen:
        if not 0 <= i < config.n_layers or config.layers[i].mixer != "attention":
            raise ConfigError("layers", f"layer {i} is not an attention layer of this {config.n_layers}-layer model")
        _check_layer(i, config.layers[i].mixer_config, conversion)
        mla_config, mla_params, report = convert_layer(
            config.layers[i].mixer_config, params[f"layer_{i}"]["mixer"], rank=conversion.rank,
            rope_pairs=conversion.rope_pairs, keep=conversion.keep, norm_eps=config.norm_eps, index=i)
        mixer = "mla"
        if conversion.tp is not None:
            mla_config = TPLAConfig(**dataclasses.asdict(mla_config), tp=conversion.tp, transform="hadamard")
            mixer = "tpla"
        layers[i] = dataclasses.replace(layers[i], mixer=mixer, mixer_config=mla_config)
        params[f"layer_{i}"] = {**params[f"layer_{i}"], "mixer": mla_params}
        reports.append(report)
    return config.replace(layers=tuple(layers)), params, reports

