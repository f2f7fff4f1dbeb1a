"""Which keys a query sees, decided from positions and segment ids alone (so packed documents, ring-buffer
caches and padding need no special cases): the one definition that zoo.layers.attention's mask, the
kernels' tiles and ops.py's block lists all use.

A key is visible when it is a real token (position >= 0), in the query's document (same segment id), not
in its future (position <= the query's), and, with a sliding window, either within `window` positions of
the query or one of its document's first `sink_tokens` tokens (StreamingLLM's attention sinks).
"""

from __future__ import annotations


def visible(q_pos, q_seg, k_pos, k_seg, *, window: int | None = None, sink_tokens: int = 0):
    """Elementwise over broadcast shapes, e.g. q [..., T, 1] against k [..., 1, S] -> [..., T, S]."""
    return (k_pos >= 0) & (q_seg == k_seg) & visible_in_document(q_pos, k_pos, window=window, sink_tokens=sink_tokens)


def visible_in_document(q_pos, k_pos, *, window: int | None = None, sink_tokens: int = 0):
    """`visible` for a real query and key of one document: the position tests alone (what a kernel computes
    for block pairs known to be one document of real tokens)."""
    distance = q_pos - k_pos
    mask = distance >= 0
    if window is not None:
        near = distance < window
        mask &= (near | (k_pos < sink_tokens)) if sink_tokens else near
    return mask


def may_see(q_pos_range, q_seg_range, k_pos_range, k_seg_range, *, window: int | None = None, sink_tokens: int = 0):
    """Whether some query of a block may see some key of another, from each block's (min, max) position and
    segment id over its real tokens: a superset of `visible` over the block pair (the kernels mask each
    element with `visible`), exact for the usual layouts (documents contiguous, positions counting up)."""
    (q_pos_min, q_pos_max), (q_seg_min, q_seg_max) = q_pos_range, q_seg_range
    (k_pos_min, k_pos_max), (k_seg_min, k_seg_max) = k_pos_range, k_seg_range
    mask = (k_pos_min <= q_pos_max) & (q_seg_min <= k_seg_max) & (k_seg_min <= q_seg_max)
    if window is not None:
        mask &= (q_pos_min - k_pos_max < window) | (k_pos_min < sink_tokens)
    return mask


def all_see(q_pos_range, q_seg_range, k_pos_range, k_seg_range, *, window: int | None = None, sink_tokens: int = 0):
    """Whether every query of a block sees every key of another, from the same (min, max) ranges, for blocks
    whose tokens are all real: one document across both, every key at or before every query, and each
    pair within the window or every key a sink. A subset of `visible` over the block pair, so the kernels
    skip the element mask there."""
    (q_pos_min, q_pos_max), (q_seg_min, q_seg_max) = q_pos_range, q_seg_range
    (k_pos_min, k_pos_max), (k_seg_min, k_seg_max) = k_pos_range, k_seg_range
    mask = (q_seg_min == q_seg_max) & (k_seg_min == k_seg_max) & (q_seg_min == k_seg_min) & (k_pos_max <= q_pos_min)
    if window is not None:
        mask &= (q_pos_max - k_pos_min < window) | (k_pos_max < sink_tokens)
    return mask
