"""Config validation (one clear error naming the field) and the JSON round trip."""

import json

import pytest

from zoo.config import LayerConfig, ModelConfig, layers_from_pattern
from zoo.errors import ConfigError
from zoo.layers.attention import AttentionConfig
from zoo.layers.mla import MLAConfig
from zoo.layers.s4d import S4DConfig
from zoo.presets import PRESETS, get_preset


def model(layers, **kw):
    return ModelConfig(vocab_size=64, d_model=32, mlp_hidden=64, layers=tuple(layers), **kw)


def attn(**kw):
    return LayerConfig("attention", AttentionConfig(**{"num_heads": 4, "num_kv_heads": 2, "head_dim": 8, **kw}))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_json(name, tmp_path):
    config = get_preset(name)
    assert ModelConfig.from_json(config.to_json()) == config
    config.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == config


@pytest.mark.parametrize(
    "layers, field, words",
    [
        ([attn(num_heads=6, num_kv_heads=4)], r"layers\[0\]\.mixer_config\.num_heads", "not divisible"),
        ([attn(window=0)], r"layers\[0\]\.mixer_config\.window", "positive"),
        ([attn(window=-3)], r"layers\[0\]\.mixer_config\.window", "positive"),
        ([attn(), attn(shared_kv_source=1)], r"layers\[1\]\.mixer_config\.shared_kv_source", "earlier layer"),
        ([attn(), attn(shared_kv_source=3)], r"layers\[1\]\.mixer_config\.shared_kv_source", "earlier layer"),
        ([attn(), attn(num_kv_heads=4, shared_kv_source=0)], r"layers\[1\]\.mixer_config\.shared_kv_source", "num_kv_heads"),
        ([attn(), attn(head_dim=16, shared_kv_source=0)], r"layers\[1\]\.mixer_config\.shared_kv_source", "head_dim"),
        ([attn(window=8), attn(shared_kv_source=0)], r"layers\[1\]\.mixer_config\.shared_kv_source", "window"),
        ([LayerConfig("mamba9", AttentionConfig(4, 2, 8))], r"layers\[0\]\.mixer", "unknown mixer 'mamba9'"),
        ([LayerConfig("mla", AttentionConfig(4, 2, 8))], r"layers\[0\]\.mixer_config", "takes MLAConfig"),
        ([attn(sink_tokens=2)], r"layers\[0\]\.mixer_config\.sink_tokens", "sliding window"),
        ([LayerConfig("s4d", S4DConfig(convolution="fourier"))], r"layers\[0\]\.mixer_config\.convolution", "one of"),
    ],
)
def test_bad_configs_raise_one_clear_error(layers, field, words):
    with pytest.raises(ConfigError, match=f"^{field}: .*{words}"):
        model(layers)


def test_shared_kv_source_must_be_same_mixer():
    mla = LayerConfig("mla", MLAConfig(4, 16, 8, 4, 8))
    with pytest.raises(ConfigError, match=r"shared_kv_source: layer 0 is 'mla'"):
        model([mla, attn(shared_kv_source=0)])


def test_json_errors_name_the_field():
    data = get_preset("gqa-tiny").to_dict()
    data["layers"][1]["mixer_config"]["windw"] = 4
    with pytest.raises(ConfigError, match=r"^layers\[1\]\.mixer_config\.windw: unknown field"):
        ModelConfig.from_dict(data)
    data = get_preset("gqa-tiny").to_dict()
    data["layers"][2]["mixer"] = "transformer"
    with pytest.raises(ConfigError, match=r"^layers\[2\]\.mixer: unknown mixer"):
        ModelConfig.from_dict(data)
    data = get_preset("gqa-tiny").to_dict()
    data["d_modl"] = 3
    with pytest.raises(ConfigError, match=r"^config\.d_modl: unknown field"):
        ModelConfig.from_dict(data)


def test_load_reports_bad_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.load(path)
    with pytest.raises(FileNotFoundError):
        ModelConfig.load(tmp_path / "missing.json")


def test_pattern_with_overrides():
    letters = {"G": attn(), "S": attn(window=4)}
    layers = layers_from_pattern("GSSG", letters, overrides={2: {"shared_kv_source": 1}, 3: {"shared_kv_source": 0}})
    config = model(layers)
    assert [l.mixer_config.window for l in config.layers] == [None, 4, 4, None]
    assert config.kv_sources() == {0, 1}
    assert json.loads(config.to_json())["layers"][2]["mixer_config"]["shared_kv_source"] == 1
    with pytest.raises(ConfigError, match=r"^pattern\[1\]: letter 'X'"):
        layers_from_pattern("GX", letters)
    with pytest.raises(ConfigError, match=r"^overrides\[7\]"):
        layers_from_pattern("GG", letters, overrides={7: {"window": 2}})
