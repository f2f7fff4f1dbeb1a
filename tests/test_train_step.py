"""The sharded train step and what it stands on (train/): meshes and sharding rules, the step on several
meshes, remat, the optimizer, the data pipeline and the config. (The loop, checkpoints and `zoo train` are
tests/test_train_loop.py's.)

All on 8 fake CPU devices (conftest.py). Tolerances: a sharded step reduces in a different order
than the single-device step, so float32 results agree to rounding (loss 1e-6 and gradient norm 1e-5
relative; updated parameters to 1% of the learning rate, see `_optimizer`).
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from zoo.errors import ConfigError
from zoo.model import DecoderLM, init_params
from zoo.presets import get_preset
from zoo.tokenizer import ByteTokenizer
from zoo.train import data as data_lib
from zoo.train.config import TrainConfig
from zoo.train.mesh import LOGICAL_RULES, logical_to_sharding, make_mesh, parse_mesh
from zoo.train.optim import OptimConfig, learning_rate_schedule, make_optimizer, weight_decay_mask
from zoo.train.step import (boxed_abstract_params, init_state, make_train_step, put_batch,
                            state_shardings)

# (2,2,2) exercises every axis at once; the pure tensor and pure fsdp meshes stress each rule alone.
# Pure data parallelism (8,1,1) is the batch split of (2,2,2) without the weight sharding, so it is
# left out (each mesh is one more train-step compile on the 2-core CI machine).
MESHES = {"gqa-tiny": [(2, 2, 2), (1, 1, 8), (1, 8, 1)], "hybrid": [(2, 2, 2)]}


def _mesh(shape):
    return make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)))


def _hybrid_tiny():
    """Samba's tiny preset cut to its first two layers (Mamba-2, then sliding-window attention):
    still a hybrid, and quick to compile."""
    config = get_preset("samba-tiny")
    return config.replace(layers=config.layers[:2])


LEARNING_RATE = 1e-3


def _optimizer(config, steps=10):
    # Adam's first update is lr * g / (|g| + eps): for a gradient entry within a few eps of zero it
    # amplifies the last-bit differences of a re-ordered reduction by up to 1 / eps. With eps = 1e-6,
    # 2 of 20480 entries of gqa-tiny on mesh (1, 8, 1) moved by 1.4% of an update (CI, 2026-11-23);
    # eps = 1e-4 bounds the amplification 100x tighter, and the updated parameters must agree to 1% of
    # one update.
    optim = OptimConfig(learning_rate=LEARNING_RATE, warmup_steps=0, eps=1e-4, z_loss=1e-4)
    return make_optimizer(optim, steps, nn.unbox(boxed_abstract_params(config)))


def _random_batch(rng, batch=16, length=24, vocab=300):
    """Two documents a row (a random split point), so segment resets and weights are exercised."""
    tokens = rng.integers(0, vocab, (batch, length + 1)).astype(np.int32)
    cut = rng.integers(2, length - 2, batch)
    segments = np.where(np.arange(length + 1)[None] < cut[:, None], 1, 2).astype(np.int32)
    return data_lib.rows_to_batch(tokens, segments)


# --- meshes ---------------------------------------------------------------------------------------
def test_parse_mesh():
    assert parse_mesh("data=2,fsdp=2,tensor=2", 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert parse_mesh("", 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert parse_mesh("tensor=2,data=-1", 8) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert parse_mesh("fsdp=4", 8) == {"data": 1, "fsdp": 4, "tensor": 1}  # uses 4 of the 8 devices
    for bad, message in [("data=16", "needs 16 devices"), ("model=2", "unknown axis"), ("data=x", "not an integer"),
                         ("data=-1,fsdp=-1", "only one axis"), ("data=3,fsdp=-1", "do not divide")]:
        with pytest.raises(ConfigError, match=message):
            parse_mesh(bad, 8)


def test_sharding_rules_place_params_as_named():
    config = get_preset("gqa-tiny")
    mesh = _mesh((2, 2, 2))
    shardings = state_shardings(config, _optimizer(config), mesh)
    params = shardings.params
    # Weights: "embed" on fsdp, heads / mlp / vocab on tensor; norms' "embed" on fsdp.
    assert params["embed"].spec == PartitionSpec("tensor", "fsdp")
    assert params["layer_0"]["mlp"]["gate"].spec == PartitionSpec("fsdp", "tensor")
    assert params["layer_0"]["mlp"]["down"].spec == PartitionSpec("tensor", "fsdp")
    assert params["layer_0"]["mixer"]["q_proj"].spec == PartitionSpec("fsdp", "tensor", None)
    assert params["final_norm"]["scale"].spec == PartitionSpec("fsdp")
    # An activation's batch takes data x fsdp first, so its "embed" stays whole.
    assert logical_to_sharding(("batch", "length", "embed"), (8, 4, 64), mesh).spec == \
        PartitionSpec(("data", "fsdp"), None, None)
    # A dimension the axis does not divide (4 heads on tensor=8) stays whole instead of failing.
    wide = state_shardings(config, _optimizer(config), _mesh((1, 1, 8))).params
    assert wide["layer_0"]["mixer"]["q_proj"].spec == PartitionSpec("fsdp", None, None)
    assert wide["layer_0"]["mlp"]["gate"].spec == PartitionSpec("fsdp", "tensor")  # 176 = 8 x 22
    # Every leaf is what the rules say, and Adam's moments are placed like their parameters.
    boxed = boxed_abstract_params(config)
    expected = jax.tree.map(lambda b: logical_to_sharding(b.names, b.value.shape, mesh, LOGICAL_RULES), boxed,
                            is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert jax.tree.leaves(params) == jax.tree.leaves(expected)
    adam = shardings.opt_state[1][0]
    assert jax.tree.leaves(adam.mu) == jax.tree.leaves(params) == jax.tree.leaves(adam.nu)


@pytest.mark.parametrize("which", [pytest.param("gqa-tiny", marks=pytest.mark.slow), "hybrid"])
def test_sharded_step_equals_single_device_step(which, rng):
    config = get_preset("gqa-tiny") if which == "gqa-tiny" else _hybrid_tiny()
    optimizer = _optimizer(config)
    batch = _random_batch(rng)

    single = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    initial = jax.device_get(init_state(config, optimizer, single, jax.random.key(1),
                                        state_shardings(config, optimizer, single)))

    def one_step(mesh, accumulate=1):
        shardings = state_shardings(config, optimizer, mesh)
        state = jax.device_put(initial, shardings)
        step = make_train_step(config, optimizer, mesh, shardings, accumulate=accumulate, z_loss=1e-4)
        new, metrics = step(state, put_batch(batch, mesh))
        for got, want in zip(jax.tree.leaves(new.params), jax.tree.leaves(shardings.params)):
            assert got.sharding == want
        return jax.device_get(metrics), jax.device_get(new.params)

    ref_metrics, ref_params = one_step(single)
    runs = {shape: one_step(_mesh(shape)) for shape in MESHES[which]}
    runs["accumulate 4"] = one_step(single, accumulate=4)  # four micro-batches == one batch
    for name, (metrics, params) in runs.items():
        np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6, err_msg=str(name))
        np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5, err_msg=str(name))
        for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-2 * LEARNING_RATE, err_msg=str(name))
    assert ref_metrics["tokens"] == batch["weights"].sum()


# mixattention-tiny is slow: remat's wrapping is the same for every family, and "hybrid" runs it in CI.
@pytest.mark.parametrize("preset", [pytest.param("mixattention-tiny", marks=pytest.mark.slow), "hybrid"])
def test_remat_changes_memory_not_gradients(preset, rng):
    """Rematerialisation recomputes the same values in the backward pass (fp32: 1e-4 of each leaf's scale; the
    recomputed forward may fuse, and so round, differently. Measured: Mamba-2's 8 per-head parameters, whose
    gradients sum many small terms, differed by 1.6e-5 of their largest entry; every other leaf by < 1e-5)."""
    config = _hybrid_tiny() if preset == "hybrid" else get_preset(preset)
    params = init_params(config, jax.random.key(2))
    tokens = jnp.asarray(rng.integers(0, 300, (2, 24)), jnp.int32)

    def loss(params, remat):
        logits = DecoderLM(config, remat=remat).apply({"params": params}, tokens)[0]
        return jnp.mean(jax.nn.log_softmax(logits)[..., 7])

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    want = grad(params, "none")
    for remat in ("dots", "full"):
        for got, ref in zip(jax.tree.leaves(grad(params, remat)), jax.tree.leaves(want)):
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * float(np.abs(ref).max()) + 1e-12)


# --- optimizer ------------------------------------------------------------------------------------
def test_weight_decay_mask_spares_norms_biases_and_recurrence_parameters():
    params = nn.unbox(boxed_abstract_params(get_preset("gdn-h2-tiny")))
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(weight_decay_mask(params))[0]}
    decayed = {k for k, m in flat.items() if m}
    assert "['embed']" in decayed and "['layer_0']['mlp']['gate']" in decayed
    for name in ("A_log", "dt_bias", "'D'", "scale", "conv_bias", "norm"):
        hits = [k for k in flat if name in k]
        assert hits and not decayed & set(hits), name
    s4d = nn.unbox(boxed_abstract_params(get_preset("s4d-tiny")))
    mask = weight_decay_mask(s4d)["layer_0"]["mixer"]
    assert not mask["log_a_real"] and not mask["a_imag"] and not mask["log_dt"] and mask["C"]


def test_learning_rate_schedules():
    for schedule, end in [("cosine", 0.1), ("linear", 0.1), ("constant", 1.0)]:
        lr = learning_rate_schedule(OptimConfig(learning_rate=1.0, warmup_steps=10, schedule=schedule), 110)
        assert float(lr(0)) == 0.0 and abs(float(lr(5)) - 0.5) < 1e-6 and abs(float(lr(10)) - 1.0) < 1e-6
        assert abs(float(lr(110)) - end) < 1e-6
    cosine = learning_rate_schedule(OptimConfig(learning_rate=1.0, warmup_steps=10), 110)
    assert abs(float(cosine(60)) - 0.55) < 1e-6  # halfway down the cosine: (1 + 0.1) / 2


# --- data -----------------------------------------------------------------------------------------
def test_packing_resets_positions_and_masks_cross_document_targets(rng):
    docs = [rng.integers(0, 256, n).astype(np.int32) for n in rng.integers(1, 30, 12)]
    rows = data_lib.pack_documents(docs, 17)
    tokens, segments = np.stack(rows["tokens"]), np.stack(rows["segments"])
    total = sum(len(d) for d in docs)
    assert tokens.shape == (-(-total // 17), 17) and (segments.ravel()[total:] == 0).all()
    np.testing.assert_array_equal(tokens.ravel()[:total], np.concatenate(docs))
    batch = data_lib.rows_to_batch(tokens, segments)
    # Independent check, token by token: a target counts iff it continues its input's document, and
    # positions count from each document's first token in the row.
    for r in range(len(tokens)):
        for t in range(16):
            same = segments[r, t + 1] == segments[r, t] and segments[r, t] > 0
            assert batch["weights"][r, t] == float(same)
            run_start = t
            while run_start > 0 and segments[r, run_start - 1] == segments[r, t]:
                run_start -= 1
            assert batch["positions"][r, t] == t - run_start


def _rows(n, length=9):
    tokens = np.arange(n * length, dtype=np.int32).reshape(n, length)
    return {"tokens": list(tokens), "segments": list(np.ones_like(tokens))}


def test_iterator_is_deterministic_resumable_and_split_per_host():
    import datasets

    rows = datasets.Dataset.from_dict(_rows(50)).with_format("numpy")
    it = data_lib.BatchIterator(rows, 8, seed=3)
    first = [next(it)["inputs"] for _ in range(9)]  # 6 batches an epoch: crosses into epoch 1
    assert it.epoch == 1
    seen = np.concatenate(first[:6])[:, 0] // 9
    assert len(set(seen)) == 48  # an epoch visits distinct rows
    again = data_lib.BatchIterator(rows, 8, seed=3)
    for _ in range(4):
        next(again)
    state = json.loads(json.dumps(again.state()))  # what a checkpoint stores
    resumed = data_lib.BatchIterator(rows, 8, seed=3)
    resumed.restore(state)
    for want in first[4:]:
        np.testing.assert_array_equal(next(resumed)["inputs"], want)
    hosts = [data_lib.BatchIterator(rows, 8, seed=3, process_index=i, process_count=2) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([next(h)["inputs"] for h in hosts]), first[0])
    with pytest.raises(ValueError, match="differs from the checkpoint"):
        data_lib.BatchIterator(rows, 8, seed=4).restore(state)


def test_local_sources_and_bad_sources(tmp_path, rng):
    words = ["".join(rng.choice(list("abcdefgh"), 5)) for _ in range(800)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": " ".join(words[i::40])}) for i in range(40)))
    (tmp_path / "b.txt").write_text("plain text file " * 100)
    tok = ByteTokenizer()
    jsonl = data_lib.prepare(data_lib.DataConfig(source=str(tmp_path / "a.jsonl"), text_field="body", seq_len=31), tok)
    assert len(jsonl.train) > 0 and len(jsonl.heldout) >= 1 and "never trained on" in jsonl.heldout_origin
    train_rows = {r.tobytes() for r in jsonl.train["tokens"]}
    assert not train_rows & {r.tobytes() for r in jsonl.heldout["tokens"]}
    text = data_lib.prepare(data_lib.DataConfig(source=str(tmp_path / "b.txt"), seq_len=31), tok)
    first = text.train[0]["tokens"]
    assert first[0] == tok.bos_id and tok.decode(first[1:]) == ("plain text file " * 2)[:31]  # rows are seq_len + 1 tokens
    with pytest.raises(ConfigError, match="no column 'text'"):
        data_lib.prepare(data_lib.DataConfig(source=str(tmp_path / "a.jsonl"), seq_len=31), tok)
    with pytest.raises(FileNotFoundError, match="no such file"):
        data_lib.prepare(data_lib.DataConfig(source=str(tmp_path / "missing.txt")), tok)


# --- config ---------------------------------------------------------------------------------------
def test_overrides_parse_by_type_and_reject_unknown_keys():
    config = TrainConfig().with_overrides(["steps=7", "optim.learning_rate=1e-2", "data.source=x.txt",
                                           "model.max_seq_len=4096", "mesh=data=2,tensor=4"])
    assert (config.steps, config.optim.learning_rate, config.data.source, config.mesh) == (7, 0.01, "x.txt",
                                                                                          "data=2,tensor=4")
    assert config.model_config(259).max_seq_len == 4096
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for bad, field in [(["stepz=3"], "stepz"), (["optim.lr=3"], "optim.lr"), (["steps=many"], "steps"),
                       (["batch_size=10", "grad_accum=3"], "grad_accum"), (["optim.schedule=step"], "optim.schedule")]:
        with pytest.raises(ConfigError) as e:
            TrainConfig().with_overrides(bad)
        assert e.value.field == field
    with pytest.raises(ConfigError, match="tokenizer's"):
        TrainConfig().model_config(32000)


def test_kernel_impl_reaches_every_recurrent_layer():
    model = TrainConfig(preset="gdn-h2-tiny", kernel_impl="xla").model_config(259)
    impls = [getattr(layer.mixer_config, "impl", None) for layer in model.layers]
    assert "xla" in impls and set(impls) <= {"xla", None}  # attention layers have no scan kernel
    assert {getattr(layer.mixer_config, "impl", None) for layer in TrainConfig(preset="gdn-h2-tiny").model_config(259).layers} <= {"auto", None}
    with pytest.raises(ConfigError) as e:
        TrainConfig().with_overrides(["kernel_impl=cuda"])
    assert e.value.field == "kernel_impl"
