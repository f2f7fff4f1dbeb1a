"""Chunked gated delta rule (Gated DeltaNet): the WY representation, the sequential state walk and the
chunk-parallel gradients as Pallas kernels (GPU: all of them; TPU: the walk, the rest in XLA), behind
one dispatch (ops.delta_scan)."""

from zoo.pallas_kernels.delta_scan.ops import delta_scan

__all__ = ["delta_scan"]
