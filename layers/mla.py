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

Kernels (`impl`): the expanded form runs zoo.pallas_kernels.flash_attention with two score parts (the
no-RoPE features against per-head keys, the RoPE features against the one shared key), and single-token
decode runs zoo.pallas_kernels.mla_decode.latent_decode (one softmax per latent shard, a psum over the
"tensor" mesh axis for TPLA). That decode writes the new token first and attends slots 0 .. position,
which is the mask's answer for a full-context cache filled in order (slot = position; any stale slot
beyond the position is in the future). Caches are allocated in multiples of the decode kernel's block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zoo.errors import ConfigError
from zoo.layers.attention import MASKED
from zoo.layers.kv_cache import SlotCache
from zoo.layers.norms import rms_norm
from zoo.layers.params import weight
from zoo.layers.rope import apply_rope
from zoo.pallas_kernels.dispatch import IMPLS
from zoo.pallas_kernels.flash_attention import flash_attention
from zoo.pallas_kernels.mla_decode import latent_decode

CACHE_BLOCK = 64  # latent caches hold a multiple of this many slots: mla_decode's block, read in place

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
    impl: str = "auto"  # prefill attention and decode kernels: "auto" (Pallas on GPUs), "xla", "pallas", "interpret"
    # RMSNorm on the latent (DeepSeek-V2). Off in models converted from GQA, whose keys and values are linear in x.
    kv_norm: bool = True
    # One inverse frequency per RoPE pair (qk_rope_head_dim / 2); None: rope_base's geometric series. Set by
    # conversion from GQA, where the shared RoPE key carries pairs of the source's heads at their own frequencies.
    rope_frequencies: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.rope_frequencies is not None:  # JSON gives a list; configs must stay hashable
            object.__setattr__(self, "rope_frequencies", tuple(float(f) for f in self.rope_frequencies))

    def validate(self, field: str) -> None:
        if self.impl not in IMPLS:
            raise ConfigError(f"{field}.impl", f"must be one of {IMPLS}, got {self.impl!r}")
        for name in ("num_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{field}.{name}", f"must be positive, got {getattr(self, name)}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"{field}.qk_rope_head_dim", f"must be even for RoPE, got {self.qk_rope_head_dim}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError(f"{field}.q_lora_rank", f"must be positive or null, got {self.q_lora_rank}")
        if self.rope_frequencies is not None and len(self.rope_frequencies) * 2 != self.qk_rope_head_dim:
            raise ConfigError(f"{field}.rope_frequencies", f"needs qk_rope_head_dim / 2 = {self.qk_rope_head_dim // 2} "
                                                           f"entries, got {len(self.rope_frequencies)}")

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
        batch, -(-max_len // CACHE_BLOCK) * CACHE_BLOCK,
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
        q_pe = self._rope(q[..., nope:], positions)

        kv_down = self._w("kv_down", (self.d_model, rank + rope_dim), ("embed", "latent"))
        kv_norm = self._w("kv_norm", (rank,), ("latent",), init=nn.initializers.ones) if cfg.kv_norm else None
        k_up = self._w("k_up", (rank, heads, nope), ("latent", "heads", "head_dim"))
        v_up = self._w("v_up", (rank, heads, cfg.v_head_dim), ("latent", "heads", "head_dim"))
        o_proj = self._w("o_proj", (heads, cfg.v_head_dim, self.d_model), ("heads", "head_dim", "embed"), fan_in_axes=2)
        transform = self._latent_transform()

        compressed = x @ kv_down
        c = compressed[..., :rank] if kv_norm is None else rms_norm(compressed[..., :rank], kv_norm, cfg.norm_eps)
        k_pe = self._rope(compressed[..., None, rank:], positions)[:, :, 0]
        scale = qk_dim**-0.5

        stored = None if cache is None else (c if transform is None else c @ transform)
        if cache is None or x.shape[1] > 1:  # expanded MLA form: training, and prefill over the cache's view
            keys_c, keys_pe, key_pos, key_seg, new_cache = c, k_pe, positions, segment_ids, None
            if cache is not None:
                entries, key_pos, key_seg = cache.view(self._entries(stored, k_pe), positions, segment_ids)
                new_cache = cache.write(self._entries(stored, k_pe), positions, segment_ids)
                keys_c = entries["c_kv"].astype(self.dtype).reshape(*entries["c_kv"].shape[:2], rank)
                keys_c = keys_c if transform is None else keys_c @ transform.T  # R is orthogonal
                keys_pe = entries["k_pe"].astype(self.dtype)
            k_nope = jnp.einsum("bsr,rhn->bshn", keys_c, k_up)
            v = jnp.einsum("bsr,rhv->bshv", keys_c, v_up)
            out = flash_attention((q_nope, q_pe), (k_nope, keys_pe[:, :, None]), v, positions, segment_ids, key_pos,
                                  key_seg, scale=scale, impl=cfg.impl)
            return jnp.einsum("bthv,hvd->btd", out, o_proj), new_cache

        # Single-token decode: the absorbed form over the latent cache, one softmax per latent shard.
        shards = cfg.shards
        q_lat = jnp.einsum("bhn,rhn->bhr", q_nope[:, 0], k_up)
        if transform is not None:
            q_lat = q_lat @ transform
            v_up = jnp.einsum("rs,rhv->shv", transform, v_up)
        new_cache = cache.write(self._entries(stored, k_pe), positions, segment_ids)
        out = latent_decode(
            q_lat.reshape(q_lat.shape[0], heads, shards, rank // shards), q_pe[:, 0],
            new_cache.entries["c_kv"].astype(self.dtype), new_cache.entries["k_pe"].astype(self.dtype),
            positions[:, 0] + 1, v_up.reshape(shards, rank // shards, heads, cfg.v_head_dim), scale=scale, impl=cfg.impl,
        )
        return jnp.einsum("bhv,hvd->bd", out.astype(self.dtype), o_proj)[:, None], new_cache

    def _rope(self, x, positions):
        return apply_rope(x, positions, base=self.config.rope_base, frequencies=self.config.rope_frequencies)

    def _entries(self, stored_c, k_pe):
        shards = self.config.shards
        return {"c_kv": stored_c.reshape(*stored_c.shape[:2], shards, stored_c.shape[-1] // shards), "k_pe": k_pe}

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        return latent_init_cache(self.config, batch, max_len, dtype)
