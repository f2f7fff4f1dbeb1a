"""A sequence classifier on zoo's blocks: embed -> blocks -> final norm -> mean over the tokens that are not
padding -> linear head. Token id 0 is padding, and padding sits at the end: the mixers are causal, so it never
changes what the real tokens see, and it is left out of the mean (as in the S4 and LRA classifiers' pooling)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from zoo.config import ModelConfig
from zoo.layers.norms import RMSNorm
from zoo.layers.params import weight
from zoo.model import Block


class SequenceClassifier(nn.Module):
    config: ModelConfig
    num_classes: int

    @nn.compact
    def __call__(self, tokens):
        cfg = self.config
        batch, length = tokens.shape
        real = tokens != 0
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        embed = weight(self, "embed", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                       init=nn.initializers.normal(0.02), dtype=jnp.dtype(cfg.param_dtype))
        x = jnp.take(embed, tokens, axis=0).astype(jnp.dtype(cfg.dtype))
        for i in range(cfg.n_layers):
            x = Block(cfg, i, name=f"layer_{i}")(x, positions, real.astype(jnp.int32))[0]
        x = RMSNorm(cfg.norm_eps, param_dtype=cfg.param_dtype, name="final_norm")(x).astype(jnp.float32)
        pooled = jnp.sum(x * real[..., None], axis=1) / jnp.maximum(jnp.sum(real, axis=1, keepdims=True), 1)
        head = weight(self, "head", (cfg.d_model, self.num_classes), ("embed", None), dtype=jnp.dtype(cfg.param_dtype))
        bias = weight(self, "head_bias", (self.num_classes,), (None,), init=nn.initializers.zeros,
                      dtype=jnp.dtype(cfg.param_dtype))
        return pooled @ head.astype(jnp.float32) + bias.astype(jnp.float32)
