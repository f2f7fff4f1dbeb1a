"""Mixers: every token-mixing layer with the protocol `(x, *, positions, segment_ids, cache=None) -> (y, cache)`
and `init_cache(batch, max_len, dtype)`.

MIXERS maps a config's mixer name to its config type and module; the model, the config validation
and the CLI all look mixers up here and nowhere else.
"""

from __future__ import annotations

from typing import NamedTuple

from zoo.layers.attention import Attention, AttentionConfig
from zoo.layers.duo_attention import DuoAttention, DuoAttentionConfig
from zoo.layers.gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig
from zoo.layers.mamba2 import Mamba2, Mamba2Config
from zoo.layers.mla import MLA, MLAConfig, TPLAConfig
from zoo.layers.retnet import RetNetConfig, Retention
from zoo.layers.s4d import S4D, S4DConfig
from zoo.layers.xlstm import MLSTM, SLSTM, MLSTMConfig, SLSTMConfig


class MixerSpec(NamedTuple):
    config_type: type
    module: type
    recurrent: bool  # constant-size state (no per-token cache)


MIXERS: dict[str, MixerSpec] = {
    "attention": MixerSpec(AttentionConfig, Attention, False),
    "duo_attention": MixerSpec(DuoAttentionConfig, DuoAttention, False),
    "mla": MixerSpec(MLAConfig, MLA, False),
    "tpla": MixerSpec(TPLAConfig, MLA, False),
    "mamba2": MixerSpec(Mamba2Config, Mamba2, True),
    "s4d": MixerSpec(S4DConfig, S4D, True),
    "gated_deltanet": MixerSpec(GatedDeltaNetConfig, GatedDeltaNet, True),
    "retnet": MixerSpec(RetNetConfig, Retention, True),
    "mlstm": MixerSpec(MLSTMConfig, MLSTM, True),
    "slstm": MixerSpec(SLSTMConfig, SLSTM, True),
}
