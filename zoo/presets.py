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
Recurrent and hybrid families (constant-size decode state in every non-attention layer):
  mamba2          pure Mamba-2 stack, mixer-only blocks (Dao & Gu 2024; as mamba2-130m..1.3b)
  mamba2-hybrid   Mamba-2-Hybrid (Waleffe et al. 2024): ~1 global attention layer in 7, MLP in every block
  samba           Samba (Ren et al. 2024): Mamba and sliding-window attention alternating, MLP in every
                  block (Mamba-2 layers stand in for the paper's Mamba-1)
  gdn             Gated DeltaNet with an MLP in every block (Yang et al. 2024)
  gdn-h1          Gated DeltaNet-H1: Gated DeltaNet and sliding-window attention alternating
  gdn-h2          Gated DeltaNet-H2: Mamba-2, Gated DeltaNet, sliding-window attention repeating
  retnet          RetNet (Sun et al. 2023): multi-scale retention + MLP
  xlstm-7-1       xLSTM[7:1] (Beck et al. 2024): seven mLSTM blocks (no MLP) to one sLSTM block (with MLP)
  s4d             S4D-Inv, ZOH (Gu et al. 2022) + MLP
Real sizes of these families repeat their layer pattern to about the parameter budget of the gqa
model of the same size (layer costs differ), so the ~125M / 350M / 1.3B names hold.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from zoo.config import LayerConfig, ModelConfig
from zoo.layers.attention import AttentionConfig
from zoo.layers.gated_deltanet import GatedDeltaNetConfig
from zoo.layers.mamba2 import Mamba2Config
from zoo.layers.mla import MLAConfig, TPLAConfig
from zoo.layers.retnet import RetNetConfig
from zoo.layers.s4d import S4DConfig
from zoo.layers.xlstm import MLSTMConfig, SLSTMConfig
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
    ssm_head_dim: int  # Mamba-2 head width
    state_dim: int  # Mamba-2 / S4D state size


SIZES = {
    # Byte-level vocabulary, trains in minutes on a laptop CPU.
    "tiny": Size(64, 4, 4, 2, 16, 176, ByteTokenizer.padded_vocab_size, 512, 32, 32, 8, 16, 16),
    # Real sizes: a 32k vocabulary (Llama / Mistral tokenizers), RoPE base 10k, tied embeddings.
    "125m": Size(768, 12, 12, 4, 64, 3072, 32000, 4096, 1024, 256, 32, 64, 128),
    "350m": Size(1024, 24, 16, 8, 64, 3072, 32000, 4096, 1024, 512, 64, 64, 128),
    "1.3b": Size(2048, 24, 16, 8, 128, 6144, 32000, 4096, 2048, 512, 64, 64, 128),
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


# --- recurrent and hybrid families ------------------------------------------------------------------

def _layer_kinds(s: Size) -> dict[str, LayerConfig]:
    """One letter per layer kind; the hybrids are patterns over these letters."""
    return {
        "A": _attention(s),
        "W": _attention(s, window=s.window),
        "M": LayerConfig("mamba2", Mamba2Config(2 * s.d_model // s.ssm_head_dim, s.ssm_head_dim, s.state_dim)),
        "m": LayerConfig("mamba2", Mamba2Config(2 * s.d_model // s.ssm_head_dim, s.ssm_head_dim, s.state_dim), mlp=False),
        "G": LayerConfig("gated_deltanet", GatedDeltaNetConfig(s.num_heads // 2, s.head_dim)),
        "R": LayerConfig("retnet", RetNetConfig(s.num_heads // 2, 2 * s.head_dim)),
        "x": LayerConfig("mlstm", MLSTMConfig(num_heads=4, inner_dim=2 * s.d_model), mlp=False),
        "s": LayerConfig("slstm", SLSTMConfig(num_heads=4, head_dim=s.d_model // 4)),
        "S": LayerConfig("s4d", S4DConfig(state_dim=s.state_dim)),
    }


@functools.cache
def _layer_params(s: Size, letter: str) -> int:
    from zoo.model import count_params  # model imports the mixer registry; presets stay importable alone

    one_layer = _model(s, [_layer_kinds(s)[letter]])
    return count_params(one_layer) - s.vocab_size * s.d_model - s.d_model  # minus tied embedding, final norm


def _pattern_model(s: Size, period: str) -> ModelConfig:
    """Tile `period` to the gqa model's layer-parameter budget (at least one full period)."""
    budget = s.n_layers * _layer_params(s, "A")
    per_layer = sum(_layer_params(s, letter) for letter in period) / len(period)
    n_layers = max(len(period), round(budget / per_layer))
    kinds = _layer_kinds(s)
    return _model(s, [kinds[period[i % len(period)]] for i in range(n_layers)])


HYBRID_PATTERNS = {
    "mamba2": "m",
    "mamba2-hybrid": "MMMAMMM",
    "samba": "MW",
    "gdn": "G",
    "gdn-h1": "GW",
    "gdn-h2": "MGW",
    "retnet": "R",
    "xlstm-7-1": "xxxsxxxx",
    "s4d": "S",
}

FAMILIES: dict[str, Callable[[Size], ModelConfig]] = {
    "gqa": gqa, "mqa": mqa, "mha": mha, "streaming": streaming, "swa-sinks": swa_sinks,
    "mixattention": mixattention, "mla": mla, "tpla": tpla,
    **{name: functools.partial(_pattern_model, period=period) for name, period in HYBRID_PATTERNS.items()},
}
PRESETS: dict[str, Callable[[], ModelConfig]] = {
    f"{family}-{size}": (lambda f=build, s=spec: f(s)) for family, build in FAMILIES.items() for size, spec in SIZES.items()
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
