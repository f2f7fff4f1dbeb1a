"""Recurrent mixers (Mamba-2, S4D, Gated DeltaNet, RetNet, mLSTM, sLSTM): the cores against float64
NumPy loops of the papers' equations, and for every mixer the three forms against each other.

Tolerances (max |a - b| / max |b|): float32 1e-5 for outputs (1e-4 for gradients, which sum many more
terms; 1e-3 for RetNet's outputs and 5e-3 for its gradients, see reference.RETNET_FLOAT32_TOLERANCE; the
mLSTM's normaliser division: reference.MLSTM_CORE_FLOAT32_TOLERANCE and MLSTM_GRAD_FLOAT32_TOLERANCE); bfloat16 4e-2 (projections
run in bfloat16, the recurrences in float32 in every form).
Packed rows (two documents in row 0) and lengths that are not a multiple of the chunk (8) throughout.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recurrent_reference as ref
from inputs import decode_in_chunks, decode_on_mesh, forward, init, packed_batch
from reference import (MLSTM_CORE_FLOAT32_TOLERANCE, MLSTM_GRAD_FLOAT32_TOLERANCE, RETNET_GRAD_FLOAT32_TOLERANCE,
                       TOLERANCE, relative_error, tolerance)
from zoo.layers.gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig, delta_chunked, delta_step
from zoo.layers.mamba2 import Mamba2, Mamba2Config
from zoo.layers.recurrent import naive_scan, continues
from zoo.layers.retnet import RetNetConfig, Retention
from zoo.layers.s4d import S4D, S4DConfig, discretise, s4d_chunked, s4d_fft
from zoo.layers.ssd import ssd_chunked, ssd_step
from zoo.layers.xlstm import MLSTM, SLSTM, MLSTMConfig, SLSTMConfig, mlstm_chunked, mlstm_step, slstm_step

D_MODEL = 16
CHUNK = 8
MIXERS = {
    "mamba2": (Mamba2, Mamba2Config(num_heads=4, head_dim=8, state_dim=8, num_groups=2, chunk_size=CHUNK)),
    "s4d-inv-zoh": (S4D, S4DConfig(state_dim=8, chunk_size=CHUNK)),
    "s4d-lin-bilinear": (S4D, S4DConfig(state_dim=8, init="lin", discretisation="bilinear", chunk_size=CHUNK)),
    "gated_deltanet": (GatedDeltaNet, GatedDeltaNetConfig(num_heads=2, head_dim=8, chunk_size=CHUNK)),
    "retnet": (Retention, RetNetConfig(num_heads=3, head_dim=8, chunk_size=CHUNK)),
    "mlstm": (MLSTM, MLSTMConfig(num_heads=2, inner_dim=32, chunk_size=CHUNK)),
    "mlstm-dense": (MLSTM, MLSTMConfig(num_heads=2, inner_dim=16, chunk_size=CHUNK, layout="dense")),
    "slstm": (SLSTM, SLSTMConfig(num_heads=2, head_dim=8)),
}
# The dense mLSTM layout runs the same cell and scan as "mlstm"; only its projections and output path are its own,
# which the forward, decode, document and cache tests cover. The gradient and state tests run on the block layout
# only.
CELL_TESTED_ELSEWHERE = {"mlstm-dense"}
GRAD_TOLERANCE = 1e-4
# Mixers whose float32 rounding is amplified by a division (see tests/reference.py for the measurements).
GRAD_TOLERANCE_FOR = {"mlstm": MLSTM_GRAD_FLOAT32_TOLERANCE, "retnet": RETNET_GRAD_FLOAT32_TOLERANCE}


def perturb(params, rng, scale=0.3):
    """Random offsets on every parameter, so that zero-initialised gates and recurrent weights are live."""
    return jax.tree.map(lambda p: p + scale * rng.standard_normal(p.shape).astype(np.float32), params)


def setup(name, rng, length, dtype="float32", batch=2):
    module_type, cfg = MIXERS[name]
    x, positions, segments = packed_batch(rng, batch, length, D_MODEL)
    module = module_type(cfg, D_MODEL, dtype=jnp.dtype(dtype))
    params = perturb(init(module, x, positions, segments, seed=int(rng.integers(1 << 30))), rng)
    return module_type, cfg, module, params, x, positions, segments


# --- the cores against the papers' equations ------------------------------------------------------

def core_inputs(rng, length, heads=3, dk=4, dv=5):
    _, positions, segments = packed_batch(rng, 2, length, 1)
    normal = lambda *shape: rng.standard_normal((2, length, *shape)).astype(np.float32)
    return normal(heads, dk), normal(heads, dk), normal(heads, dv), segments


def both_forms(step, chunked, inputs, segments, state):
    carry = continues(jnp.asarray(segments), None)
    naive, _ = naive_scan(step, state, inputs, carry)
    fast, _ = chunked(*inputs, jnp.asarray(segments), state, None, CHUNK)
    return naive, fast


@pytest.mark.parametrize("length", [5, 16, 37])
def test_ssd_core_matches_reference(length, rng):
    q, k, v, segments = core_inputs(rng, length)
    log_decay = -rng.uniform(0, 2, (2, length, 3)).astype(np.float32)
    expected = ref.linear_recurrence(q, k, v, log_decay, segments)
    naive, fast = both_forms(ssd_step, ssd_chunked, (q, k, v, log_decay), segments, jnp.zeros((2, 3, 4, 5)))
    assert relative_error(naive, expected) < TOLERANCE["float32"]
    assert relative_error(fast, expected) < TOLERANCE["float32"]


def test_retention_chunked_equals_parallel_form(rng):
    q, k, v, _ = core_inputs(rng, 29)
    segments = np.ones((2, 29), np.int32)
    log_gamma = np.asarray(RetNetConfig(num_heads=3, head_dim=4).log_decays())
    expected = ref.retention_parallel(q, k, v, log_gamma)
    decay = np.broadcast_to(log_gamma, (2, 29, 3))
    out, _ = ssd_chunked(q, k, v, decay, jnp.asarray(segments), jnp.zeros((2, 3, 4, 5)), None, CHUNK)
    assert relative_error(out, expected) < TOLERANCE["float32"]


@pytest.mark.parametrize("length", [5, 16, 37])
def test_gated_delta_core_matches_reference(length, rng):
    q, k, v, segments = core_inputs(rng, length)
    q, k = (a / np.linalg.norm(a, axis=-1, keepdims=True) for a in (q, k))  # as the layer feeds it
    log_alpha = -rng.uniform(0, 1, (2, length, 3)).astype(np.float32)
    beta = rng.uniform(0, 1, (2, length, 3)).astype(np.float32)
    expected = ref.gated_delta_rule(q, k, v, log_alpha, beta, segments)
    naive, fast = both_forms(delta_step, delta_chunked, (q, k, v, log_alpha, beta), segments, jnp.zeros((2, 3, 4, 5)))
    assert relative_error(naive, expected) < TOLERANCE["float32"]
    assert relative_error(fast, expected) < TOLERANCE["float32"]


@pytest.mark.parametrize("length", [5, 16, 37])
def test_mlstm_core_matches_reference(length, rng):
    q, k, v, segments = core_inputs(rng, length)
    q = q / 2.0
    log_i = 2.0 * rng.standard_normal((2, length, 3)).astype(np.float32)
    log_f = np.asarray(jax.nn.log_sigmoid(rng.normal(2.0, 1.5, (2, length, 3)).astype(np.float32)))
    expected = ref.mlstm(q, k, v, log_i, log_f, segments)
    state = {"C": jnp.zeros((2, 3, 4, 5)), "n": jnp.zeros((2, 3, 4)), "m": jnp.zeros((2, 3))}
    naive, fast = both_forms(mlstm_step, mlstm_chunked, (q, k, v, log_i, log_f), segments, state)
    assert relative_error(naive, expected) < MLSTM_CORE_FLOAT32_TOLERANCE
    assert relative_error(fast, expected) < MLSTM_CORE_FLOAT32_TOLERANCE


def test_slstm_core_matches_reference(rng):
    _, _, segments = packed_batch(rng, 2, 23, 1)
    gates_x = rng.standard_normal((2, 23, 4, 2, 3)).astype(np.float32)
    kernel = 0.5 * rng.standard_normal((2, 3, 4, 3)).astype(np.float32)
    expected = ref.slstm(gates_x, kernel, segments)
    state = {name: jnp.zeros((2, 2, 3)) for name in ("h", "c", "n", "m")}
    out, _ = naive_scan(lambda s, g, c: slstm_step(s, kernel, g, c), state, (gates_x,), continues(jnp.asarray(segments), None))
    assert relative_error(out, expected) < TOLERANCE["float32"]


def s4d_ssm(rng, discretisation, channels=3, modes=4):
    """Random discretised S4D-Lin parameters: (log A_bar, B_bar, C)."""
    log_a_bar, b_bar = discretise(
        jnp.asarray(rng.uniform(np.log(1e-2), np.log(0.5), channels), jnp.float32),
        jnp.asarray(rng.uniform(np.log(0.1), np.log(1.0), (channels, modes)), jnp.float32),
        jnp.asarray(np.pi * np.arange(modes) * np.ones((channels, 1)), jnp.float32),
        discretisation,
    )
    c = jnp.asarray(rng.standard_normal((channels, modes)) + 1j * rng.standard_normal((channels, modes)), jnp.complex64)
    return log_a_bar, b_bar, c


@pytest.mark.parametrize("discretisation", ["zoh", "bilinear"])
def test_s4d_chunked_kernel_form_matches_convolution(discretisation, rng):
    _, _, segments = packed_batch(rng, 2, 37, 1)
    channels, modes = 3, 4
    u = rng.standard_normal((2, 37, channels)).astype(np.float32)
    log_a_bar, b_bar, c = s4d_ssm(rng, discretisation, channels, modes)
    expected = ref.s4d_convolution(u, log_a_bar, b_bar, c, segments)
    out, _ = s4d_chunked(jnp.asarray(u), jnp.asarray(segments), jnp.zeros((2, channels, modes), jnp.complex64), None, CHUNK,
                         log_a_bar=log_a_bar, b_bar=b_bar, c=c)
    assert relative_error(out, expected) < TOLERANCE["float32"]


@pytest.mark.parametrize("discretisation", ["zoh", "bilinear"])
def test_s4d_fft_form_matches_convolution(discretisation, rng):
    """The FFT form is the full-length convolution of one sequence per row (float32 FFT rounding: 1e-5)."""
    channels, modes, length = 3, 4, int(rng.integers(20, 70))
    u = rng.standard_normal((2, length, channels)).astype(np.float32)
    log_a_bar, b_bar, c = s4d_ssm(rng, discretisation, channels, modes)
    expected = ref.s4d_convolution(u, log_a_bar, b_bar, c, np.ones((2, length), np.int32))
    out = s4d_fft(jnp.asarray(u), log_a_bar=log_a_bar, b_bar=b_bar, c=c)
    assert relative_error(out, expected) < TOLERANCE["float32"]


# --- every mixer: the three forms agree -----------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("length", [16, 37])
@pytest.mark.parametrize("name", sorted(MIXERS))
def test_chunked_matches_naive(name, length, dtype, rng):
    module_type, cfg, module, params, x, positions, segments = setup(name, rng, length, dtype)
    naive = module_type(cfg, D_MODEL, dtype=jnp.dtype(dtype), form="naive")
    out = forward(module, params, x, positions, segments)
    expected = forward(naive, params, x, positions, segments)
    assert relative_error(out, expected) < tolerance(name, dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(MIXERS))
def test_decode_matches_forward(name, dtype, rng):
    """Prefill, single-token steps and a multi-token continuation through the cache."""
    *_, module, params, x, positions, segments = setup(name, rng, 29, dtype)
    out, _ = decode_in_chunks(module, params, x, positions, segments, [6, 1, 1, 11, 1, 1, 8], 32, jnp.dtype(dtype))
    expected = forward(module, params, x, positions, segments)
    assert relative_error(out, expected) < tolerance(name, dtype)


@pytest.mark.parametrize("name", sorted(set(MIXERS) - CELL_TESTED_ELSEWHERE))
def test_gradients_of_chunked_match_naive(name, rng):
    module_type, cfg, module, params, x, positions, segments = setup(name, rng, 21)
    naive = module_type(cfg, D_MODEL, form="naive")
    cotangent = rng.standard_normal((2, 21, D_MODEL)).astype(np.float32)

    def grads(m):
        loss = lambda p, xs: jnp.sum(forward(m, p, xs, positions, segments) * cotangent)
        return jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x))

    got, want = grads(module), grads(naive)
    limit = GRAD_TOLERANCE_FOR.get(name, GRAD_TOLERANCE)
    scale = max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(want))
    for (path, got_leaf), want_leaf in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        if name == "mlstm" and "input_gate_bias" in jax.tree_util.keystr(path):
            # Shifting every input gate by b shifts the max-state m by b and leaves C/e^m, n/e^m unchanged,
            # so the output moves only through the exp(-m) floor: this gradient is a nearly cancelling sum
            # (|grad| ~ 0.02 where others reach ~50) and its relative error is rounding noise (60 seeds:
            # median 7e-6, max 5.3e-4). It is held to the tolerance against the gradients' scale instead.
            assert float(jnp.max(jnp.abs(got_leaf - want_leaf))) < limit * scale
        else:
            assert relative_error(got_leaf, want_leaf) < limit


def test_mlstm_gradients_with_saturated_gates(rng):
    """Gate biases as recurrent initialisation sets them (input 10, forget 6: every input gate near the soft cap, so
    many entries of a row tie for the max-state). jnp.max's gradient divided by the count of entries equal to the
    max, and XLA without LLVM's optimisations (as this suite runs) rounded a recomputed entry differently: the
    count was 0 and the gate gradients NaN (seen with one chunk longer than the sequence). The chunked form's
    gradients must equal the naive scan's."""
    cfg = MLSTMConfig(num_heads=2, inner_dim=16, chunk_size=64, layout="dense")
    module = MLSTM(cfg, D_MODEL)
    x, positions, segments = packed_batch(rng, 4, 32, D_MODEL)
    params = perturb(init(module, x, positions, segments, seed=int(rng.integers(1 << 30))), rng)
    params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.full_like(leaf, 10.0) if "input_gate_bias" in jax.tree_util.keystr(path)
        else jnp.full_like(leaf, 6.0) if "forget_gate_bias" in jax.tree_util.keystr(path) else leaf, params)
    naive = MLSTM(cfg, D_MODEL, form="naive")
    cotangent = rng.standard_normal((4, 32, D_MODEL)).astype(np.float32)

    def grads(m):  # jitted: the NaN came from how XLA fused the program
        return jax.jit(jax.grad(lambda p: jnp.sum(forward(m, p, x, positions, segments) * cotangent)))(params)

    got, want = grads(module), grads(naive)
    scale = max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(want))
    for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.all(np.isfinite(got_leaf))
        # Saturated gates make the max-state's gradient a cancelling sum: held to the tolerance against the scale.
        assert float(jnp.max(jnp.abs(got_leaf - want_leaf))) < MLSTM_GRAD_FLOAT32_TOLERANCE * scale


@pytest.mark.parametrize("name", sorted(set(MIXERS) - CELL_TESTED_ELSEWHERE))
def test_state_carried_across_calls_equals_one_call(name, rng):
    *_, module, params, x, positions, segments = setup(name, rng, 30)
    split, _ = decode_in_chunks(module, params, x, positions, segments, [13, 17], 32)
    whole, whole_cache = decode_in_chunks(module, params, x, positions, segments, [30], 32)
    _, split_cache = decode_in_chunks(module, params, x, positions, segments, [13, 17], 32)
    assert relative_error(split, whole) < tolerance(name, "float32")
    assert relative_error(whole, forward(module, params, x, positions, segments)) < tolerance(name, "float32")
    for got, want in zip(jax.tree.leaves(split_cache), jax.tree.leaves(whole_cache)):
        assert relative_error(got, want) < tolerance(name, "float32") or np.array_equal(got, want)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_documents_do_not_leak_into_each_other(name, rng):
    *_, module, params, x, positions, segments = setup(name, rng, 24)
    first_doc = segments[0] == 1
    changed = x.copy()
    changed[0, first_doc] = rng.standard_normal(changed[0, first_doc].shape)
    before = np.asarray(forward(module, params, x, positions, segments))
    after = np.asarray(forward(module, params, changed, positions, segments))
    # Masked terms contribute exact zeros, but XLA may reassociate the sums they sit in: allow rounding.
    assert relative_error(after[0, ~first_doc], before[0, ~first_doc]) < tolerance(name, "float32")
    assert relative_error(after[0, first_doc], before[0, first_doc]) > 0.01


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_cache_size_does_not_grow_with_context(name):
    module_type, cfg = MIXERS[name]
    module = module_type(cfg, D_MODEL)
    sizes = {n: sum(a.size for a in jax.tree.leaves(module.init_cache(2, n))) for n in (16, 4096)}
    assert sizes[16] == sizes[4096] > 0


def test_recurrent_cache_shards_heads_on_the_tensor_axis(rng):
    """8 fake devices, mesh (data=2, fsdp=1, tensor=4): Mamba-2's state splits its heads over
    "tensor", and the jitted sharded decode equals the single-device one."""
    *_, module, params, x, positions, segments = setup("mamba2", rng, 12)
    single, _ = decode_in_chunks(module, params, x, positions, segments, [5] + [1] * 7, 16)
    rules = (("batch", "data"), ("cache_batch", "data"), ("heads", "tensor"))
    sharded, cache = decode_on_mesh(module, params, x, positions, segments, [5] + [1] * 7, 16, rules)
    assert tuple(cache.state["ssm"].sharding.spec) == ("data", "tensor", None, None)
    assert cache.state["ssm"].addressable_shards[0].data.shape == (1, 1, 8, 8)
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5)
