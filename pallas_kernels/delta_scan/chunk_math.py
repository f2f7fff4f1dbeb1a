"""One chunk of the gated delta rule once its WY representation is known, as tile arithmetic shared by
the GPU (Triton) and TPU (Mosaic) kernels and the XLA backward.

With w, u the chunk's UT-transformed keys and values (ops.wy_representation; w carries the decay from
the chunk's start and is zero for tokens that do not continue the entering state), the tokens' state
corrections are u - w S for the state S entering the chunk, and from there the chunk is the scalar-decay
scan's chunk (zoo.pallas_kernels.ssd_scan.chunk_math) with those corrections as its values:

    o     = ((q k^T) * within) (u - w S) + (q * read) S
    S_out = survive * S + (k * to_end)^T (u - w S)

Every product is column-separable in S's value dimension, so a V-tile of the state can be carried alone.
"""

from __future__ import annotations

from zoo.pallas_kernels.ssd_scan import chunk_math as scan_math
from zoo.pallas_kernels.ssd_scan.chunk_math import Decay, decay_terms
from zoo.pallas_kernels.tiles import F32, dot, dot_nt, dot_tn

__all__ = ["Decay", "decay_terms", "dot", "dot_nt", "forward", "retreat"]


def forward(q, k, w, u, d: Decay, state):
    """(o [C, V'], the state leaving the chunk [K, V']) for q, k, w [C, K], a V-tile u [C, V'] and state
    [K, V'] (float32)."""
    corrected = (u.astype(F32) - dot(w, state.astype(w.dtype))).astype(u.dtype)
    return scan_math.output(q, k, corrected, d, state), scan_math.advance(k, corrected, d, state)


def retreat(q, k, w, do, d: Decay, dleaving):
    """The gradient of the state entering the chunk from that of the state leaving it (V-tiles)."""
    dcorrected = scan_math.grad_v(q, k, do, d, dleaving)
    return scan_math.retreat(q, do, d, dleaving) - dot_tn(w, dcorrected.astype(w.dtype))
