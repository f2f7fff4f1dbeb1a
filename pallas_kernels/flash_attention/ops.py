"""flash_attention: softmax attention for training and prefill with Pallas forward and backward kernels.

    o[b, t, h] = sum_s softmax_s(scale * sum_i q_i[b, t, h] . k_i[b, s, h_i] (+ sink_h)) v[b, s, h_v]

over the keys masking.visible admits (causal by position, same document, sliding window with sink tokens).
q and k are one array each or matching tuples of parts (MLA: no-RoPE and RoPE features, the RoPE key
shared by all heads); every part's and v's head count divides the query heads (GQA). sink_logits [H]:
gpt-oss-style learned sinks, a zero-valued entry in each row's softmax.

GPUs: hopper.py (Mosaic GPU: wgmma, TMA, warp specialisation) runs the forward on sm90 GPUs where it
applies (hopper.supports; a first query / key part wider than the values is cut at their width where only
that fits: hopper.cut_at_value_width), and after its forward the backward where that applies
(hopper.supports_backward);
gpu.py (Triton) every other forward and backward; TPUs: tpu.py (Mosaic);
elsewhere impl="auto" runs the XLA reference. Under a mesh the kernels run per shard (dispatch.per_shard).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from zoo.pallas_kernels import dispatch, mosaic_gpu
from zoo.pallas_kernels.flash_attention import gpu, hopper, tpu
from zoo.pallas_kernels.flash_attention.masking import all_see, may_see
from zoo.pallas_kernels.flash_attention.reference import flash_attention_reference
from zoo.pallas_kernels.tiles import pad_axis, triton_width

_FAR = 2**30  # beyond any position or segment id


class Walk(NamedTuple):
    """For each block, the blocks of the other side it visits, in order: first those it sees whole (walked
    without a mask), then those within one document of real tokens (masked by position alone), then the rest
    (masked by position, document and padding)."""
    counts: jax.Array  # [B, n] blocks visited
    interiors: jax.Array  # [B, n] of those, seen whole
    documents: jax.Array  # [B, n] of those, seen whole or within one document
    lists: jax.Array  # [B, n, L] the blocks, each group ascending, then the unvisited ones


class _Static(NamedTuple):
    scale: float
    window: int | None
    sink_tokens: int
    has_sink: bool
    blocks: tuple[int, int, int, int]  # forward (q, k), backward (q, k)
    platform: str  # the forward's kernel: "gpu" (Triton), "mosaic_gpu" or "tpu" (Mosaic)
    interpret: bool
    backward: str = "gpu"  # the backward's: "gpu" (Triton), "mosaic_gpu" or "tpu"


def flash_attention(q, k, v, q_positions, q_segments, k_positions, k_segments, *, scale: float,
                    window: int | None = None, sink_tokens: int = 0, sink_logits=None, impl: str = "auto",
                    platform: str | None = None, blocks: tuple[int, int, int, int] | None = None):
    """q [B, T, H, D] (or a tuple of parts), k [B, S, KV, D] (or matching parts [B, S, KV_i, D_i]),
    v [B, S, KV, Dv]; positions / segment ids [B, T] and [B, S] (position -1: not a token). Returns
    [B, T, H, Dv] in v's dtype. platform: None (the one JAX runs on; on a GPU the Mosaic GPU forward where
    it applies, else Triton; after the Mosaic GPU forward its backward where hopper.supports_backward, else
    Triton's), "gpu" (Triton), "mosaic_gpu" (the Mosaic GPU forward, an error where it does not apply) or "tpu".
    blocks: (forward q, forward k, backward q, backward k) tile lengths: with Triton powers of two >= 16
    (default: gpu.default_blocks, tuned per layout), with the Mosaic GPU forward its query block is
    hopper.PROGRAM_ROWS and its key blocks multiples of 64, with the Mosaic GPU backward the streamed query /
    key blocks, 64 or 128 (default: hopper.default_blocks); on TPUs query blocks multiples of 8 and key blocks
    of 128 (default: tpu.BLOCKS)."""
    qs, ks = (tuple(x) if isinstance(x, (tuple, list)) else (x,) for x in (q, k))
    _check_shapes(qs, ks, v, q_positions, q_segments, k_positions, k_segments, sink_logits)
    if window is not None and window <= 0:
        raise ValueError(f"window must be a positive length or None, got {window}")
    backend = dispatch.resolve(impl, "gpu" if platform == "mosaic_gpu" else platform)
    if backend.kind == "xla":
        return flash_attention_reference(qs, ks, v, q_positions, q_segments, k_positions, k_segments, scale=scale,
                                         window=window, sink_tokens=sink_tokens, sink_logits=sink_logits)
    kind = gpu_kernel(qs, ks, v, blocks, platform, backend.interpret) if backend.kind == "gpu" else backend.kind
    if kind == "mosaic_gpu":  # Triton takes the parts as given: no copies of cut halves
        qs, ks = hopper.cut_at_value_width(qs, ks, v, blocks[1] if blocks else hopper.BLOCK_K)
        blocks = blocks or hopper.default_blocks(qs, ks, v)
        if blocks[0] != hopper.PROGRAM_ROWS or blocks[1] % 64:
            raise ValueError(f"the Mosaic GPU forward takes query blocks of {hopper.PROGRAM_ROWS} and key blocks that "
                             f"are multiples of 64, got {blocks}")
    if kind in ("gpu", "mosaic_gpu"):
        blocks = blocks or gpu.default_blocks(window)
        backward_blocks = blocks[2:] if kind == "mosaic_gpu" else blocks
        if any(b < 16 or b & (b - 1) for b in backward_blocks):
            raise ValueError(f"blocks must be powers of two of at least 16 (Triton's matmul tiles), got {blocks}")
    else:
        blocks = blocks or tpu.BLOCKS
        if blocks[0] % 8 or blocks[2] % 8 or blocks[1] % 128 or blocks[3] % 128:
            raise ValueError("on TPUs query blocks must be multiples of 8 (sublanes) and key blocks of 128 (lanes), "
                             f"got {blocks}")
    heads = qs[0].shape[2]
    has_sink = sink_logits is not None
    sinks = (sink_logits if has_sink else jnp.zeros((heads,))).astype(jnp.float32)
    backward = kind
    if kind == "mosaic_gpu" and hopper.supports_backward(qs, ks, v, blocks[2:]):
        backward = "gpu"  # Triton's backward, with blocks[2:] as its tiles
    static = _Static(float(scale), window, int(sink_tokens), has_sink, tuple(blocks), kind, backend.interpret, backward)
    ints = [x.astype(jnp.int32) for x in (q_positions, q_segments, k_positions, k_segments)]
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return _attention(static, qs, ks, v, sinks, *ints)
    # XLA cannot partition a Pallas call: run per shard, every head-carrying input repeated to the query
    # heads so that all of them split the same way (autodiff of the repeat sums their gradients back).
    ks, v = tuple(jnp.repeat(x, heads // x.shape[2], axis=2) for x in ks), jnp.repeat(v, heads // v.shape[2], axis=2)
    parts = len(qs)

    def attend(*arrays):  # flat arguments: per_shard gives each one layout
        return (_attention(static, arrays[:parts], arrays[parts:2 * parts], *arrays[2 * parts:]),)

    shard = dispatch.per_shard(attend, mesh, qs[0].shape, ("b.h.",) * (2 * parts) + ("b.h.", "h", "b.", "b.", "b.", "b."),
                               ("b.h.",))
    return shard(*qs, *ks, v, sinks, *ints)[0]


def gpu_kernel(qs, ks, v, blocks=None, platform: str | None = None, interpret: bool = False) -> str:
    """Which GPU forward flash_attention runs for these inputs: "mosaic_gpu" (hopper.py) on an sm90 GPU where
    it applies (to hopper.kernel_parts) or when asked for (an error where it cannot run), else "gpu" (Triton)."""
    block_k = blocks[1] if blocks else hopper.BLOCK_K
    refusal = hopper.supports(*hopper.kernel_parts(qs, ks, v, block_k), v, block_k)
    hopper_blocks = blocks is None or (blocks[0] == hopper.PROGRAM_ROWS and blocks[1] % 64 == 0)
    return mosaic_gpu.pick("flash attention forward", platform, refusal, interpret, preferred=hopper_blocks)


def _check_shapes(qs, ks, v, q_pos, q_seg, k_pos, k_seg, sink_logits):
    batch, length, heads = qs[0].shape[:3]
    slots = v.shape[1]
    ok = len(qs) == len(ks) and v.shape[0] == batch and heads % v.shape[2] == 0
    ok &= all(q.shape[:3] == (batch, length, heads) and k.shape[:2] == (batch, slots) and k.shape[-1] == q.shape[-1]
              and heads % k.shape[2] == 0 for q, k in zip(qs, ks))
    ok &= q_pos.shape == q_seg.shape == (batch, length) and k_pos.shape == k_seg.shape == (batch, slots)
    ok &= sink_logits is None or sink_logits.shape == (heads,)
    if not ok:
        raise ValueError(
            "flash_attention needs q parts [B, T, H, D_i], k parts [B, S, KV_i, D_i] (KV_i dividing H), v [B, S, KV, "
            "Dv], positions and segments [B, T] / [B, S], sink_logits [H]; got q "
            f"{[q.shape for q in qs]}, k {[k.shape for k in ks]}, v {v.shape}, positions {q_pos.shape} / {k_pos.shape}, "
            f"segments {q_seg.shape} / {k_seg.shape}, sinks {None if sink_logits is None else sink_logits.shape}")


def _block_ranges(positions, segments, block):
    """Each block's (min, max) position and segment id over its real tokens ([B, n] each), and whether all
    its tokens are real."""
    batch = positions.shape[0]
    pos, seg = positions.reshape(batch, -1, block), segments.reshape(batch, -1, block)
    real = pos >= 0
    lowest = lambda x: jnp.min(jnp.where(real, x, _FAR), axis=-1)  # noqa: E731
    highest = lambda x: jnp.max(jnp.where(real, x, -_FAR), axis=-1)  # noqa: E731
    return (lowest(pos), highest(pos)), (lowest(seg), highest(seg)), jnp.all(real, axis=-1)


def block_lists(static: _Static, q_pos, q_seg, k_pos, k_seg, block_q, block_k):
    """The Walk of each query block over key blocks and of each key block over query blocks (lists padded
    to a power of two for Triton)."""
    (qp, qs, q_real), (kp, ks, k_real) = _block_ranges(q_pos, q_seg, block_q), _block_ranges(k_pos, k_seg, block_k)
    expand_q = lambda pair: tuple(x[:, :, None] for x in pair)  # noqa: E731
    expand_k = lambda pair: tuple(x[:, None, :] for x in pair)  # noqa: E731
    ranges = (expand_q(qp), expand_q(qs), expand_k(kp), expand_k(ks))
    visits = may_see(*ranges, window=static.window, sink_tokens=static.sink_tokens)
    all_real = q_real[:, :, None] & k_real[:, None, :]
    one_document = visits & all_real & (qs[0] == qs[1])[:, :, None] & (ks[0] == ks[1])[:, None, :] \
        & (qs[0][:, :, None] == ks[0][:, None, :])
    whole = visits & all_real & all_see(*ranges, window=static.window, sink_tokens=static.sink_tokens)

    def compact(visits, one_document, whole):
        width = triton_width(visits.shape[-1]) if static.platform == "gpu" else visits.shape[-1]  # Mosaic: a grid axis
        visits, one_document, whole = (pad_axis(x, 2, width, False) for x in (visits, one_document, whole))
        rank = jnp.where(whole, 0, jnp.where(one_document, 1, jnp.where(visits, 2, 3)))
        count = lambda x: jnp.sum(x, axis=-1, dtype=jnp.int32)  # noqa: E731
        return Walk(count(visits), count(whole), count(one_document),
                    jnp.argsort(rank, axis=-1, stable=True).astype(jnp.int32))

    transposed = (jnp.swapaxes(x, 1, 2) for x in (visits, one_document, whole))
    return compact(visits, one_document, whole), compact(*transposed)


def _prepare(static: _Static, qs, ks, v, q_pos, q_seg, k_pos, k_seg):
    """Pad lengths to the blocks (padding tokens get position -1: nothing sees them, they see nothing) and,
    on GPUs, features to Triton's power-of-two tiles."""
    block_t = math.lcm(static.blocks[0], static.blocks[2])  # both passes' tiles divide the padded lengths
    block_s = math.lcm(static.blocks[1], static.blocks[3])
    if static.backward == "mosaic_gpu":  # its tiles: hopper.PROGRAM_ROWS queries (dq), as many keys (dk / dv)
        block_t, block_s = math.lcm(block_t, hopper.PROGRAM_ROWS), math.lcm(block_s, hopper.PROGRAM_ROWS)
    length = -(-qs[0].shape[1] // block_t) * block_t
    slots = -(-v.shape[1] // block_s) * block_s
    width = triton_width if static.platform == "gpu" else (lambda n: n)  # Mosaic blocks take whole widths
    qs = tuple(pad_axis(pad_axis(q, 1, length), 3, width(q.shape[-1])) for q in qs)
    ks = tuple(pad_axis(pad_axis(k, 1, slots), 3, width(k.shape[-1])) for k in ks)
    v = pad_axis(pad_axis(v, 1, slots), 3, width(v.shape[-1]))
    q_pos, k_pos = pad_axis(q_pos, 1, length, -1), pad_axis(k_pos, 1, slots, -1)
    q_seg, k_seg = pad_axis(q_seg, 1, length, -1), pad_axis(k_seg, 1, slots, -1)
    return qs, ks, v, q_pos, q_seg, k_pos, k_seg


def _heads_minor(x):
    """[B, L, H, D] <-> [B, H, L, D] (the TPU kernels' heads-major layout; its own inverse)."""
    return jnp.swapaxes(x, 1, 2)


def _heads_major(qs, ks, v):
    return tuple(map(_heads_minor, qs)), tuple(map(_heads_minor, ks)), _heads_minor(v)


def _columns_and_rows(q_pos, q_seg, k_pos, k_seg):
    """Query positions / segments as columns [B, T, 1], key ones as rows [B, 1, S] (Mosaic's tiles)."""
    return q_pos[:, :, None], q_seg[:, :, None], k_pos[:, None, :], k_seg[:, None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(static: _Static, qs, ks, v, sinks, q_pos, q_seg, k_pos, k_seg):
    return _attention_forward(static, qs, ks, v, sinks, q_pos, q_seg, k_pos, k_seg)[0]


def _kernel_args(static):
    return dict(scale=static.scale, window=static.window, sink_tokens=static.sink_tokens, interpret=static.interpret)


def _attention_forward(static, qs, ks, v, sinks, q_pos, q_seg, k_pos, k_seg):
    length, dv = qs[0].shape[1], v.shape[-1]
    padded = _prepare(static, qs, ks, v, q_pos, q_seg, k_pos, k_seg)
    pqs, pks, pv, pq_pos, pq_seg, pk_pos, pk_seg = padded
    q_walk, _ = block_lists(static, pq_pos, pq_seg, pk_pos, pk_seg, *static.blocks[:2])
    tiles = dict(block_q=static.blocks[0], block_k=static.blocks[1], **_kernel_args(static))
    if static.platform == "gpu":
        o, lse = gpu.forward(pqs, pks, pv, sinks, pq_pos, pq_seg, pk_pos, pk_seg, q_walk, has_sink=static.has_sink,
                             **tiles)
    elif static.platform == "mosaic_gpu":
        del tiles["block_q"]  # hopper.PROGRAM_ROWS
        o, lse = hopper.forward(pqs, pks, pv, sinks, jnp.stack([pq_pos, pq_seg], axis=1),
                                jnp.stack([pk_pos, pk_seg], axis=1), q_walk, has_sink=static.has_sink, **tiles)
    else:
        o, lse = tpu.forward(*_heads_major(pqs, pks, pv), sinks, *_columns_and_rows(pq_pos, pq_seg, pk_pos, pk_seg),
                             q_walk, has_sink=static.has_sink, **tiles)
        o, lse = _heads_minor(o), lse[..., 0]
    o = o[..., :dv]  # the backward's delta needs the padded length only
    return o[:, :length], (qs, ks, v, sinks, q_pos, q_seg, k_pos, k_seg, o, lse)


def _attention_backward(static, residuals, do):
    qs, ks, v, sinks, q_pos, q_seg, k_pos, k_seg, o, lse = residuals
    batch, length, heads, _ = qs[0].shape
    slots = v.shape[1]
    # The lengths were padded for both passes' tiles (_prepare's lcm); Triton's backward pads widths again.
    static = static._replace(platform=static.backward)
    pqs, pks, pv, pq_pos, pq_seg, pk_pos, pk_seg = _prepare(static, qs, ks, v, q_pos, q_seg, k_pos, k_seg)
    do = pad_axis(do.astype(pv.dtype), 1, o.shape[1])
    delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), o.astype(jnp.float32))
    do = pad_axis(do, 3, pv.shape[-1])
    if static.platform == "mosaic_gpu":  # tiles of hopper.PROGRAM_ROWS rows, streaming blocks of the other side
        block_q, block_k = static.blocks[2:]
        q_walk, _ = block_lists(static, pq_pos, pq_seg, pk_pos, pk_seg, hopper.PROGRAM_ROWS, block_k)
        _, k_walk = block_lists(static, pq_pos, pq_seg, pk_pos, pk_seg, block_q, hopper.PROGRAM_ROWS)
        dqs, dks, dv = hopper.backward(pqs, pks, pv, do, lse, delta, jnp.stack([pq_pos, pq_seg], axis=1),
                                       jnp.stack([pk_pos, pk_seg], axis=1), q_walk, k_walk, block_q=block_q,
                                       block_k=block_k, **_kernel_args(static))
    else:
        q_walk, k_walk = block_lists(static, pq_pos, pq_seg, pk_pos, pk_seg, *static.blocks[2:])
        tiles = dict(block_q=static.blocks[2], block_k=static.blocks[3], **_kernel_args(static))
        if static.platform == "gpu":
            dqs, dks, dv = gpu.backward(pqs, pks, pv, do, lse, delta, pq_pos, pq_seg, pk_pos, pk_seg, q_walk, k_walk,
                                        **tiles)
        else:
            dqs, dks, dv = tpu.backward(*_heads_major(pqs, pks, pv), _heads_minor(do), lse[..., None],
                                        delta[..., None], *_columns_and_rows(pq_pos, pq_seg, pk_pos, pk_seg), q_walk,
                                        k_walk, **tiles)
            dqs, dks, dv = tuple(map(_heads_minor, dqs)), tuple(map(_heads_minor, dks)), _heads_minor(dv)

    def per_key_head(grad, like):  # [B, S', H, D'] per query head -> like's heads, length and width
        kv_heads = like.shape[2]
        grad = grad[:, :slots, :, :like.shape[-1]].reshape(batch, slots, kv_heads, heads // kv_heads, like.shape[-1])
        return grad.sum(axis=3).astype(like.dtype)

    dqs = tuple(dq[:, :length, :, :q.shape[-1]] for dq, q in zip(dqs, qs))
    dks = tuple(per_key_head(dk, k) for dk, k in zip(dks, ks))
    # A sink is a zero-valued key: its score's gradient is its probability exp(sink - lse) times (0 - delta).
    sink_probs = jnp.where((pq_pos >= 0)[:, None, :], jnp.exp(sinks[None, :, None] - lse), 0.0)
    dsinks = -jnp.sum(sink_probs * delta, axis=(0, 2)) if static.has_sink else jnp.zeros_like(sinks)
    return dqs, dks, per_key_head(dv, v), dsinks, None, None, None, None


_attention.defvjp(_attention_forward, _attention_backward)
