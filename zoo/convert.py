"""Hugging Face Llama / Qwen2 / Mistral checkpoints to zoo models and back.

A Hugging Face checkpoint directory holds `config.json`, safetensors (one file or an index of shards) and
`tokenizer.json`. `import_hf` maps the config to a zoo ModelConfig of attention layers and reads the
tensors one at a time straight onto the mesh (each device receives only its shard; the host holds one
tensor at a time). `export_hf` writes a zoo model back in the same format, shard by shard. What zoo does
not model but a round trip must keep (the original config.json, tokenizer_config.json,
generation_config.json, ...) travels as the `HFOrigin`, saved with the zoo checkpoint.

Layouts. Hugging Face linear weights are [out, in]; zoo's are [in, out], with heads as their own axis:
q_proj [H * Dh, D] is zoo's [D, H, Dh], o_proj [D, H * Dh] is [H, Dh, D]. Both use RoPE's rotate-half
feature order (Hugging Face permutes Meta's interleaved q/k rows when it converts), so no row permutation
is needed. A tied model has no lm_head tensor; an untied one's [V, D] is zoo's [D, V].
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from zoo.config import LayerConfig, ModelConfig
from zoo.errors import CheckpointError, ConfigError
from zoo.layers.attention import AttentionConfig
from zoo.layers.rope import RopeScaling
from zoo.safetensors_dir import DEFAULT_SHARD_BYTES, SafetensorsDir, write_safetensors_dir
from zoo.tokenizer import HFTokenizer, Tokenizer
from zoo.train.mesh import LOGICAL_RULES, host_array, param_shardings

CONFIG_FILE = "config.json"
MODEL_TYPES = ("llama", "qwen2", "mistral")
ARCHITECTURE_OF = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
# Small files a Hugging Face checkpoint carries besides weights and config; kept verbatim through a round trip.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
# Tensors some checkpoints carry that hold nothing a model needs (RoPE tables rebuilt from the config).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
NUMPY_DTYPES = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16, "float16": np.float16}


@dataclass(frozen=True)
class HFOrigin:
    """The Hugging Face files a converted model came from, minus the weights."""

    config: dict  # the original config.json
    files: dict = field(default_factory=dict)  # side file name -> text

    def to_dict(self) -> dict:
        return {"config": self.config, "files": self.files}

    @classmethod
    def from_dict(cls, data: dict) -> "HFOrigin":
        return cls(config=data["config"], files=data.get("files", {}))


def is_hf_checkpoint(directory: str | Path) -> bool:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        return "model_type" in json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


# --- configs --------------------------------------------------------------------------------------------

def read_hf_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(directory, f"no {CONFIG_FILE}: not a Hugging Face checkpoint directory")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(path, f"not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(path, "expected a JSON object")
    return config


def _need(hf: dict, key: str, source):
    if hf.get(key) is None:
        raise CheckpointError(source, f"config field {key!r} is missing")
    return hf[key]


def _rope_fields(hf: dict) -> tuple[float, dict]:
    """(rope theta, the scaling dict) from either config generation: transformers 4 writes `rope_theta` and
    `rope_scaling`, transformers 5 one `rope_parameters` dict holding both."""
    parameters = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or parameters)
    theta = parameters.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta), scaling


def _rope_scaling(scaling: dict, hf: dict, source) -> RopeScaling | None:
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    original = scaling.get("original_max_position_embeddings")
    factor = scaling.get("factor")
    if kind == "linear":
        return RopeScaling("linear", float(_need(scaling, "factor", source)))
    if kind == "llama3":
        return RopeScaling("llama3", float(factor), original_max_position=int(original),
                           low_freq_factor=float(scaling["low_freq_factor"]),
                           high_freq_factor=float(scaling["high_freq_factor"]))
    if kind == "yarn":
        original = int(original or hf["max_position_embeddings"])
        factor = float(factor if factor is not None else hf["max_position_embeddings"] / original)
        attention = scaling.get("attention_factor")
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if attention is None and mscale and mscale_all_dim:
            def magnitude(m):
                return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
            attention = magnitude(mscale) / magnitude(mscale_all_dim)
        return RopeScaling("yarn", factor, original_max_position=original,
                           beta_fast=float(scaling.get("beta_fast") or 32), beta_slow=float(scaling.get("beta_slow") or 1),
                           attention_factor=None if attention is None else float(attention),
                           truncate=bool(scaling.get("truncate", True)))
    raise CheckpointError(source, f"rope scaling {kind!r} is not supported (zoo reads default, linear, llama3, yarn)")


def _sliding_layers(hf: dict, model_type: str, n_layers: int, source) -> list[int | None]:
    """Each layer's window (None: full attention), as transformers decides it for the model type."""
    window = hf.get("sliding_window")
    if model_type == "llama" or window is None:
        return [None] * n_layers
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        if len(layer_types) != n_layers:
            raise CheckpointError(source, f"layer_types has {len(layer_types)} entries for {n_layers} layers")
        return [int(window) if t == "sliding_attention" else None for t in layer_types]
    if model_type == "mistral":
        return [int(window)] * n_layers
    # Qwen2: sliding window only when enabled, and only from layer max_window_layers on.
    if not hf.get("use_sliding_window", False):
        return [None] * n_layers
    first = int(hf.get("max_window_layers", n_layers))
    return [int(window) if i >= first else None for i in range(n_layers)]


def model_config_from_hf(hf: dict, source="config.json", *, dtype: str = "float32",
                         param_dtype: str = "float32") -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(source, f"unknown architecture {model_type!r} (architectures {hf.get('architectures')}); "
                                      f"zoo converts {', '.join(MODEL_TYPES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(source, f"hidden_act {hf['hidden_act']!r} is not supported (zoo's MLP is SwiGLU)")
    if hf.get("mlp_bias"):
        raise CheckpointError(source, "mlp_bias=true is not supported (zoo's MLP has no biases)")
    if model_type == "llama" and hf.get("attention_bias"):
        raise CheckpointError(source, "attention_bias=true is not supported (zoo has no o_proj bias)")
    d_model = int(_need(hf, "hidden_size", source))
    heads = int(_need(hf, "num_attention_heads", source))
    n_layers = int(_need(hf, "num_hidden_layers", source))
    head_dim = int(hf.get("head_dim") or d_model // heads)
    theta, scaling = _rope_fields(hf)
    partial = float(scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    rotary_dim = None if partial == 1.0 else int(head_dim * partial)
    layers = tuple(
        LayerConfig("attention", AttentionConfig(
            num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=head_dim,
            rope_base=theta, rotary_dim=rotary_dim, rope_scaling=_rope_scaling(scaling, hf, source), window=window,
            qkv_bias=model_type == "qwen2",
        ))
        for window in _sliding_layers(hf, model_type, n_layers, source)
    )
    try:
        return ModelConfig(
            vocab_size=int(_need(hf, "vocab_size", source)), d_model=d_model,
            mlp_hidden=int(_need(hf, "intermediate_size", source)), layers=layers,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)), dtype=dtype, param_dtype=param_dtype,
        )
    except ConfigError as e:
        raise CheckpointError(source, f"gives an invalid zoo config: {e}") from None


def hf_config_from_model(config: ModelConfig, origin: HFOrigin | None = None, *, torch_dtype: str) -> dict:
    """config.json for `config`: the origin's, with every field zoo models rewritten from `config`."""
    layers = config.layers
    problems = [f"layer {i} is {l.mixer!r}" for i, l in enumerate(layers) if l.mixer != "attention"]
    problems += [f"layer {i} has no MLP" for i, l in enumerate(layers) if not l.mlp]
    attention = [l.mixer_config for l in layers]
    if not problems:
        for i, a in enumerate(attention):
            if a.sink_tokens or a.sink_logits or a.shared_kv_source is not None:
                problems.append(f"layer {i} has attention sinks or shared KV")
            for name in ("num_heads", "num_kv_heads", "head_dim", "rope_base", "rotary_dim", "rope_scaling", "qkv_bias"):
                if getattr(a, name) != getattr(attention[0], name):
                    problems.append(f"layer {i}'s {name} differs from layer 0's")
    if problems:
        raise ConfigError("model", "only uniform attention transformers export to Hugging Face: " + "; ".join(problems))
    first = attention[0]
    windows = [a.window for a in attention]
    hf = dict(origin.config) if origin is not None else {}
    model_type = hf.get("model_type") or ("qwen2" if first.qkv_bias else "mistral" if any(windows) else "llama")
    if first.qkv_bias != (model_type == "qwen2"):
        raise ConfigError("model", f"q/k/v biases {'on' if first.qkv_bias else 'off'} do not fit model_type {model_type!r}")
    hf.update({
        "model_type": model_type, "architectures": [ARCHITECTURE_OF[model_type]], "vocab_size": config.vocab_size,
        "hidden_size": config.d_model, "intermediate_size": config.mlp_hidden, "num_hidden_layers": config.n_layers,
        "num_attention_heads": first.num_heads, "num_key_value_heads": first.num_kv_heads, "head_dim": first.head_dim,
        "hidden_act": "silu", "rms_norm_eps": config.norm_eps, "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_embeddings,
    })
    hf["dtype" if "dtype" in hf or "torch_dtype" not in hf else "torch_dtype"] = torch_dtype
    _write_rope(hf, first)
    _write_windows(hf, model_type, windows)
    return hf


def _write_rope(hf: dict, attention: AttentionConfig) -> None:
    scaling = {"rope_type": "default"}
    s = attention.rope_scaling
    if s is not None:
        scaling = {"rope_type": s.kind, "factor": s.factor}
        if s.kind == "llama3":
            scaling.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                           original_max_position_embeddings=s.original_max_position)
        elif s.kind == "yarn":
            scaling.update(original_max_position_embeddings=s.original_max_position, beta_fast=s.beta_fast,
                           beta_slow=s.beta_slow, truncate=s.truncate)
            if s.attention_factor is not None:
                scaling["attention_factor"] = s.attention_factor
    if attention.rotary_dim is not None:
        scaling["partial_rotary_factor"] = attention.rotary_dim / attention.head_dim
    if "rope_parameters" in hf:  # transformers 5's single dict
        hf["rope_parameters"] = {"rope_theta": attention.rope_base, **scaling}
        hf.pop("rope_scaling", None)
    else:
        hf["rope_theta"] = attention.rope_base
        hf["rope_scaling"] = None if s is None else scaling
        if attention.rotary_dim is not None:
            hf["partial_rotary_factor"] = attention.rotary_dim / attention.head_dim


def _write_windows(hf: dict, model_type: str, windows: list[int | None]) -> None:
    sizes = {w for w in windows if w is not None}
    if len(sizes) > 1:
        raise ConfigError("model", f"layers use different windows {sorted(sizes)}; Hugging Face configs have one")
    window = sizes.pop() if sizes else None
    if model_type == "llama":
        if window is not None:
            raise ConfigError("model", "a Llama config has no sliding window; export as mistral or qwen2")
        return
    hf["sliding_window"] = window
    types = ["sliding_attention" if w is not None else "full_attention" for w in windows]
    if model_type == "mistral":
        if window is not None and None in windows:
            hf["layer_types"] = types
        else:
            hf.pop("layer_types", None)
        return
    # Qwen2: the windowed layers must be the last ones.
    first = next((i for i, w in enumerate(windows) if w is not None), len(windows))
    if any(w is None for w in windows[first:]):
        if "layer_types" not in hf:
            raise ConfigError("model", "Qwen2 configs window only the layers from max_window_layers on")
        hf["layer_types"] = types
    hf["use_sliding_window"] = window is not None
    hf["max_window_layers"] = first
    if "layer_types" in hf:
        hf["layer_types"] = types


# --- tensors --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorMap:
    """One Hugging Face tensor and the zoo parameter it becomes: zoo = (hf.T if transpose else hf) reshaped."""

    hf_name: str
    zoo_path: tuple[str, ...]
    zoo_shape: tuple[int, ...]
    hf_shape: tuple[int, ...]
    transpose: bool

    def to_zoo(self, array: np.ndarray) -> np.ndarray:
        return (array.T if self.transpose else array).reshape(self.zoo_shape)

    def to_hf(self, array: np.ndarray) -> np.ndarray:
        if self.transpose:
            return array.reshape(self.hf_shape[::-1]).T
        return array.reshape(self.hf_shape)


def tensor_maps(config: ModelConfig) -> list[TensorMap]:
    """Every parameter of `config` (an attention transformer) with its Hugging Face name and layout."""
    from zoo.model import param_shapes

    shapes = param_shapes(config)
    maps = []

    def add(hf_name, path, kind):
        shape = shapes
        for key in path:
            shape = shape[key]
        shape = tuple(shape.shape)
        if kind == "same":
            hf_shape, transpose = shape, False
        elif kind == "flat":  # a bias [H, Dh]
            hf_shape, transpose = (math.prod(shape),), False
        elif kind == "in":  # [D, ...out] -> [prod(out), D]
            hf_shape, transpose = (math.prod(shape[1:]), shape[0]), True
        else:  # "out": [...in, D] -> [D, prod(in)]
            hf_shape, transpose = (shape[-1], math.prod(shape[:-1])), True
        maps.append(TensorMap(hf_name, path, shape, hf_shape, transpose))

    add("model.embed_tokens.weight", ("embed",), "same")
    for i, layer in enumerate(config.layers):
        hf, zoo = f"model.layers.{i}.", f"layer_{i}"
        add(hf + "input_layernorm.weight", (zoo, "mixer_norm", "scale"), "same")
        for name in ("q_proj", "k_proj", "v_proj"):
            add(f"{hf}self_attn.{name}.weight", (zoo, "mixer", name), "in")
            if layer.mixer_config.qkv_bias:
                add(f"{hf}self_attn.{name}.bias", (zoo, "mixer", f"{name}_bias"), "flat")
        add(hf + "self_attn.o_proj.weight", (zoo, "mixer", "o_proj"), "out")
        add(hf + "post_attention_layernorm.weight", (zoo, "mlp_norm", "scale"), "same")
        add(hf + "mlp.gate_proj.weight", (zoo, "mlp", "gate"), "in")
        add(hf + "mlp.up_proj.weight", (zoo, "mlp", "up"), "in")
        add(hf + "mlp.down_proj.weight", (zoo, "mlp", "down"), "in")
    add("model.norm.weight", ("final_norm", "scale"), "same")
    if not config.tie_embeddings:
        add("lm_head.weight", ("lm_head",), "in")
    return maps


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def load_hf_params(config: ModelConfig, directory: str | Path, mesh=None, *, rules=None, progress: bool = True):
    """The params of `config` from the safetensors in `directory`, each placed (sharded) as the logical rules
    say on `mesh` (default: the first local device). Only one tensor is in host memory at a time, and each
    device receives only its own slice of it."""
    from zoo.train.step import boxed_abstract_params

    files = SafetensorsDir(directory)
    maps = tensor_maps(config)
    expected = {m.hf_name for m in maps}
    unexpected = sorted(n for n in files.names() - expected
                        if not n.endswith(IGNORED_SUFFIXES) and not (config.tie_embeddings and n == "lm_head.weight"))
    if unexpected:
        raise CheckpointError(files.files[unexpected[0]], f"is not part of the {config.n_layers}-layer model the "
                                                          f"config describes ({len(unexpected)} such tensors)",
                              unexpected[0])
    boxed = boxed_abstract_params(config)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, boxed, is_leaf=lambda x: hasattr(x, "names"))
    else:
        shardings = param_shardings(boxed, mesh, rules or LOGICAL_RULES)
    dtype = NUMPY_DTYPES[config.param_dtype]
    params: dict = {}
    for m in tqdm(maps, desc=f"reading {Path(directory).name}", unit="tensor", disable=not progress):
        array = m.to_zoo(files.read(m.hf_name, m.hf_shape)).astype(dtype)
        sharding = _get(shardings, m.zoo_path)
        _set(params, m.zoo_path, jax.make_array_from_callback(array.shape, sharding, lambda index, a=array: a[index]))
    return params


def _origin_files(directory: Path) -> dict:
    return {name: (directory / name).read_text(encoding="utf-8") for name in SIDE_FILES if (directory / name).is_file()}


def import_hf(directory: str | Path, mesh=None, *, dtype: str = "float32", param_dtype: str = "float32",
              progress: bool = True) -> tuple[ModelConfig, dict, Tokenizer, HFOrigin]:
    """(config, params, tokenizer, origin) of the Hugging Face checkpoint in `directory`."""
    directory = Path(directory)
    hf = read_hf_config(directory)
    config = model_config_from_hf(hf, directory / CONFIG_FILE, dtype=dtype, param_dtype=param_dtype)
    if not (directory / "tokenizer.json").is_file():
        raise CheckpointError(directory, "no tokenizer.json (zoo reads Hugging Face fast tokenizers; save one with "
                                         "AutoTokenizer.from_pretrained(...).save_pretrained(DIR))")
    tokenizer = HFTokenizer.from_file(directory / "tokenizer.json")
    params = load_hf_params(config, directory, mesh, progress=progress)
    return config, params, tokenizer, HFOrigin(hf, _origin_files(directory))


def source_dtype(hf: dict) -> str:
    """The dtype a Hugging Face config says its weights are stored in (float32 when it does not say)."""
    name = str(hf.get("dtype") or hf.get("torch_dtype") or "float32").removeprefix("torch.")
    return name if name in NUMPY_DTYPES else "float32"


def export_hf(config: ModelConfig, params, out: str | Path, *, tokenizer: Tokenizer | None = None,
              origin: HFOrigin | None = None, dtype: str | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True) -> Path:
    """Write `params` as a Hugging Face checkpoint directory `out` (which must be new or empty), in `dtype`
    (default: the origin's stored dtype, else float32). Tensors are fetched from the devices one at a time."""
    dtype = dtype or (source_dtype(origin.config) if origin is not None else "float32")
    if dtype not in NUMPY_DTYPES:
        raise ConfigError("dtype", f"must be one of {sorted(NUMPY_DTYPES)}, got {dtype!r}")
    hf = hf_config_from_model(config, origin, torch_dtype=dtype)
    files = dict(origin.files) if origin is not None else {}
    if isinstance(tokenizer, HFTokenizer):
        tokenizer_json = tokenizer.to_dict()["tokenizer_json"]
        kept = files.get("tokenizer.json")
        if kept is None or json.loads(kept) != tokenizer_json:  # the origin's text, byte for byte, when unchanged
            files["tokenizer.json"] = json.dumps(tokenizer_json, ensure_ascii=False)
    elif tokenizer is not None:
        files.pop("tokenizer.json", None)  # a byte-level model: Hugging Face has no such tokenizer file
    files[CONFIG_FILE] = json.dumps(hf, indent=2) + "\n"
    maps = tensor_maps(config)
    target = NUMPY_DTYPES[dtype]

    def tensors():
        for m in tqdm(maps, desc=f"writing {Path(out).name}", unit="tensor", disable=not progress):
            yield m.hf_name, m.to_hf(host_array(_get(params, m.zoo_path)).astype(target))

    if jax.process_index() == 0:
        return write_safetensors_dir(out, tensors(), extra_files=files, max_shard_bytes=max_shard_bytes)
    for _ in tensors():  # the other hosts take part in gathering each tensor; process 0 writes
        pass
    return Path(out)
