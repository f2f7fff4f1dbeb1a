"""The training run's configuration: one frozen dataclass (with the data and optimizer configs nested),
saved as JSON in the run directory and in every checkpoint, and changed from the command line with
`--set key=value` (e.g. `steps=5000`, `optim.learning_rate=1e-3`, `data.seq_len=1024`,
`model.max_seq_len=8192`; `model.*` overrides the preset's top-level ModelConfig fields).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import jax

from zoo.config import ModelConfig
from zoo.errors import ConfigError
from zoo.model import REMAT_POLICIES
from zoo.pallas_kernels.dispatch import IMPLS
from zoo.presets import get_preset
from zoo.train.data import DataConfig
from zoo.train.optim import OptimConfig

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")

# Fields a resumed run may change: how long it runs, how it reports, and the mesh it runs on.
# Anything else would make the resumed run a different run.
# The scan kernel implementation computes the same model, so it may change too (e.g. a TPU run resumed on GPU).
RESUMABLE_FIELDS = frozenset({"steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "mesh",
                              "kernel_impl"})


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "gqa-tiny"
    steps: int = 2000
    batch_size: int = 32  # sequences per optimizer step, over all hosts and devices
    grad_accum: int = 1  # micro-batches per step (each batch_size / grad_accum sequences)
    seed: int = 0  # parameter initialisation
    mesh: str = ""  # e.g. "data=2,fsdp=2,tensor=2"; "" puts every device on "data"
    compute_dtype: str = "auto"  # auto: bfloat16 on GPU / TPU, float32 on CPU; master params stay float32
    remat: str = "none"  # "dots": recompute attention scores / scan internals in the backward; "full": whole blocks
    kernel_impl: str = "auto"  # every layer's kernels (scans, flash attention): auto (Pallas on GPU/TPU), xla, ...
    log_every: int = 10
    eval_every: int = 250
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    model: dict = field(default_factory=dict)  # overrides of the preset's ModelConfig fields
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "checkpoint_every",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be positive, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ConfigError("grad_accum", f"batch_size {self.batch_size} does not split into {self.grad_accum} "
                                            "equal micro-batches")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError("remat", f"must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        if self.kernel_impl not in IMPLS:
            raise ConfigError("kernel_impl", f"must be one of {IMPLS}, got {self.kernel_impl!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError("compute_dtype", f"must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        self.data.validate()
        self.optim.validate()

    def model_config(self, vocab_needed: int) -> ModelConfig:
        """The preset with the overrides applied, long enough for seq_len, in the compute dtype."""
        config = get_preset(self.preset)
        known = {f.name for f in dataclasses.fields(ModelConfig)} - {"layers"}
        for key in self.model:
            if key not in known:
                raise ConfigError(f"model.{key}", f"not a top-level model field; fields: {sorted(known)}")
        changes = dict(self.model)
        changes.setdefault("max_seq_len", max(config.max_seq_len, self.data.seq_len))
        if "dtype" not in changes:
            dtype = self.compute_dtype
            if dtype == "auto":
                dtype = "bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32"
            changes["dtype"] = dtype
        config = config.replace(**changes)
        if self.kernel_impl != "auto":
            config = config.with_kernel_impl(self.kernel_impl)
        if config.vocab_size < vocab_needed:
            raise ConfigError("model.vocab_size", f"the preset's vocabulary ({config.vocab_size}) is smaller than "
                                                  f"the tokenizer's ({vocab_needed}); set model.vocab_size")
        return config

    # --- JSON and --set ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "TrainConfig":
        raw = dict(raw)
        nested = {"data": DataConfig, "optim": OptimConfig}
        for name, kind in nested.items():
            if name in raw:
                raw[name] = _build(kind, raw[name], name)
        return _build(cls, raw, "train")

    def with_overrides(self, assignments: list[str]) -> "TrainConfig":
        """Apply "key=value" assignments; values are parsed as the field's current type."""
        raw = self.to_dict()
        for assignment in assignments:
            key, sep, text = assignment.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError("--set", f"expected key=value, got {assignment!r}")
            *parents, leaf = key.split(".")
            target = raw
            for part in parents:
                if not isinstance(target.get(part), dict):
                    raise ConfigError(key, f"{part!r} is not a group of settings; groups: model, data, optim")
                target = target[part]
            if parents == ["model"]:
                target[leaf] = _parse(text, getattr(get_preset(raw["preset"]), leaf, None), key)
            elif leaf not in target:
                raise ConfigError(key, f"unknown setting; known here: {sorted(target)}")
            else:
                target[leaf] = _parse(text, target[leaf], key)
        config = TrainConfig.from_dict(raw)
        config.validate()
        return config

    def differences(self, other: "TrainConfig") -> list[str]:
        """Flattened keys whose values differ."""
        a, b = _flatten(self.to_dict()), _flatten(other.to_dict())
        return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def _build(kind, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(where, f"expected an object, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(kind)}
    if unknown := sorted(set(raw) - known):
        raise ConfigError(f"{where}.{unknown[0]}", f"unknown setting; known: {sorted(known)}")
    return kind(**raw)


def _parse(text: str, current: Any, key: str):
    text = text.strip()
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if current is None:
            return json.loads(text)
    except (ValueError, json.JSONDecodeError):
        raise ConfigError(key, f"{text!r} is not a valid {type(current).__name__}") from None
    return text


def _flatten(raw: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in raw.items():
        if isinstance(v, dict) and k != "model":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
