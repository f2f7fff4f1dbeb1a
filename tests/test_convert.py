"""Hugging Face conversion (zoo.convert): logits against transformers' golden fixtures, bit-exact export round
trips, loading onto a mesh, and one clear error per kind of broken checkpoint.

The fixtures (tests/fixtures/hf/, made by make_fixtures.py with transformers 5.17 on the lent GPU machine) hold
tiny random Llama / Qwen2 / Mistral models and the float32 logits transformers computed for fixed token ids;
make_fixtures.py --live repeats the comparison with fresh weights where torch exists (bench/results/hf_parity_h100.json).
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from zoo.cli import main as zoo_main
from zoo.cli import parse_size
from zoo.convert import export_hf, import_hf, model_config_from_hf
from zoo.errors import CheckpointError
from zoo.model import DecoderLM
from zoo.safetensors_dir import INDEX_FILE, SafetensorsDir
from zoo.train.checkpoint import load_model
from zoo.train.mesh import make_mesh

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
NAMES = ("llama", "qwen2", "mistral")
# The bar, relative to the largest |logit|. Measured: CPU 0.8-2.6e-6, H100 0.7-1.5e-6 (fresh weights).
FLOAT32_LOGIT_TOLERANCE = 1e-4
# Sharded matmuls sum in another order than one device's: float32 rounding only.
MESH_FLOAT32_TOLERANCE = 1e-5


@functools.cache
def imported(name):
    return import_hf(FIXTURES / name, progress=False)


@functools.cache
def forward(config):
    return jax.jit(lambda params, ids: DecoderLM(config).apply({"params": params}, ids)[0])


def relative_error(ours, reference) -> float:
    return float(np.max(np.abs(np.asarray(ours) - reference)) / np.max(np.abs(reference)))


def expected(name):
    data = np.load(FIXTURES / name / "expected.npz")
    return data["input_ids"], data["logits"]


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name):
    config, params, _, _ = imported(name)
    ids, logits = expected(name)
    assert relative_error(forward(config)(params, ids), logits) <= FLOAT32_LOGIT_TOLERANCE


def test_configs_map_what_each_architecture_has():
    llama, qwen2, mistral = (imported(n)[0] for n in NAMES)
    assert llama.layers[0].mixer_config.rope_scaling.kind == "llama3" and not llama.tie_embeddings
    assert llama.layers[0].mixer_config.num_kv_heads == 2
    qwen_attention = [l.mixer_config for l in qwen2.layers]
    assert [a.window for a in qwen_attention] == [None, 6]  # layer_types: full, then sliding
    assert all(a.qkv_bias and a.num_kv_heads == 1 and a.rope_scaling.kind == "yarn" for a in qwen_attention)
    assert qwen2.tie_embeddings
    assert all(l.mixer_config.window == 8 and l.mixer_config.head_dim == 16 for l in mistral.layers)
    assert mistral.d_model // mistral.layers[0].mixer_config.num_heads == 8  # head_dim is not hidden / heads
    assert (FIXTURES / "mistral" / INDEX_FILE).is_file()


def _assert_same_tensors(a: Path, b: Path):
    first, second = SafetensorsDir(a), SafetensorsDir(b)
    assert first.names() == second.names()
    for name in sorted(first.names()):
        x, y = first.read(name), second.read(name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), name


@pytest.mark.parametrize("name", NAMES)
def test_export_round_trips_bit_exactly(name, tmp_path):
    config, params, tokenizer, origin = imported(name)
    out = export_hf(config, params, tmp_path / "hf", tokenizer=tokenizer, origin=origin, progress=False)
    _assert_same_tensors(FIXTURES / name, out)
    for side in ("tokenizer.json", "generation_config.json"):
        assert (out / side).read_bytes() == (FIXTURES / name / side).read_bytes()
    hf = json.loads((out / "config.json").read_text())
    assert model_config_from_hf(hf) == config
    again, params_again, _, _ = import_hf(out, progress=False)
    assert again == config
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), params, params_again)


def test_bfloat16_export_round_trips_and_shards(tmp_path):
    config, params, tokenizer, origin = imported("llama")
    first = export_hf(config, params, tmp_path / "bf16", tokenizer=tokenizer, origin=origin, dtype="bfloat16",
                      max_shard_bytes=20_000, progress=False)
    index = json.loads((first / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((first / "config.json").read_text())["dtype"] == "bfloat16"
    for param_dtype in ("float32", "bfloat16"):
        config_again, params_again, _, origin_again = import_hf(first, param_dtype=param_dtype, progress=False)
        second = export_hf(config_again, params_again, tmp_path / f"again-{param_dtype}", tokenizer=tokenizer,
                           origin=origin_again, progress=False)
        _assert_same_tensors(first, second)


def test_loads_onto_a_mesh_shard_by_shard():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (the CPU run fakes them; a one-GPU run has one)")
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    config, on_mesh, _, _ = import_hf(FIXTURES / "mistral", mesh, progress=False)
    gate = on_mesh["layer_0"]["mlp"]["gate"]  # [embed, mlp] -> (fsdp, tensor)
    assert gate.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert {s.data.shape for s in gate.addressable_shards} == {(gate.shape[0] // 2, gate.shape[1] // 2)}
    ids, logits = expected("mistral")
    single = forward(config)(imported("mistral")[1], ids)
    sharded = forward(config)(on_mesh, ids)
    assert relative_error(sharded, np.asarray(single)) <= MESH_FLOAT32_TOLERANCE
    assert relative_error(sharded, logits) <= FLOAT32_LOGIT_TOLERANCE


def test_cli_converts_both_ways(tmp_path, capsys):
    assert zoo_main(["convert", str(FIXTURES / "qwen2"), "--out", str(tmp_path / "zoo")]) == 0
    loaded = load_model(tmp_path / "zoo")
    config, params = imported("qwen2")[:2]
    assert loaded.config == config and loaded.step == 0 and loaded.origin["config"]["model_type"] == "qwen2"
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), params, loaded.params)
    assert zoo_main(["convert", str(tmp_path / "zoo"), "--out", str(tmp_path / "hf")]) == 0
    _assert_same_tensors(FIXTURES / "qwen2", tmp_path / "hf")
    assert zoo_main(["convert", str(FIXTURES / "qwen2"), "--out", str(tmp_path / "hf")]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err


def test_load_model_reads_a_hugging_face_directory():
    loaded = load_model(FIXTURES / "llama")
    ids, logits = expected("llama")
    assert relative_error(forward(loaded.config)(loaded.params, ids), logits) <= FLOAT32_LOGIT_TOLERANCE
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("First Citizen")) == "First Citizen"


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("40kb") == 40_000
    assert parse_size("123") == 123
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


# --- broken checkpoints: one error each, naming the tensor and the file --------------------------------------

def _copy(name, tmp_path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def _rewrite(path: Path, change):
    tensors = {n: SafetensorsDir(path.parent).read(n) for n in SafetensorsDir(path.parent).names()}
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(directory: Path, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def _missing(d):
    _rewrite(d / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))


def _misshapen(d):
    _rewrite(d / "model.safetensors", lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((8, 32), np.float32)}))


def _unexpected(d):
    _rewrite(d / "model.safetensors", lambda t: t.update({"model.layers.2.self_attn.q_proj.weight": np.zeros((32, 32), np.float32)}))


def _truncated(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("break_it, message", [
    (_missing, r"tensor 'model\.layers\.1\.mlp\.up_proj\.weight': missing: none of the checkpoint's files "
               r"\(model\.safetensors\) holds it"),
    (_misshapen, r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight': has shape \(8, 32\), "
                 r"the model expects \(16, 32\)"),
    (_unexpected, r"model\.safetensors: tensor 'model\.layers\.2\.self_attn\.q_proj\.weight': is not part of the 2-layer"),
    (_truncated, r"model\.safetensors.*not a readable safetensors file"),
    (lambda d: _edit_config(d, model_type="gpt2"), r"config\.json: unknown architecture 'gpt2'"),
    (lambda d: _edit_config(d, hidden_size=None), r"config\.json: config field 'hidden_size' is missing"),
    (lambda d: _edit_config(d, rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}),
     r"config\.json: rope scaling 'longrope' is not supported"),
    (lambda d: (d / "tokenizer.json").unlink(), r"no tokenizer\.json"),
], ids=["missing", "shape", "unexpected", "truncated", "architecture", "config-field", "rope", "tokenizer"])
def test_broken_checkpoint_gives_one_clear_error(break_it, message, tmp_path):
    directory = _copy("llama", tmp_path)
    break_it(directory)
    with pytest.raises(CheckpointError, match=message):
        import_hf(directory, progress=False)


def test_missing_shard_names_the_file_and_tensor(tmp_path):
    directory = _copy("mistral", tmp_path)
    index = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
    tensor, shard = next(iter(sorted(index.items())))
    (directory / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"{shard}: tensor '{tensor}': the file is missing"):
        import_hf(directory, progress=False)


def test_cli_reports_a_broken_checkpoint(tmp_path, capsys):
    directory = _copy("llama", tmp_path)
    _edit_config(directory, model_type="gpt2")
    assert zoo_main(["convert", str(directory), "--out", str(tmp_path / "out")]) == 2
    assert "unknown architecture 'gpt2'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
