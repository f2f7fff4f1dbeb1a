"""Pallas scan kernels (zoo.pallas_kernels) against their XLA references: forward and every gradient.

On the CPU both the GPU kernel (Triton interpret mode) and the TPU kernel (Mosaic interpret mode) run;
on a GPU or TPU the compiled kernel of that platform replaces its interpreter (same tests; run them
there with JAX_PLATFORMS unset)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inputs import forward, impl_for, init, packed_batch
from reference import (MLSTM_SCAN_GRAD_BF16_RMS_TOLERANCE, MLSTM_SCAN_GRAD_FLOAT32_TOLERANCE, TOLERANCE, relative_error,
                       relative_rms_error, tolerance)
from zoo.errors import ConfigError
from zoo.layers.gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig
from zoo.layers.mamba2 import Mamba2, Mamba2Config
from zoo.layers.retnet import RetNetConfig, Retention
from zoo.layers.xlstm import MLSTM, MLSTMConfig
from zoo.pallas_kernels import dispatch
from zoo.pallas_kernels.delta_scan import delta_scan
from zoo.pallas_kernels.delta_scan.reference import delta_scan_reference
from zoo.pallas_kernels.ssd_scan import ssd_scan
from zoo.pallas_kernels.ssd_scan.mlstm import mlstm_scan
from zoo.pallas_kernels.ssd_scan.reference import ssd_scan_reference

CHUNK = 16


def random_documents(rng, batch, length):
    """Packed rows: a new document starts at ~1 in 12 tokens."""
    return jnp.asarray(np.cumsum(rng.uniform(size=(batch, length)) < 1 / 12, axis=1), jnp.int32)


def scan_inputs(rng, dtype, batch=2, groups=None, heads=None, dk=None):
    """Random shapes: T not a multiple of the chunk, grouped q/k, a feature size that is not a power of
    two; even rows continue their initial state (last_segment = their first segment), odd rows start
    fresh."""
    length = int(rng.integers(2 * CHUNK + 1, 4 * CHUNK)) | 1
    groups = groups or int(rng.choice([1, 2]))
    heads = heads or groups * int(rng.choice([1, 2]))
    dk, dv = dk or int(rng.choice([16, 24])), int(rng.choice([16, 32]))

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32).astype(dtype).astype(jnp.float32)

    segment_ids = random_documents(rng, batch, length)
    last_segment = segment_ids[:, 0] - jnp.arange(batch) % 2
    return dict(
        q=normal(batch, length, groups, dk), k=normal(batch, length, groups, dk) / np.sqrt(dk),
        v=normal(batch, length, heads, dv),
        log_decay=jnp.asarray(-rng.uniform(0.0, 0.7, size=(batch, length, heads)), jnp.float32),
        segment_ids=segment_ids, state=normal(batch, heads, dk, dv), last_segment=last_segment,
    )


DIFFERENTIABLE = ("q", "k", "v", "log_decay", "state")


def random_weights(rng, outputs_like):
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), outputs_like)


def loss_and_grads(run, inputs, weights, differentiable=DIFFERENTIABLE):
    """A random linear functional of (o, final state) and its gradients wrt every differentiable input."""
    fixed = {name: value for name, value in inputs.items() if name not in differentiable}

    def loss(*args):
        outputs = run(**dict(zip(differentiable, args)), **fixed)
        products = jax.tree.map(lambda a, w: jnp.sum(a.astype(jnp.float32) * w), outputs, weights)
        return sum(jax.tree.leaves(products)), outputs

    (_, outputs), grads = jax.value_and_grad(loss, argnums=range(len(differentiable)), has_aux=True)(
        *(inputs[name] for name in differentiable))
    return outputs, dict(zip(differentiable, grads))


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ssd_scan_matches_reference(rng, platform, dtype):
    inputs = scan_inputs(rng, jnp.dtype(dtype))
    weights = random_weights(rng, (inputs["v"], inputs["state"]))

    def kernel(**a):
        return ssd_scan(**a, chunk_size=CHUNK, impl=impl_for(platform), dtype=jnp.dtype(dtype), platform=platform)

    def reference(**a):
        return ssd_scan_reference(**a, chunk_size=CHUNK)

    (o, final), grads = jax.jit(lambda i: loss_and_grads(kernel, i, weights))(inputs)
    with jax.default_matmul_precision("float32"):  # no TF32 in the reference on a GPU
        (o_ref, final_ref), grads_ref = jax.jit(lambda i: loss_and_grads(reference, i, weights))(inputs)
    tol = TOLERANCE[dtype]
    assert o.dtype == jnp.dtype(dtype)
    assert relative_error(o.astype(jnp.float32), o_ref) < tol
    assert relative_error(final, final_ref) < tol
    for name in DIFFERENTIABLE:
        assert relative_error(grads[name], grads_ref[name]) < tol, name
    # Row 1 starts fresh: its initial state gets no gradient; row 0 continues it and does.
    assert float(jnp.abs(grads["state"][1]).max()) == 0.0 < float(jnp.abs(grads["state"][0]).max())


def test_ssd_scan_refuses_bad_requests():
    inputs = {k: v for k, v in scan_inputs(np.random.default_rng(0), jnp.float32).items()}
    if dispatch.resolve("auto").kind == "xla":
        with pytest.raises(ValueError, match="impl='interpret'"):
            ssd_scan(**inputs, impl="pallas")
    with pytest.raises(ValueError, match="impl must be one of"):
        ssd_scan(**inputs, impl="triton")
    with pytest.raises(ValueError, match="power of two"):
        ssd_scan(**inputs, chunk_size=48, impl="interpret", platform="gpu")
    with pytest.raises(ValueError, match="G dividing"):
        ssd_scan(**{**inputs, "q": inputs["q"][:, :, :1, :3]}, impl="interpret")
    for _, config in LAYERS.values():
        with pytest.raises(ConfigError) as e:
            dataclasses.replace(config, impl="cuda").validate("layers[0].mixer_config")
        assert e.value.field == "layers[0].mixer_config.impl"


def normaliser_margin(inputs) -> float:
    """The smallest |log|n_t.q_t| + m_t| over all tokens: how far every token's normaliser max(|n.q|, e^-m)
    is from switching branch (float64 loop over the mLSTM recurrence)."""
    q, k = (np.asarray(inputs[n], np.float64) for n in ("q", "k"))
    log_i, log_f = (np.asarray(inputs[n], np.float64) for n in ("log_i", "log_f"))
    segments, last = np.asarray(inputs["segment_ids"]), np.asarray(inputs["last_segment"])
    n_state, m_state = np.asarray(inputs["state"]["n"], np.float64), np.asarray(inputs["state"]["m"], np.float64)
    margin = np.inf
    for b in range(q.shape[0]):
        n, m, previous = n_state[b].copy(), m_state[b].copy(), last[b]
        for t in range(q.shape[1]):
            m_prev = m if segments[b, t] == previous else np.full_like(m, -1e30)
            m_new = np.maximum(log_f[b, t] + m_prev, log_i[b, t])
            n = np.exp(log_f[b, t] + m_prev - m_new)[:, None] * n + np.exp(log_i[b, t] - m_new)[:, None] * k[b, t]
            m, previous = m_new, segments[b, t]
            margin = min(margin, float(np.min(np.abs(np.log(np.abs(np.sum(n * q[b, t], -1)) + 1e-300) + m))))
    return margin


def mlstm_inputs(rng, dtype, batch=2, margin=0.0):
    """As scan_inputs, with mLSTM's gates (input gate pre-activations of either sign, forget gates near
    1) and an initial (C, n, m) whose max-state m is random. margin > 0 redraws until every token's
    normaliser is at least that far (in log) from switching branch."""
    for _ in range(50):
        inputs = _mlstm_draw(rng, dtype, batch)
        if margin <= 0 or normaliser_margin(inputs) > margin:
            return inputs
    raise AssertionError(f"no draw in 50 kept every normaliser {margin} from its switch")


def _mlstm_draw(rng, dtype, batch):
    heads = int(rng.choice([1, 2]))
    inputs = scan_inputs(rng, dtype, batch=batch, groups=heads, heads=heads)
    batch, length, heads, dv = inputs["v"].shape
    dk = inputs["q"].shape[-1]
    gate = lambda shift: jnp.asarray(rng.normal(shift, 1.5, size=(batch, length, heads)), jnp.float32)  # noqa: E731
    state = {"C": inputs["state"], "n": jnp.asarray(rng.normal(size=(batch, heads, dk)), jnp.float32),
             "m": jnp.asarray(rng.normal(size=(batch, heads)), jnp.float32)}
    return dict(q=inputs["q"] / np.sqrt(dk), k=inputs["k"], v=inputs["v"], log_i=gate(0.0),
                log_f=jax.nn.log_sigmoid(gate(3.0)), segment_ids=inputs["segment_ids"], state=state,
                last_segment=inputs["last_segment"])


def mlstm_against_chunkwise(rng, platform, dtype):
    """((h, final state), gradients) of mLSTM on the scan kernels and of xlstm.mlstm_chunked in float32, on one
    draw of inputs and loss weights (also bench/mlstm_scan_tolerance.py's measurement)."""
    # The normaliser max(|n.q|, e^-m) has a kink: a token near it may take the other branch after bf16
    # rounding, and the gradients jump there (not a rounding-sized error: a draw whose closest token was
    # 0.1% from the kink gave gate gradients 29% off while h agreed to 0.3%). bf16 draws therefore keep
    # every token 3% (in log) from the kink, several times bf16's rounding of n.q.
    inputs = mlstm_inputs(rng, jnp.dtype(dtype), margin=0.03 if dtype == "bfloat16" else 0.0)
    names = ("q", "k", "v", "log_i", "log_f", "state")
    weights = random_weights(rng, (inputs["v"], inputs["state"]))

    def run(impl, **kw):
        return lambda **a: mlstm_scan(**a, chunk_size=CHUNK, impl=impl, **kw)

    kernel = run(impl_for(platform), dtype=jnp.dtype(dtype), platform=platform)
    got = jax.jit(lambda i: loss_and_grads(kernel, i, weights, names))(inputs)
    with jax.default_matmul_precision("float32"):
        want = jax.jit(lambda i: loss_and_grads(run("xla"), i, weights, names))(inputs)
    return got, want


@pytest.mark.parametrize("platform, dtype", [("gpu", "float32"), ("gpu", "bfloat16"), ("tpu", "float32")])
def test_mlstm_scan_matches_the_chunkwise_form(rng, platform, dtype):
    """mLSTM on the scan kernels (stabilised reparametrisation) equals xlstm.mlstm_chunked: h, the final
    (C, n, m), and the gradients of q, k, v, both gates and the initial state."""
    ((h, final), grads), ((h_ref, final_ref), grads_ref) = mlstm_against_chunkwise(rng, platform, dtype)
    # h divides by max(|n.q|, exp(-m)); near that floor bf16 rounding can flip which branch a token takes,
    # so bf16 is compared by relative RMS (a few flipped tokens do not dominate it) and without the
    # initial (n, m) gradients, which flow only through that switch. float32: everything by max error, the
    # gradients at MLSTM_SCAN_GRAD_FLOAT32_TOLERANCE (measured in reference.py), the initial (n, m) ones at their own
    # tolerance (below).
    if dtype == "float32":
        error, tol = relative_error, TOLERANCE[dtype]
    else:
        error, tol = relative_rms_error, TOLERANCE[dtype]
    assert error(h, h_ref) < tol
    for key in ("C", "n", "m"):
        assert error(final[key], final_ref[key]) < tol, key
    skipped = ("n", "m")  # float32: compared below at their own tolerance; bf16: not compared (see above)
    compared = lambda g: dict(g, state={k: v for k, v in g["state"].items() if k not in skipped})  # noqa: E731
    def grad_tol(name):  # measured in reference.py; in bf16 the normaliser and gates amplify rounding
        if dtype == "float32":
            return MLSTM_SCAN_GRAD_FLOAT32_TOLERANCE
        return MLSTM_SCAN_GRAD_BF16_RMS_TOLERANCE if name in ("q", "k", "log_i", "log_f") else tol

    for name, got in compared(grads).items():
        for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(compared(grads_ref)[name])):
            assert error(got_leaf, want_leaf) < grad_tol(name), name
    if dtype == "float32":
        # The initial (n, m) gradients are sums over every token of terms that cancel in exact arithmetic (m
        # leaves h except through the normaliser's floor), so float32 rounding shows larger relative to them:
        # measured 7.5e-5 for m's (seed 459753039), every other gradient < 1e-5.
        for key in ("n", "m"):
            assert relative_error(grads["state"][key], grads_ref["state"][key]) < 2e-4, key


def delta_inputs(rng, dtype, batch=2, heads=None, dk=None):
    """As scan_inputs (one group per head), with the delta rule's L2-normalised keys and beta in (0, 1)."""
    heads = heads or int(rng.choice([1, 2]))
    inputs = scan_inputs(rng, dtype, batch=batch, groups=heads, heads=heads, dk=dk)
    unit = lambda a: (a / jnp.linalg.norm(a, axis=-1, keepdims=True)).astype(dtype).astype(jnp.float32)  # noqa: E731
    beta = jax.nn.sigmoid(jnp.asarray(rng.normal(size=inputs["log_decay"].shape), jnp.float32))
    return dict(q=unit(inputs["q"]) / np.sqrt(inputs["q"].shape[-1]), k=unit(inputs["k"]), v=inputs["v"],
                log_alpha=inputs["log_decay"], beta=beta, segment_ids=inputs["segment_ids"], state=inputs["state"],
                last_segment=inputs["last_segment"])


DELTA_DIFFERENTIABLE = ("q", "k", "v", "log_alpha", "beta", "state")
# Two of the GPU WY kernels' 16-row blocks per chunk, so documents and the decay cross blocks (the
# inputs' T is odd and longer than this chunk); K = 72 pads to 128 on GPUs, two of the chunk-gradient
# kernel's 64-wide K-tiles.
DELTA_CHUNK = 2 * CHUNK
DELTA_KEY_DIM = 72


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_delta_scan_matches_reference(rng, platform, dtype):
    """The gated delta rule kernels equal gated_deltanet.delta_chunked: o, final state and the gradients
    of q, k, v, log_alpha, beta and the initial state."""
    inputs = delta_inputs(rng, jnp.dtype(dtype), dk=DELTA_KEY_DIM)
    weights = random_weights(rng, (inputs["v"], inputs["state"]))

    def kernel(**a):
        return delta_scan(**a, chunk_size=DELTA_CHUNK, impl=impl_for(platform), dtype=jnp.dtype(dtype),
                          platform=platform)

    def reference(**a):
        return delta_scan_reference(**a, chunk_size=DELTA_CHUNK)

    (o, final), grads = jax.jit(lambda i: loss_and_grads(kernel, i, weights, DELTA_DIFFERENTIABLE))(inputs)
    with jax.default_matmul_precision("float32"):
        (o_ref, final_ref), grads_ref = jax.jit(
            lambda i: loss_and_grads(reference, i, weights, DELTA_DIFFERENTIABLE))(inputs)
    tol = TOLERANCE[dtype]
    assert o.dtype == jnp.dtype(dtype)
    assert relative_error(o.astype(jnp.float32), o_ref) < tol
    assert relative_error(final, final_ref) < tol
    for name in DELTA_DIFFERENTIABLE:
        assert relative_error(grads[name], grads_ref[name]) < tol, name
    assert float(jnp.abs(grads["state"][1]).max()) == 0.0 < float(jnp.abs(grads["state"][0]).max())


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_delta_scan_is_stable_with_correlated_keys(rng, platform):
    """Nearly equal consecutive keys and beta near 1 (as a short convolution over real text gives) make the
    WY system's entries near 1, where the powers of a 64 x 64 nilpotent matrix grow like binomial
    coefficients: the kernels (chunk 64, float32) must still match the reference's triangular solve."""
    batch, length, heads, dk, dv = 2, 2 * 64 + 5, 1, 16, 16
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    k = unit(rng.normal(size=(batch, 1, heads, dk)) + 0.05 * rng.normal(size=(batch, length, heads, dk)))
    inputs = dict(
        q=jnp.asarray(unit(rng.normal(size=(batch, length, heads, dk))) / np.sqrt(dk), jnp.float32),
        k=jnp.asarray(k, jnp.float32), v=jnp.asarray(rng.normal(size=(batch, length, heads, dv)), jnp.float32),
        log_alpha=jnp.asarray(-rng.uniform(0.0, 0.05, size=(batch, length, heads)), jnp.float32),
        beta=jax.nn.sigmoid(jnp.asarray(rng.normal(3.0, 1.0, size=(batch, length, heads)), jnp.float32)),
        segment_ids=jnp.zeros((batch, length), jnp.int32), state=jnp.zeros((batch, heads, dk, dv), jnp.float32),
        last_segment=jnp.full((batch,), -1, jnp.int32),
    )
    weights = random_weights(rng, (inputs["v"], inputs["state"]))

    def kernel(**a):
        return delta_scan(**a, chunk_size=64, impl=impl_for(platform), platform=platform)

    (o, final), grads = jax.jit(lambda i: loss_and_grads(kernel, i, weights, DELTA_DIFFERENTIABLE))(inputs)
    with jax.default_matmul_precision("float32"):
        (o_ref, final_ref), grads_ref = jax.jit(lambda i: loss_and_grads(
            lambda **a: delta_scan_reference(**a, chunk_size=64), i, weights, DELTA_DIFFERENTIABLE))(inputs)
    assert relative_error(o, o_ref) < 1e-4
    assert relative_error(final, final_ref) < 1e-4
    for name in ("q", "k", "v", "log_alpha", "beta"):
        assert relative_error(grads[name], grads_ref[name]) < 1e-4, name


LAYERS = {
    "mamba2": (Mamba2, Mamba2Config(num_heads=4, head_dim=8, state_dim=16, num_groups=2, chunk_size=CHUNK)),
    "retnet": (Retention, RetNetConfig(num_heads=2, head_dim=8, chunk_size=CHUNK)),
    "mlstm": (MLSTM, MLSTMConfig(num_heads=2, inner_dim=16, chunk_size=CHUNK)),
    "gated_deltanet": (GatedDeltaNet, GatedDeltaNetConfig(num_heads=2, head_dim=8, chunk_size=CHUNK)),
}


# Parameter gradients sum more terms than outputs (as in test_recurrent). mLSTM's two forms also
# stabilise differently (the kernel rescales the state by exp(-m_t) every token, the chunked form once
# per chunk), so float32 rounding differs by those rescalings; the worst leaves are the 2-element gate
# biases, sums over all tokens that nearly cancel (|g| ~ 5e-3, differences ~ 3e-6). Worst leaf per
# seed: 13 seeds median 3e-6, max 1.5e-4; 9 more seeds, one at 5.3e-4 (seed 100). Gated DeltaNet's
# 2-element decay parameters (A_log, dt_bias) are such sums too: seed 114 gave 8.6e-4 with the GPU
# chunk-gradient kernel and 1.5e-4 with the XLA VJP in its place; 21 other seeds stayed below 1e-4.
LAYER_GRAD_TOLERANCE = {"mlstm": 2e-3, "gated_deltanet": 2e-3}
# Mamba-2's per-head A_log and dt_bias gradients are the same kind of near-cancelling sum over every token. Worst leaf
# per seed, XLA's CPU backend at -O0 as the suite runs it: seeds 1-10 median 2e-6, max 2.6e-5; seed 1263685819
# 1.1e-4 (one of four heads' A_log: -0.13039 against -0.13069, where the leaf's largest entry is 2.7).
DECAY_GRAD_TOLERANCE = 1e-3
DECAY_LEAVES = ("['A_log']", "['dt_bias']")


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layers_run_the_kernel_with_the_same_result(name, rng):
    """A mixer with impl="pallas"/"interpret" equals impl="xla": output, parameter and input gradients
    (float32, packed rows, length not a multiple of the chunk)."""
    module_type, config = LAYERS[name]
    x, positions, segments = packed_batch(rng, 2, CHUNK + 7, 16)
    xla = module_type(dataclasses.replace(config, impl="xla"), 16)
    kernel = module_type(dataclasses.replace(config, impl=impl_for("gpu")), 16)
    params = jax.tree.map(lambda p: p + 0.3 * rng.standard_normal(p.shape).astype(np.float32),
                          init(xla, x, positions, segments, seed=int(rng.integers(1 << 30))))
    cotangent = rng.standard_normal(x.shape).astype(np.float32)

    def outputs_and_grads(module):
        loss = lambda p, xs: jnp.sum(forward(module, p, xs, positions, segments) * cotangent)  # noqa: E731
        # One compiled program: run eagerly, the interpreted kernel costs seconds per op.
        return jax.jit(lambda p, xs: (forward(module, p, xs, positions, segments),
                                      jax.grad(loss, argnums=(0, 1))(p, xs)))(params, jnp.asarray(x))

    with jax.default_matmul_precision("float32"):  # no TF32 on a GPU, in either
        (out, grads), (out_ref, grads_ref) = outputs_and_grads(kernel), outputs_and_grads(xla)
    assert relative_error(out, out_ref) < tolerance(name, "float32")
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_ref)):
        limit = LAYER_GRAD_TOLERANCE.get(name, 1e-4)
        if jax.tree_util.keystr(path).endswith(DECAY_LEAVES):
            limit = max(limit, DECAY_GRAD_TOLERANCE)
        assert relative_error(got, want) < limit, jax.tree_util.keystr(path)


@pytest.mark.parametrize("op", ["ssd_scan", "delta_scan"])
def test_scans_under_a_mesh_run_per_shard_and_match(rng, op):
    """Inside a mesh (as in the train step) the kernels run on each device's rows and heads
    (shard_map); outputs and gradients equal the single-device call (8 fake CPU devices, float32)."""
    from zoo.train.mesh import make_mesh

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (the CPU run fakes them; a one-GPU run has one)")
    if op == "ssd_scan":
        inputs, names, scan = scan_inputs(rng, jnp.float32, batch=4, groups=2, heads=4), DIFFERENTIABLE, ssd_scan
    else:
        inputs, names, scan = delta_inputs(rng, jnp.float32, batch=4, heads=4), DELTA_DIFFERENTIABLE, delta_scan
    weights = random_weights(rng, (inputs["v"], inputs["state"]))

    def kernel(**a):
        return scan(**a, chunk_size=CHUNK, impl=impl_for("gpu"), platform="gpu")

    run = jax.jit(lambda i: loss_and_grads(kernel, i, weights, names))
    expected = run(inputs)
    with jax.set_mesh(make_mesh({"data": 2, "fsdp": 2, "tensor": 2})):
        sharded = run(inputs)
    for got, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(expected)):
        assert relative_error(got, want) < TOLERANCE["float32"]
