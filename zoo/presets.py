"""The preset registry: named model configs for CPU tests and demos ("tiny") and real sizes.

A preset name is FAMILY-SIZE, e.g. "gqa-125m" or "mla-tiny". `zoo presets` prints each with its
parameter count. Families:
  gqa, mqa, mha   global causal attention with RoPE (Llama-style blocks)
  streaming       sliding window + StreamingLLM sink tokens in every layer: constant decode memory
  swa-sinks       gpt-oss layout: sliding-window layers with learned sink logits, alternating with global
  mixattention    MixAttention (Rajput et al. 2024): one global layer in four, the rest sliding
                  window, KV shared across layers (globals reuse layer 0; sliding layers in pairs)
  mla             DeepSeek-V2 multi-head latent attention
  tpla            the MLA model decoded tensor-parallel (tp=2, Hadamard); loads MLA checkpoints
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from zoo.config import LayerConfig, ModelConfig
from zoo.layers.attention import AttentionConfig
from zoo.layers.mla import MLAConfig, TPLAConfig
from zoo.tokenizer import ByteTokenizer


@dataclass(frozen=True)
class Size:
    d_model: int
    n_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_hidden: int
    vocab_size: int
    max_seq_len: int
    window: int
    kv_lora_rank: int
    rope_head_dim: int


SIZES = {
    # Byte-level vocabulary, trains in minutes on a laptop CPU.
    "tiny": Size(64, 4, 4, 2, 16, 176, ByteTokenizer.padded_vocab_size, 512, 32, 32, 8),
    # Real sizes: a 32k vocabulary (Llama / Mistral tokenizers), RoPE base 10k, tied embeddings.
    "125m": Size(768, 12, 12, 4, 64, 3072, 32000, 4096, 1024, 256, 32),
    "350m": Size(1024, 24, 16, 8, 64, 3072, 32000, 4096, 1024, 512, 64),
    "1.3b": Size(2048, 24, 16, 8, 128, 6144, 32000, 4096, 2048, 512, 64),
}


def _attention(s: Size, **kw) -> LayerConfig:
    return LayerConfig("attention", AttentionConfig(s.num_heads, s.num_kv_heads, s.head_dim, **kw))


def _model(s: Size, layers) -> ModelConfig:
    return ModelConfig(
        vocab_size=s.vocab_size, d_model=s.d_model, mlp_hidden=s.mlp_hidden, layers=tuple(layers),
        max_seq_len=s.max_seq_len,
    )


def gqa(s: Size) -> ModelConfig:
    return _model(s, [_attention(s)] * s.n_layers)


def mqa(s: Size) -> ModelConfig:
    return gqa(Size(**{**s.__dict__, "num_kv_heads": 1}))


def mha(s: Size) -> ModelConfig:
    return gqa(Size(**{**s.__dict__, "num_kv_heads": s.num_heads}))


def streaming(s: Size) -> ModelConfig:
    return _model(s, [_attention(s, window=s.window, sink_tokens=4)] * s.n_layers)


def swa_sinks(s: Size) -> ModelConfig:
    local = _attention(s, window=s.window, sink_logits=True)
    return _model(s, [local if i % 2 == 0 else _attention(s) for i in range(s.n_layers)])


def mixattention(s: Size) -> ModelConfig:
    layers = []
    for i in range(s.n_layers):
        if i % 4 == 0:
            layers.append(_attention(s, shared_kv_source=None if i == 0 else 0))
        else:
            layers.append(_attention(s, window=s.window, shared_kv_source=i - 1 if i % 4 in (2,) else None))
    return _model(s, layers)


def _latent(s: Size, config_type, **kw) -> ModelConfig:
    mixer = "mla" if config_type is MLAConfig else "tpla"
    cfg = config_type(
        num_heads=s.num_heads, kv_lora_rank=s.kv_lora_rank, qk_nope_head_dim=s.head_dim,
        qk_rope_head_dim=s.rope_head_dim, v_head_dim=s.head_dim, **kw,
    )
    return _model(s, [LayerConfig(mixer, cfg)] * s.n_layers)


def mla(s: Size) -> ModelConfig:
    return _latent(s, MLAConfig)


def tpla(s: Size) -> ModelConfig:
    return _latent(s, TPLAConfig, tp=2, transform="hadamard")


FAMILIES: dict[str, Callable[[Size], ModelConfig]] = {
    "gqa": gqa, "mqa": mqa, "mha": mha, "streaming": streaming, "swa-sinks": swa_sinks,
    "mixattention": mixattention, "mla": mla, "tpla": tpla,
}
PRESETS: dict[str, Callable[[], ModelConfig]] = {
    f"{family}-{size}": (lambda f=build, s=spec: f(s)) for family, build in FAMILIES.items() for size, spec in SIZES.items()
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
