"""The decoder LM: embed -> blocks -> final norm -> LM head (DESIGN.md, "Layers are pure functions").

A block is pre-norm: x + mixer(norm(x)), then x + mlp(norm(x)) when the layer has an MLP. Which
mixer each layer has comes from `ModelConfig.layers`. `DecoderLM.__call__(tokens, cache=None)`
returns (logits, cache): no cache is training / full forward; a cache tuple (from `init_cache`)
is prefill / decode.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.config import ModelConfig
from zoo.layers import MIXERS
from zoo.layers.mlp import SwiGLU
from zoo.layers.norms import RMSNorm
from zoo.layers.params import constrain, weight


class Block(nn.Module):
    config: ModelConfig
    index: int

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache=None, shared_kv=None, return_kv=False):
        cfg = self.config
        sharing = {}
        if shared_kv is not None:
            sharing["shared_kv"] = shared_kv
        if return_kv:
            sharing["return_kv"] = True
        layer = cfg.layers[self.index]
        mixer = MIXERS[layer.mixer].module(
            layer.mixer_config, cfg.d_model, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
            name="mixer",
        )
        out = mixer(
            RMSNorm(cfg.norm_eps, param_dtype=cfg.param_dtype, name="mixer_norm")(x),
            positions=positions, segment_ids=segment_ids, cache=cache, **sharing,
        )
        x = x + out[0].astype(x.dtype)
        if layer.mlp:
            mlp = SwiGLU(cfg.mlp_hidden, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), name="mlp")
            x = x + mlp(RMSNorm(cfg.norm_eps, param_dtype=cfg.param_dtype, name="mlp_norm")(x)).astype(x.dtype)
        x = constrain(x, ("batch", "length", "embed"))
        return (x, *out[1:])


REMAT_POLICIES = {
    "none": None,
    # Keep the projections' outputs, recompute what is quadratic in the chunk or the sequence
    # (attention scores, chunked-scan intermediates) in the backward pass.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Keep only each block's input; recompute the whole block.
    "full": jax.checkpoint_policies.nothing_saveable,
}


class DecoderLM(nn.Module):
    """`remat` (a key of REMAT_POLICIES) trades recomputation for activation memory in training; it
    is not part of the model's definition and changes no parameter or output."""

    config: ModelConfig
    remat: str = "none"

    @nn.compact
    def __call__(self, tokens, *, positions=None, segment_ids=None, cache=None):
        cfg = self.config
        batch, length = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)
        if cache is not None and len(cache) != cfg.n_layers:
            raise ValueError(f"cache has {len(cache)} layers, the model {cfg.n_layers}")

        embed = weight(
            self, "embed", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
            init=nn.initializers.normal(0.02), dtype=jnp.dtype(cfg.param_dtype),
        )
        x = jnp.take(embed, tokens, axis=0).astype(jnp.dtype(cfg.dtype))
        x = constrain(x, ("batch", "length", "embed"))

        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        block = Block
        if self.remat != "none" and cache is None:
            block = nn.remat(Block, policy=REMAT_POLICIES[self.remat], static_argnums=(6,))  # return_kv
        sources = cfg.kv_sources()
        views, new_cache = {}, []
        for i, layer in enumerate(cfg.layers):
            source = getattr(layer.mixer_config, "shared_kv_source", None)
            out = block(cfg, i, name=f"layer_{i}")(
                x, positions, segment_ids, None if cache is None else cache[i],
                None if source is None else views[source], i in sources,
            )
            x = out[0]
            new_cache.append(out[1])
            if i in sources:
                views[i] = out[2]

        x = RMSNorm(cfg.norm_eps, param_dtype=cfg.param_dtype, name="final_norm")(x)
        if cfg.tie_embeddings:
            logits = jnp.einsum("btd,vd->btv", x, embed.astype(x.dtype), preferred_element_type=jnp.float32)
        else:
            head = weight(self, "lm_head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), dtype=jnp.dtype(cfg.param_dtype))
            logits = jnp.einsum("btd,dv->btv", x, head.astype(x.dtype), preferred_element_type=jnp.float32)
        logits = constrain(logits, ("batch", "length", "vocab"))
        return logits, (None if cache is None else tuple(new_cache))


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> tuple:
    """One cache per layer (each mixer's own `init_cache`); a layer that reads another layer's KV gets
    an empty one, a recurrent layer a fixed-size state."""
    dtype = jnp.dtype(config.dtype) if dtype is None else dtype
    return tuple(
        MIXERS[l.mixer].module(l.mixer_config, config.d_model).init_cache(batch, max_len, dtype) for l in config.layers
    )


def init_params(config: ModelConfig, key: jax.Array):
    """Parameters (logical-axis boxes removed) for `DecoderLM(config)`."""
    return nn.unbox(_jitted_init(config)(key, jnp.zeros((1, 8), jnp.int32))["params"])


@functools.cache
def _jitted_init(config: ModelConfig):
    # One compiled program per config: op by op, flax's init compiles each small op on its own (16 s instead of
    # 10 s for a two-layer hybrid on a CPU).
    return jax.jit(DecoderLM(config).init)


def param_shapes(config: ModelConfig):
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def count_params(config: ModelConfig) -> int:
    """Number of parameters, computed from shapes only (no memory is allocated)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(param_shapes(config)))


def cache_bytes(cache) -> int:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache))


def decode_state_bytes(config: ModelConfig, context: int, dtype=jnp.bfloat16) -> dict[str, int]:
    """Bytes of one sequence's decode cache at `context` tokens, split into the attention layers'
    caches (which grow with context, up to their window) and the recurrent layers' fixed states.
    Computed from shapes only: nothing is allocated."""
    shapes = jax.eval_shape(lambda: init_cache(config, 1, context, dtype))
    split = {"attention": 0, "recurrent": 0}
    for layer, cache in zip(config.layers, shapes):
        split["recurrent" if MIXERS[layer.mixer].recurrent else "attention"] += cache_bytes(cache)
    return split
