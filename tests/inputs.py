"""Random inputs and drivers shared by the mixer and kernel tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from zoo.pallas_kernels import dispatch


def impl_for(platform: str) -> str:
    """The compiled kernel where the tests run on that platform, else its interpreter."""
    return "pallas" if dispatch.resolve("auto").kind == platform else "interpret"


def packed_batch(rng: np.random.Generator, batch: int, length: int, d_model: int):
    """x [B,T,D] and, per row, one or two packed documents (positions restart, segment ids differ)."""
    x = rng.standard_normal((batch, length, d_model)).astype(np.float32)
    positions = np.tile(np.arange(length), (batch, 1))
    segments = np.ones((batch, length), np.int64)
    split = int(rng.integers(length // 4, 3 * length // 4))
    positions[0, split:] = np.arange(length - split)
    segments[0, split:] = 2
    return x, positions.astype(np.int32), segments.astype(np.int32)


def init(module, x, positions, segments, seed=0):
    variables = module.init(jax.random.key(seed), jnp.asarray(x), positions=positions, segment_ids=segments)
    return nn.unbox(variables["params"])


def randomize(params, rng, names=("sink_logits",)):
    """Replace zero-initialised parameters the tests need non-trivial (e.g. sink logits)."""
    return {k: (rng.standard_normal(v.shape).astype(np.float32) if k in names else v) for k, v in params.items()}


def forward(module, params, x, positions, segments):
    return module.apply({"params": params}, jnp.asarray(x), positions=positions, segment_ids=segments)[0]


def decode_in_chunks(module, params, x, positions, segments, chunks, max_len, dtype=jnp.float32):
    """Feed x through the mixer's cache path in chunks (sizes summing to T); returns outputs and cache."""
    step = jax.jit(lambda p, c, xs, pos, seg: module.apply({"params": p}, xs, positions=pos, segment_ids=seg, cache=c))
    return _feed(step, params, module.init_cache(x.shape[0], max_len, dtype), x, positions, segments, chunks)


def _feed(step, params, cache, x, positions, segments, chunks):
    outs, start = [], 0
    for size in chunks:
        sl = slice(start, start + size)
        y, cache = step(params, cache, jnp.asarray(x[:, sl]), positions[:, sl], segments[:, sl])
        outs.append(y)
        start += size
    assert start == x.shape[1]
    return jnp.concatenate(outs, axis=1), cache


def single_document(x):
    batch, length = x.shape[:2]
    return np.tile(np.arange(length, dtype=np.int32), (batch, 1)), np.ones((batch, length), np.int32)


def decode_on_mesh(module, params, x, positions, segments, chunks, max_len, rules):
    """decode_in_chunks under a (data=2, fsdp=1, tensor=4) mesh of 8 fake devices, the cache placed
    by its logical axes through `rules`. Returns outputs and the (sharded) final cache."""
    from jax.sharding import Mesh, NamedSharding

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 1, 4), ("data", "fsdp", "tensor"))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        cache = module.init_cache(x.shape[0], max_len, jnp.float32)
        shardings = jax.tree.map(
            lambda axes: NamedSharding(mesh, nn.logical_to_mesh_axes(axes, rules)),
            cache.logical_axes(), is_leaf=lambda a: isinstance(a, tuple),
        )
        cache = jax.device_put(cache, shardings)
        step = jax.jit(
            lambda p, c, xs, pos, seg: module.apply({"params": p}, xs, positions=pos, segment_ids=seg, cache=c),
            out_shardings=(None, shardings),
        )
        outs, cache = _feed(step, params, cache, x, positions, segments, chunks)
    return np.asarray(outs), cache


def small_hybrid(max_seq_len: int, chunk_size: int):
    """An attention + Mamba-2 model config with the byte tokenizer's vocabulary, for checkpoint-level tests."""
    from zoo.config import LayerConfig, ModelConfig
    from zoo.layers.attention import AttentionConfig
    from zoo.layers.mamba2 import Mamba2Config
    from zoo.tokenizer import ByteTokenizer

    layers = (LayerConfig("attention", AttentionConfig(4, 2, 8)),
              LayerConfig("mamba2", Mamba2Config(num_heads=4, head_dim=8, state_dim=8, num_groups=2,
                                                 chunk_size=chunk_size)))
    return ModelConfig(vocab_size=ByteTokenizer.padded_vocab_size, d_model=32, mlp_hidden=64, layers=layers,
                       max_seq_len=max_seq_len)


def saved_model(directory, config, step: int, seed: int):
    """A zoo checkpoint of `config` with random weights (byte tokenizer) in `directory`; returns the directory."""
    from zoo.model import init_params
    from zoo.tokenizer import ByteTokenizer
    from zoo.train.checkpoint import Checkpoints

    checkpoints = Checkpoints(directory / "checkpoints")
    checkpoints.save_model(step, init_params(config, jax.random.key(seed)), config, ByteTokenizer(), {"step": step})
    checkpoints.wait()
    checkpoints.close()
    return directory
