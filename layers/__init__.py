"""Mixers: every token-mixing layer with the protocol `(x, *, positions, segment_ids, cache=None) -> (y, cache)`.

MIXERS maps a config's mixer name to its config type, module and cache constructor; the model,
the config validation and the CLI all look mixers up here and nowhere else.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from zoo.layers.attention import Attention, AttentionConfig, attention_init_cache
from zoo.layers.mla import MLA, MLAConfig, TPLAConfig, latent_init_cache


class MixerSpec(NamedTuple):
    config_type: type
    module: type
    init_cache: Callable[[Any, int, int, Any], Any]


MIXERS: dict[str, MixerSpec] = {
    "attention": MixerSpec(AttentionConfig, Attention, attention_init_cache),
    "mla": MixerSpec(MLAConfig, MLA, latent_init_cache),
    "tpla": MixerSpec(TPLAConfig, MLA, latent_init_cache),
}
