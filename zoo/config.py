"""Model configuration: frozen dataclasses, validated on construction, round-tripped through JSON.

A checkpoint directory stores `config.json`; `ModelConfig.load` rebuilds the model from it alone.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zoo.errors import ConfigError
from zoo.layers import MIXERS

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class LayerConfig:
    mixer: str  # a key of zoo.layers.MIXERS
    mixer_config: Any  # that mixer's config dataclass
    mlp: bool = True  # False: the block is mixer-only (as in Mamba stacks)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    mlp_hidden: int
    layers: tuple[LayerConfig, ...]
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    max_seq_len: int = 2048
    dtype: str = "float32"  # activations / compute
    param_dtype: str = "float32"  # stored (master) weights

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        self.validate()

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be positive, got {getattr(self, name)}")
        if self.mlp_hidden < 0:
            raise ConfigError("mlp_hidden", f"must be >= 0, got {self.mlp_hidden}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(name, f"must be one of {DTYPES}, got {getattr(self, name)!r}")
        if not self.layers:
            raise ConfigError("layers", "a model needs at least one layer")
        for i, layer in enumerate(self.layers):
            field = f"layers[{i}]"
            if layer.mixer not in MIXERS:
                raise ConfigError(f"{field}.mixer", f"unknown mixer {layer.mixer!r}; known: {sorted(MIXERS)}")
            expected = MIXERS[layer.mixer].config_type
            if type(layer.mixer_config) is not expected:
                raise ConfigError(
                    f"{field}.mixer_config",
                    f"mixer {layer.mixer!r} takes {expected.__name__}, got {type(layer.mixer_config).__name__}",
                )
            layer.mixer_config.validate(f"{field}.mixer_config")
            if layer.mlp and self.mlp_hidden == 0:
                raise ConfigError(f"{field}.mlp", "the layer has an MLP but mlp_hidden is 0")
            self._validate_sharing(i, layer)

    def _validate_sharing(self, i: int, layer: LayerConfig) -> None:
        source = getattr(layer.mixer_config, "shared_kv_source", None)
        if source is None:
            return
        field = f"layers[{i}].mixer_config.shared_kv_source"
        if not isinstance(source, int) or not 0 <= source < i:
            raise ConfigError(field, f"must name an earlier layer (0..{i - 1}), got {source!r}")
        src = self.layers[source]
        if src.mixer != layer.mixer:
            raise ConfigError(field, f"layer {source} is {src.mixer!r}, not {layer.mixer!r}")
        mine, theirs = layer.mixer_config.kv_layout(), src.mixer_config.kv_layout()
        for name in mine:
            if mine[name] != theirs[name]:
                raise ConfigError(
                    field, f"layer {source} has a different KV layout: {name}={theirs[name]!r} there, {mine[name]!r} here"
                )

    def kv_sources(self) -> frozenset[int]:
        return frozenset(
            s for l in self.layers if (s := getattr(l.mixer_config, "shared_kv_source", None)) is not None
        )

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # --- JSON -----------------------------------------------------------------------------------
    def with_kernel_impl(self, impl: str) -> "ModelConfig":
        """Every layer whose mixer has a kernel choice (`impl`) set to `impl`."""
        layers = tuple(
            dataclasses.replace(layer, mixer_config=dataclasses.replace(layer.mixer_config, impl=impl))
            if hasattr(layer.mixer_config, "impl") else layer
            for layer in self.layers
        )
        return self.replace(layers=layers)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "layers"}
        out["layers"] = [
            {"mixer": l.mixer, "mlp": l.mlp, "mixer_config": dataclasses.asdict(l.mixer_config)} for l in self.layers
        ]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        data = dict(data)
        _check_keys(cls, data, "config", skip=("layers",))
        layers = []
        for i, raw in enumerate(data.pop("layers", None) or []):
            field = f"layers[{i}]"
            _check_keys(LayerConfig, raw, field)
            mixer = raw.get("mixer")
            if mixer not in MIXERS:
                raise ConfigError(f"{field}.mixer", f"unknown mixer {mixer!r}; known: {sorted(MIXERS)}")
            config_type = MIXERS[mixer].config_type
            mixer_raw = raw.get("mixer_config", {})
            _check_keys(config_type, mixer_raw, f"{field}.mixer_config")
            try:
                mixer_config = config_type(**mixer_raw)
            except TypeError as e:
                raise ConfigError(f"{field}.mixer_config", str(e)) from None
            layers.append(LayerConfig(mixer=mixer, mixer_config=mixer_config, mlp=raw.get("mlp", True)))
        try:
            return cls(layers=tuple(layers), **data)
        except TypeError as e:
            raise ConfigError("config", str(e)) from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)  # atomic: a reader never sees half a config

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no model config at {path}")
        try:
            return cls.from_json(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(str(path), f"not valid JSON ({e})") from None


def _check_keys(dataclass_type, raw: Any, field: str, skip=()) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(field, f"expected an object, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(dataclass_type)}
    unknown = sorted(set(raw) - known - set(skip))
    if unknown:
        raise ConfigError(f"{field}.{unknown[0]}", f"unknown field; known fields: {sorted(known)}")


def layers_from_pattern(
    pattern: str | list[str], letters: dict[str, LayerConfig], overrides: dict[int, dict] | None = None
) -> tuple[LayerConfig, ...]:
    """Expand a per-layer pattern such as "SSSA" * 4 using `letters`, then apply per-layer overrides
    of mixer-config fields, e.g. {5: {"shared_kv_source": 3}}."""
    layers = []
    for i, letter in enumerate(pattern):
        if letter not in letters:
            raise ConfigError(f"pattern[{i}]", f"letter {letter!r} is not defined; defined: {sorted(letters)}")
        layer = letters[letter]
        if overrides and i in overrides:
            try:
                layer = dataclasses.replace(layer, mixer_config=dataclasses.replace(layer.mixer_config, **overrides[i]))
            except TypeError as e:
                raise ConfigError(f"overrides[{i}]", str(e)) from None
        layers.append(layer)
    if overrides and (bad := sorted(set(overrides) - set(range(len(layers))))):
        raise ConfigError(f"overrides[{bad[0]}]", f"the pattern has only {len(layers)} layers")
    return tuple(layers)
