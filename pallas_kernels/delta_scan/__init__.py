"""Chunked gated delta rule (Gated DeltaNet): the WY representation in XLA and the sequential state walk
as Pallas kernels for GPU and TPU, behind one dispatch (ops.delta_scan)."""

from zoo.pallas_kernels.delta_scan.ops import delta_scan

__all__ = ["delta_scan"]
