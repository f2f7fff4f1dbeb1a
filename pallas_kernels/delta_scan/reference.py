"""The truth the delta-rule kernels are tested against: zoo.layers.gated_deltanet's chunked UT-transform
form (itself tested against the per-token delta rule), with autodiff for gradients."""

from __future__ import annotations


def delta_scan_reference(q, k, v, log_alpha, beta, segment_ids, state, last_segment, chunk_size: int):
    from zoo.layers.gated_deltanet import delta_chunked  # zoo.layers imports the kernels

    return delta_chunked(q, k, v, log_alpha, beta, segment_ids, state, last_segment, chunk_size)
