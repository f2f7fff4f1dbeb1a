"""The gated delta rule's WY representation (UT transform) on GPUs (Pallas Triton): forward and backward,
one program per (batch row, head, chunk), all chunks at once.

Per chunk of C tokens (zoo.layers.gated_deltanet; ops.chunk_system): A_ts = beta_t exp(G_t - G_s) k_t.k_s
for s < t in the same document, rhs = [diag(beta) v | diag(beta * read) k], and

    X = [u | w] = T rhs,   T = (I + A)^-1  (unit lower-triangular).

The kernels work on 16-row blocks (Triton's smallest matmul): block (i, j) of A or T couples rows
16i.. with rows 16j... T is float32; the Gram blocks k_i k_j^T are matmuls in the kernels' dtype (bf16
products are exact in float32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

F32 = jnp.float32
BLOCK = 16
# float32 matmuls (T's blocks and the gradients) compiled: three TF32 passes on the tensor cores for
# float32 kernels (error ~ float32's; Triton's IEEE float32 dot runs on the CUDA cores, ~10x slower
# here), one TF32 pass for bf16 kernels (its rounding is below the bf16 rounding of the results). The
# interpreter (CPU) takes IEEE.
COMPILED_FLOAT32 = {"float32": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
                    "bfloat16": jax.lax.DotAlgorithmPreset.TF32_TF32_F32}
# Warps per program (`python bench/delta_scan_breakdown.py --sweep`, B8 T4096 H16 K=V=128 bf16, H100):
# forward 1.28 / 0.51 / 0.66 / 1.21 ms with 1 / 2 / 4 / 8 warps (XLA's triangular solves 2.63 ms);
# backward 2.18 / 1.67 / 1.64 / 2.38 ms (XLA's batched matmuls given T 3.11 ms).
WARPS = 2
WARPS_BACKWARD = 2


def _rows(i):
    return pl.ds(i * BLOCK, BLOCK)


def _dot(precision):
    """dot(a, b, contract): float32 accumulation; float32 operands at `precision`."""
    def dot(a, b, contract=((1,), (0,))):
        chosen = precision if a.dtype == F32 else None
        return jax.lax.dot_general(a, b, (contract, ((), ())), precision=chosen, preferred_element_type=F32)
    return dot


class _Tokens:
    """One chunk's per-token vectors as 16-token blocks: beta, cum (chunk-local cumulative log decay),
    seg, and read = exp(G_t) where token t continues the state entering the chunk, else 0."""

    def __init__(self, beta_ref, cum_ref, seg_ref, segprev_ref):
        self.count = beta_ref.shape[0] // BLOCK
        self.beta, self.cum, self.seg = ([ref[_rows(i)] for i in range(self.count)]
                                         for ref in (beta_ref, cum_ref, seg_ref))
        lane = jax.lax.broadcasted_iota(jnp.int32, (1, BLOCK), 1)
        seg_before = jnp.sum(jnp.where(lane == 0, segprev_ref[_rows(0)][None, :], 0.0), axis=1)
        self.read = [jnp.where(seg == seg_before, jnp.exp(cum), 0.0) for seg, cum in zip(self.seg, self.cum)]

    def decay(self, t, s, *, transposed=False):
        """exp(G_t - G_s) on A's block (t, s) where token s precedes token t in the same document, else 0;
        transposed: element [a, b] is that of the pair (t = b, s = a)."""
        row = jax.lax.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 0)
        col = jax.lax.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 1)
        if transposed:
            later, earlier, order = (self.cum[t][None, :], self.seg[t][None, :]), (self.cum[s][:, None], self.seg[s][:, None]), col > row
        else:
            later, earlier, order = (self.cum[t][:, None], self.seg[t][:, None]), (self.cum[s][None, :], self.seg[s][None, :]), row > col
        visible = later[1] == earlier[1]
        if t == s:
            visible = visible & order
        return jnp.where(visible, jnp.exp(jnp.where(visible, later[0] - earlier[0], 0.0)), 0.0)


def _blocks_inverse(a_blocks, diagonal_inverses, dot):
    """Block forward substitution: T_ij = -T_ii sum_{j <= m < i} A_im T_mj for a unit lower-triangular
    I + A given its strictly-lower blocks A_im (i > m) and the inverses T_ii of its diagonal blocks."""
    count = len(diagonal_inverses)
    inverse = [[None] * count for _ in range(count)]
    for i in range(count):
        inverse[i][i] = diagonal_inverses[i]
        for j in range(i - 1, -1, -1):
            acc = sum(dot(a_blocks[i][m], inverse[m][j]) for m in range(j, i))
            inverse[i][j] = -dot(inverse[i][i], acc)
    return inverse


def _diagonal_inverse(a_t):
    """(I + A)^-1 of one diagonal block, given A^T, by forward substitution: row i of T = e_i - A[i, :] T
    (rows above i final), rows taken from tiles by masked reductions (no scalar indexing); A[i, :] is
    read as a column of A^T so that it broadcasts."""
    row = jax.lax.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 1)

    def substitute(i, inverse):
        a_i = jnp.sum(jnp.where(col == i, a_t, 0.0), axis=1, keepdims=True)  # [16, 1]: A[i, :] as a column
        return inverse - jnp.where(row == i, jnp.sum(a_i * inverse, axis=0, keepdims=True), 0.0)

    return jax.lax.fori_loop(1, BLOCK, substitute, jnp.where(row == col, 1.0, 0.0))


def _forward_kernel(k_ref, v_ref, beta_ref, cum_ref, seg_ref, segprev_ref, w_ref, u_ref, *inverse_ref, precision):
    """T as fla's solve_tril computes it: each diagonal block by forward substitution, the rest by block
    forward substitution; then w, u = T rhs as matmuls in the kernels' dtype. (The nilpotent series
    (I + N)(I + N^2)(I + N^4)... would be all matmuls, but with correlated keys its partial powers grow
    like binomial coefficients and cancel catastrophically.) T, when asked for, is written as its blocks,
    row-block-major: block (i, j) in rows (i * count + j) * 16 ..."""
    dtype, dot = w_ref.dtype, _dot(precision)
    tokens = _Tokens(beta_ref, cum_ref, seg_ref, segprev_ref)
    count, beta = tokens.count, tokens.beta
    a_blocks = [[None] * count for _ in range(count)]
    diagonal = []
    for i in range(count):
        k_i = k_ref[_rows(i), :]
        for j in range(i):
            gram = dot(k_i, k_ref[_rows(j), :], ((1,), (1,)))
            a_blocks[i][j] = beta[i][:, None] * tokens.decay(i, j) * gram
        # The diagonal block as A^T (what _diagonal_inverse takes; its Gram block is symmetric).
        gram = dot(k_i, k_i, ((1,), (1,)))
        diagonal.append(_diagonal_inverse(beta[i][None, :] * tokens.decay(i, i, transposed=True) * gram))
    inverse = _blocks_inverse(a_blocks, diagonal, dot)
    if inverse_ref:
        zeros = jnp.zeros((BLOCK, BLOCK), F32)
        for i in range(count):
            for j in range(count):
                inverse_ref[0][_rows(i * count + j), :] = inverse[i][j] if j <= i else zeros
    keys = [((beta[j] * tokens.read[j])[:, None] * k_ref[_rows(j), :].astype(F32)).astype(dtype) for j in range(count)]
    values = [(beta[j][:, None] * v_ref[_rows(j), :].astype(F32)).astype(dtype) for j in range(count)]
    for i in range(count):
        low = [inverse[i][j].astype(dtype) for j in range(i + 1)]
        w_ref[_rows(i), :] = sum(dot(low[j], keys[j]) for j in range(i + 1)).astype(dtype)
        u_ref[_rows(i), :] = sum(dot(low[j], values[j]) for j in range(i + 1)).astype(dtype)


def _backward_kernel(k_ref, v_ref, beta_ref, cum_ref, seg_ref, segprev_ref, w_ref, u_ref, inverse_ref, dw_ref, du_ref,
                     dk_ref, dv_ref, dbeta_ref, dcum_ref, *, precision):
    """Given T: d rhs = T^T dX and dA = -(d rhs) X^T on A's support; then, with E_ts = exp(G_t - G_s)
    and dG = dA * beta_t E (the Gram matrix's gradient), P = dG * (k k^T):
        dv = beta * d rhs_u,  dk = beta read d rhs_w + dG k + dG^T k,
        dbeta_t = d rhs_u[t].v_t + read_t d rhs_w[t].k_t + sum_s (dA E k k^T)_ts,
        dcum_t = beta_t read_t d rhs_w[t].k_t + sum_s P_ts - sum_s P_st.
    Row blocks are finished last to first: block j's dk needs dG_tj of the later blocks t > j. Matmul
    inputs are in the kernels' dtype (bf16, as fla's backward; float32 operands in registers doubled
    the register footprint and the kernel lost to XLA's batched matmuls)."""
    dot, dtype = _dot(precision), k_ref.dtype
    tokens = _Tokens(beta_ref, cum_ref, seg_ref, segprev_ref)
    count, beta, read = tokens.count, tokens.beta, tokens.read

    def operand(x):  # matmul inputs in the kernels' dtype, as fla's backward; float32 ones at `precision`
        return x.astype(dtype)

    def tile(ref, i):
        return ref[_rows(i), :]

    def inverse(i, j):
        return operand(inverse_ref[_rows(i * count + j), :])

    dgram = {}  # (t, s) -> dG_ts for s < t, kept until block s is finished
    dcum_from_later = [jnp.zeros((BLOCK,), F32) for _ in range(count)]  # -sum_t P_ts over finished blocks t
    for j in reversed(range(count)):
        drhs_u = sum(dot(inverse(i, j), tile(du_ref, i), ((0,), (0,))) for i in range(j, count))
        drhs_w = sum(dot(inverse(i, j), tile(dw_ref, i), ((0,), (0,))) for i in range(j, count))
        k_j = tile(k_ref, j)
        keyed = jnp.sum(drhs_w * k_j.astype(F32), axis=1)
        dbeta = jnp.sum(drhs_u * tile(v_ref, j).astype(F32), axis=1) + read[j] * keyed
        dcum = beta[j] * read[j] * keyed + dcum_from_later[j]
        dk = (beta[j] * read[j])[:, None] * drhs_w
        for m in range(j + 1):
            da = -(dot(operand(drhs_u), tile(u_ref, m), ((1,), (1,))) + dot(operand(drhs_w), tile(w_ref, m), ((1,), (1,))))
            weighted = da * tokens.decay(j, m)
            k_m = tile(k_ref, m)
            gram = dot(k_j, k_m, ((1,), (1,)))
            dbeta += jnp.sum(weighted * gram, axis=1)
            dg = beta[j][:, None] * weighted
            p = dg * gram
            dcum += jnp.sum(p, axis=1)
            dk += dot(operand(dg), k_m)
            if m == j:
                dcum -= jnp.sum(p, axis=0)
                dk += dot(operand(dg), k_j, ((0,), (0,)))
            else:
                dcum_from_later[m] = dcum_from_later[m] - jnp.sum(p, axis=0)
                dgram[(j, m)] = operand(dg)
        for t in range(j + 1, count):
            dk += dot(dgram.pop((t, j)), tile(k_ref, t), ((0,), (0,)))
        dv_ref[_rows(j), :] = (beta[j][:, None] * drhs_u).astype(dv_ref.dtype)
        dk_ref[_rows(j), :] = dk.astype(dk_ref.dtype)
        dbeta_ref[_rows(j)] = dbeta
        dcum_ref[_rows(j)] = dcum


def _specs(chunk):
    """BlockSpecs of grid (row, head, chunk) for [B, T, H, width], [B, T, H], [B, T] arrays and the
    inverse's blocks [B, H, N * count * C, 16]."""
    def tokens(width):
        return pl.BlockSpec((None, chunk, None, width), lambda b, h, n: (b, n, h, 0))
    per_head = pl.BlockSpec((None, chunk, None), lambda b, h, n: (b, n, h))
    per_row = pl.BlockSpec((None, chunk), lambda b, h, n: (b, n))
    inverse = pl.BlockSpec((None, None, chunk // BLOCK * chunk, BLOCK), lambda b, h, n: (b, h, n, 0))
    return tokens, per_head, per_row, inverse


def _precision(interpret, dtype):
    return jax.lax.Precision.HIGHEST if interpret else COMPILED_FLOAT32[jnp.dtype(dtype).name]


def wy_representation(k, v, beta, cum, seg, segprev, *, chunk: int, interpret: bool, dtype, with_inverse: bool):
    """Every chunk at once; k [B, T, H, K] and v [B, T, H, V] in `dtype`, beta, cum [B, T, H] float32, seg,
    segprev [B, T]. Returns w [B, T, H, K] and u [B, T, H, V] in `dtype` and, with_inverse, T's blocks
    (float32, as wy_backward takes them)."""
    batch, length, heads, dk = k.shape
    count = length // chunk
    tokens, per_head, per_row, inverse = _specs(chunk)
    out_specs = [tokens(dk), tokens(v.shape[-1])]
    out_shape = [jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)]
    if with_inverse:
        out_specs.append(inverse)
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, count * (chunk // BLOCK) * chunk, BLOCK), F32))
    return tuple(pl.pallas_call(
        functools.partial(_forward_kernel, precision=_precision(interpret, dtype)), grid=(batch, heads, count),
        in_specs=[tokens(dk), tokens(v.shape[-1]), per_head, per_head, per_row, per_row], out_specs=out_specs,
        out_shape=out_shape, compiler_params=plgpu.CompilerParams(num_warps=WARPS, num_stages=2),
        interpret=interpret, name="delta_scan_wy",
    )(k, v, beta, cum, seg, segprev))


def wy_backward(k, v, beta, cum, seg, segprev, w, u, inverse, dw, du, *, chunk: int, interpret: bool):
    """The gradients of k, v (their dtype), beta and cum (float32) given wy_representation's inputs,
    outputs and T's blocks, and the cotangents of w and u."""
    batch, length, heads, dk = k.shape
    tokens, per_head, per_row, inverse_spec = _specs(chunk)
    dv = v.shape[-1]
    return pl.pallas_call(
        functools.partial(_backward_kernel, precision=_precision(interpret, k.dtype)),
        grid=(batch, heads, length // chunk),
        in_specs=[tokens(dk), tokens(dv), per_head, per_head, per_row, per_row, tokens(dk), tokens(dv), inverse_spec,
                  tokens(dk), tokens(dv)],
        out_specs=[tokens(dk), tokens(dv), per_head, per_head],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                   jax.ShapeDtypeStruct(beta.shape, F32), jax.ShapeDtypeStruct(cum.shape, F32)],
        compiler_params=plgpu.CompilerParams(num_warps=WARPS_BACKWARD, num_stages=2), interpret=interpret,
        name="delta_scan_wy_bwd",
    )(k, v, beta, cum, seg, segprev, w, u, inverse, dw.astype(w.dtype), du.astype(u.dtype))
