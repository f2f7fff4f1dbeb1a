"""Attention layers replaced by recurrent layers initialised from their weights, the starting point of
distillation into hybrids ("The Mamba in the Llama", Wang et al. 2024, arXiv 2408.15237; MOHAWK, Bick et al.
2024, arXiv 2408.10189).

Linear attention is softmax attention without the softmax: y_t = sum_s (q_t . k_s) v_s. Each recurrent family
here is a gated, normalised form of it, so the attention layer's projections map onto it directly:
  Mamba-2          C <- Q, B <- K, x <- V, out_proj <- O      (one B/C group per query head, state width Dh)
  Gated DeltaNet   q <- Q, k <- K, v <- V, o_proj <- O         (value width Dh: expand_v = 1)
  RetNet           q <- Q, k <- K, v <- V, o_proj <- O         (value width Dh: value_factor = 1; keeps the RoPE base)
  mLSTM            q <- Q, k <- K, v <- V, down_proj <- O      (the xLSTM 7B dense layout, layers/xlstm.py)
GQA key/value heads are repeated over their query heads. What attention has no counterpart for keeps the
family's own initialisation (decay / gate projections and biases, output gates, norms), except where a
neutral value keeps the layer closest to linear attention: short convolutions start as the identity
(weight 1 on the current token, no bias), Mamba-2's skip D starts at 0, and mLSTM's output gate starts
constant (zero weights: sigmoid 1/2, which its norm weight of 2 undoes). The 1/sqrt(Dh) score scale is
folded into C / q where the family does not normalise q itself (Gated DeltaNet L2-normalises q and k).
The MLPs, norms and embeddings of the model are kept as they are.

Student layouts are written as one letter per layer (`layout_from_pattern`): A keeps the attention layer, S keeps
it with a sliding window, M / G / R / X replace it with Mamba-2 / Gated DeltaNet / RetNet / mLSTM.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zoo.config import ModelConfig
from zoo.errors import ConfigError
from zoo.layers import MIXERS
from zoo.layers.attention import AttentionConfig
from zoo.layers.gated_deltanet import GatedDeltaNetConfig
from zoo.layers.mamba2 import Mamba2Config
from zoo.layers.retnet import RetNetConfig
from zoo.layers.xlstm import MLSTMConfig
from zoo.train.mesh import host_array

LETTERS = {"A": "attention", "S": "sliding", "M": "mamba2", "G": "gated_deltanet", "R": "retnet", "X": "mlstm"}
RECURRENT = ("mamba2", "gated_deltanet", "retnet", "mlstm")


def recurrent_config(kind: str, a: AttentionConfig):
    """The recurrent mixer config that takes attention config `a`'s weights."""
    if kind == "mamba2":
        return Mamba2Config(num_heads=a.num_heads, head_dim=a.head_dim, state_dim=a.head_dim, num_groups=a.num_heads,
                            impl=a.impl)
    if kind == "gated_deltanet":
        return GatedDeltaNetConfig(num_heads=a.num_heads, head_dim=a.head_dim, expand_v=1, impl=a.impl)
    if kind == "retnet":
        return RetNetConfig(num_heads=a.num_heads, head_dim=a.head_dim, value_factor=1, rope_base=a.rope_base,
                            impl=a.impl)
    if kind == "mlstm":
        return MLSTMConfig(num_heads=a.num_heads, inner_dim=a.num_heads * a.head_dim, layout="dense", impl=a.impl)
    raise ConfigError("kind", f"must be one of {RECURRENT}, got {kind!r}")


def _identity_conv(kernel: np.ndarray) -> np.ndarray:
    out = np.zeros_like(kernel)
    out[-1] = 1.0  # short_conv's last tap is the current token
    return out


@functools.cache
def _family_init(kind: str, config, d_model: int):
    """The family's jitted init, compiled once per layer shape. Its initial values come from running it on the
    host through the XLA form: building a student should not compile accelerator kernels (on a GPU, the Pallas
    kernels took minutes to compile here)."""
    return jax.jit(MIXERS[kind].module(dataclasses.replace(config, impl="xla"), d_model).init)


def init_from_attention(kind: str, a: AttentionConfig, attention: dict, d_model: int, key: jax.Array,
                        param_dtype=jnp.float32) -> tuple[object, dict]:
    """(mixer config, params) of a `kind` layer initialised from one attention layer's config and params."""
    if a.shared_kv_source is not None:
        raise ConfigError("layers", "a layer that reads another layer's KV has no K/V weights to initialise from")
    if a.qkv_bias:
        raise ConfigError("layers", "attention with q/k/v biases has no recurrent counterpart here (biases would be lost)")
    config = recurrent_config(kind, a)
    host = jax.local_devices(backend="cpu")[0]
    with jax.default_device(host):
        x, ones = jnp.zeros((1, 4, d_model), jnp.float32), jnp.ones((1, 4), jnp.int32)
        variables = _family_init(kind, config, d_model)(jax.device_put(key, host), x, positions=jnp.arange(4)[None],
                                                        segment_ids=ones)
    fresh = {name: np.array(value) for name, value in nn.unbox(variables["params"]).items()}
    wq, wk, wv, wo = (host_array(attention[n]).astype(np.float32) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    group_of = np.arange(a.num_heads) // (a.num_heads // a.num_kv_heads)
    wk, wv = wk[:, group_of], wv[:, group_of]
    scale = a.head_dim**-0.5
    if kind == "mamba2":
        fresh.update(c_proj=wq * scale, b_proj=wk, x_proj=wv, out_proj=wo, D=np.zeros_like(fresh["D"]))
        for name in ("x", "b", "c"):
            fresh[f"{name}_conv"] = _identity_conv(fresh[f"{name}_conv"])
            fresh[f"{name}_conv_bias"] = np.zeros_like(fresh[f"{name}_conv_bias"])
    elif kind == "gated_deltanet":
        fresh.update(q_proj=wq, k_proj=wk, v_proj=wv, o_proj=wo)
        for name in ("q", "k", "v"):
            fresh[f"{name}_conv"] = _identity_conv(fresh[f"{name}_conv"])
    elif kind == "mlstm":  # the cell scales q by 1/sqrt(Dh) itself
        fresh.update(q_proj=wq, k_proj=wk, v_proj=wv, down_proj=wo, out_gate=np.zeros_like(fresh["out_gate"]),
                     out_norm=np.full_like(fresh["out_norm"], 2.0))
    else:
        fresh.update(q_proj=wq, k_proj=wk, v_proj=wv, o_proj=wo)  # RetNet scales k by 1/sqrt(Dh) itself
    return config, {name: value.astype(param_dtype) for name, value in fresh.items()}


def full_attention_layers(config: ModelConfig) -> list[int]:
    """Attention layers without a window that keep their own K/V: the ones incremental distillation replaces and
    DuoAttention splits."""
    return [i for i, layer in enumerate(config.layers) if layer.mixer == "attention"
            and layer.mixer_config.window is None and layer.mixer_config.shared_kv_source is None]


def layout_from_pattern(pattern: str, n_layers: int) -> list[str]:
    """"AMAM" -> ["attention", "mamba2", "attention", "mamba2"]; a pattern shorter than the model repeats."""
    if not pattern or any(c not in LETTERS for c in pattern):
        bad = next((c for c in pattern if c not in LETTERS), "")
        raise ConfigError("student_pattern", f"letters are {', '.join(f'{k}={v}' for k, v in LETTERS.items())}; "
                                             f"got {pattern!r}" + (f" ({bad!r} unknown)" if bad else ""))
    if n_layers % len(pattern):
        raise ConfigError("student_pattern", f"{len(pattern)} letters do not tile {n_layers} layers")
    return [LETTERS[c] for c in pattern * (n_layers // len(pattern))]


def hybrid_from_attention(config: ModelConfig, params: dict, layout: list[str], key: jax.Array, *,
                          window: int | None = None) -> tuple[ModelConfig, dict, list[int]]:
    """(config, params, replaced layer indices): each attention layer of `config` kept, windowed or replaced
    as `layout` says, the replacements initialised from its weights; every other weight kept."""
    if len(layout) != config.n_layers:
        raise ConfigError("student_pattern", f"{len(layout)} entries for {config.n_layers} layers")
    layers, params, replaced = list(config.layers), dict(params), []
    keys = jax.random.split(key, config.n_layers)
    for i, target in enumerate(layout):
        layer = config.layers[i]
        if target == "attention":
            continue
        if layer.mixer != "attention":
            raise ConfigError(f"layers[{i}]", f"is {layer.mixer!r}; only attention layers are replaced")
        if target == "sliding":
            if window is None:
                raise ConfigError("window", "the pattern has S (sliding-window attention) but no window was given")
            layers[i] = dataclasses.replace(layer, mixer_config=dataclasses.replace(layer.mixer_config, window=window))
            continue
        mixer_config, mixer_params = init_from_attention(
            target, layer.mixer_config, params[f"layer_{i}"]["mixer"], config.d_model, keys[i],
            param_dtype=jnp.dtype(config.param_dtype))
        layers[i] = dataclasses.replace(layer, mixer=target, mixer_config=mixer_config)
        params[f"layer_{i}"] = {**params[f"layer_{i}"], "mixer": mixer_params}
        replaced.append(i)
    return config.replace(layers=tuple(layers)), params, replaced
