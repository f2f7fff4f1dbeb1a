"""Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434) and its tensor-parallel decode, TPLA
(Tang et al. 2025, arXiv 2508.15881).

MLA. Keys and values come from a low-rank latent c = RMSNorm(x W_DKV) of width kv_lora_rank:
k_nope_h = c W_UK_h, v_h = c W_UV_h. Position enters through a decoupled RoPE key k_pe = RoPE(x W_KR)
shared by all heads, and a per-head RoPE query part. Queries are optionally low-rank too
(c_q = RMSNorm(x W_DQ), q = c_q W_UQ). Training / prefill uses this expanded form. Decode caches
only (c, k_pe) per token and uses the absorbed form: W_UK_h is folded into the query
(q_lat_h = W_UK_h q_nope_h, scored against c directly) and W_UV_h is applied after attention.

TPLA. Decode with the latent split into `tp` shards of kv_lora_rank/tp: each shard scores its slice
of q_lat against its slice of c (plus the full RoPE score, which every shard keeps), runs its own
softmax, and produces its partial output through its rows of W_UV; the partial outputs are summed
(the all-reduce). Before slicing, an orthogonal transform R of the latent (Hadamard, or PCA from
calibration latents) spreads or orders its energy; R cancels exactly in full MLA (c R R^T = c),
so the MLA weights load unchanged. Prefill (cache=None, or more than one new token) runs in MLA
form; single-token decode runs sharded. With tp=1 and no transform TPLA is MLA, bit for bit.
Under a mesh the shard dimension carries the logical name "latent_shards" (mapped to "tensor").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zoo.errors import ConfigError
from zoo.layers.attention import MASKED, attention_mask, dot_product_attention
from zoo.layers.kv_cache import SlotCache
from zoo.layers.norms import rms_norm
from zoo.layers.params import constrain, weight
from zoo.layers.rope import apply_rope

TRANSFORMS = ("none", "hadamard", "pca")


@dataclass(frozen=True)
class MLAConfig:
    num_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-6

    def validate(self, field: str) -> None:
        for name in ("num_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{field}.{name}", f"must be positive, got {getattr(self, name)}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"{field}.qk_rope_head_dim", f"must be even for RoPE, got {self.qk_rope_head_dim}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError(f"{field}.q_lora_rank", f"must be positive or null, got {self.q_lora_rank}")

    @property
    def shards(self) -> int:
        return 1


@dataclass(frozen=True)
class TPLAConfig(MLAConfig):
    tp: int = 2
    transform: str = "hadamard"

    def validate(self, field: str) -> None:
        super().validate(field)
        if self.tp <= 0 or self.kv_lora_rank % self.tp:
            raise ConfigError(f"{field}.tp", f"must be positive and divide kv_lora_rank={self.kv_lora_rank}, got {self.tp}")
        if self.transform not in TRANSFORMS:
            raise ConfigError(f"{field}.transform", f"must be one of {TRANSFORMS}, got {self.transform!r}")
        if self.transform == "hadamard" and self.kv_lora_rank & (self.kv_lora_rank - 1):
            raise ConfigError(f"{field}.transform", f"hadamard needs a power-of-two kv_lora_rank, got {self.kv_lora_rank}")

    @property
    def shards(self) -> int:
        return self.tp


def hadamard_matrix(n: int) -> np.ndarray:
    """Orthonormal Sylvester-Hadamard matrix of size n (a power of two)."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    if h.shape[0] != n:
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    return h / np.sqrt(n)


def pca_transform(latents: jax.Array) -> jax.Array:
    """Orthogonal R whose columns are the principal directions of calibration latents [N, r],
    largest variance first. Put it in a TPLA layer's params as "latent_transform"."""
    latents = jnp.asarray(latents, jnp.float32).reshape(-1, latents.shape[-1])
    covariance = latents.T @ latents / latents.shape[0]
    eigenvalues, eigenvectors = jnp.linalg.eigh(covariance)
    return eigenvectors[:, jnp.argsort(-eigenvalues)]


def latent_attention(q_lat, q_pe, c, k_pe, mask, *, scale: float):
    """Absorbed latent attention over G shards, each with its own softmax.

    q_lat [B,T,H,G,r/G], q_pe [B,T,H,P], c [B,S,G,r/G], k_pe [B,S,P], mask [B,T,S]
    -> per-shard latent outputs [B,T,H,G,r/G]. G=1 is MLA's absorbed decode.
    """
    rope_scores = jnp.einsum("bthp,bsp->bhts", q_pe, k_pe, preferred_element_type=jnp.float32)
    latent_scores = jnp.einsum("bthgr,bsgr->bghts", q_lat, c, preferred_element_type=jnp.float32)
    logits = (latent_scores + rope_scores[:, None]) * scale
    logits = jnp.where(mask[:, None, None], logits, MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(c.dtype)
    return jnp.einsum("bghts,bsgr->bthgr", probs, c)


def latent_init_cache(config: MLAConfig, batch: int, max_len: int, dtype) -> SlotCache:
    shards = config.shards
    return SlotCache.create(
        batch, max_len,
        {"c_kv": (shards, config.kv_lora_rank // shards), "k_pe": (config.qk_rope_head_dim,)},
        dtype,
        axes={"c_kv": ("latent_shards", "latent_shard_dim"), "k_pe": ("head_dim",)},
    )


class MLA(nn.Module):
    """MLA with an MLAConfig; TPLA decode with a TPLAConfig (same parameters). Mixer protocol."""

    config: MLAConfig
    d_model: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _w(self, name, shape, axes, **kw):
        return weight(self, name, shape, axes, dtype=self.param_dtype, **kw).astype(self.dtype)

    def _latent_transform(self):
        cfg = self.config
        transform = getattr(cfg, "transform", "none")
        if transform == "hadamard":
            return jnp.asarray(hadamard_matrix(cfg.kv_lora_rank), self.dtype)
        if transform == "pca":
            return self._w("latent_transform", (cfg.kv_lora_rank, cfg.kv_lora_rank), ("latent", None),
                           init=lambda key, shape, dtype: jnp.eye(shape[0], dtype=dtype))
        return None

    @nn.compact
    def __call__(self, x, *, positions, segment_ids, cache=None):
        cfg = self.config
        heads, rank = cfg.num_heads, cfg.kv_lora_rank
        nope, rope_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        qk_dim = nope + rope_dim
        x = x.astype(self.dtype)

        if cfg.q_lora_rank:
            q_down = self._w("q_down", (self.d_model, cfg.q_lora_rank), ("embed", "q_latent"))
            q_norm = self._w("q_norm", (cfg.q_lora_rank,), ("q_latent",), init=nn.initializers.ones)
            q_up = self._w("q_up", (cfg.q_lora_rank, heads, qk_dim), ("q_latent", "heads", "head_dim"))
            q = jnp.einsum("btc,chk->bthk", rms_norm(x @ q_down, q_norm, cfg.norm_eps), q_up)
        else:
            q = jnp.einsum("btd,dhk->bthk", x, self._w("q_proj", (self.d_model, heads, qk_dim), ("embed", "heads", "head_dim")))
        q_nope = q[..., :nope]
        q_pe = apply_rope(q[..., nope:], positions, base=cfg.rope_base)

        kv_down = self._w("kv_down", (self.d_model, rank + rope_dim), ("embed", "latent"))
        kv_norm = self._w("kv_norm", (rank,), ("latent",), init=nn.initializers.ones)
        k_up = self._w("k_up", (rank, heads, nope), ("latent", "heads", "head_dim"))
        v_up = self._w("v_up", (rank, heads, cfg.v_head_dim), ("latent", "heads", "head_dim"))
        o_proj = self._w("o_proj", (heads, cfg.v_head_dim, self.d_model), ("heads", "head_dim", "embed"), fan_in_axes=2)
        transform = self._latent_transform()

        compressed = x @ kv_down
        c = rms_norm(compressed[..., :rank], kv_norm, cfg.norm_eps)
        k_pe = apply_rope(compressed[..., None, rank:], positions, base=cfg.rope_base)[:, :, 0]
        scale = qk_dim**-0.5

        if cache is None:  # expanded MLA form
            k_nope = jnp.einsum("btr,rhn->bthn", c, k_up)
            v = jnp.einsum("btr,rhv->bthv", c, v_up)
            k = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe[:, :, None], (*k_nope.shape[:3], rope_dim))], axis=-1)
            q_full = jnp.concatenate([q_nope, q_pe], axis=-1)
            mask = attention_mask(positions, segment_ids, positions, segment_ids)
            out = dot_product_attention(q_full, k, v, mask, scale=scale)
            return jnp.einsum("bthv,hvd->btd", out, o_proj), None

        # Absorbed form over the latent cache.
        q_lat = jnp.einsum("bthn,rhn->bthr", q_nope, k_up)
        if transform is not None:
            c, q_lat = c @ transform, q_lat @ transform
            v_up = jnp.einsum("rs,rhv->shv", transform, v_up)
        shards = cfg.shards if x.shape[1] == 1 else 1  # prefill chunks run in MLA form
        stored = c.reshape(*c.shape[:2], cfg.shards, rank // cfg.shards)
        entries, view_pos, view_seg = cache.view({"c_kv": stored, "k_pe": k_pe}, positions, segment_ids)
        new_cache = cache.write({"c_kv": stored, "k_pe": k_pe}, positions, segment_ids)

        view_c = entries["c_kv"].astype(self.dtype).reshape(*entries["c_kv"].shape[:2], shards, rank // shards)
        view_c = constrain(view_c, ("batch", "length", "latent_shards", "latent_shard_dim"))
        q_lat = q_lat.reshape(*q_lat.shape[:3], shards, rank // shards)
        mask = attention_mask(positions, segment_ids, view_pos, view_seg)
        o_lat = latent_attention(q_lat, q_pe, view_c, entries["k_pe"].astype(self.dtype), mask, scale=scale)
        # Each shard's partial output through its rows of W_UV; the sum over shards is the all-reduce.
        out = jnp.einsum("bthgr,grhv->bthv", o_lat, v_up.reshape(shards, rank // shards, heads, cfg.v_head_dim))
        return jnp.einsum("bthv,hvd->btd", out, o_proj), new_cache

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        return latent_init_cache(self.config, batch, max_len, dtype)
