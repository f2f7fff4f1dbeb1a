"""Chunked scan of the scalar-decay linear recurrence (Mamba-2 SSD, RetNet, and mLSTM through its
stabilised form): Pallas kernels for GPU and TPU behind one dispatch (ops.ssd_scan)."""

from zoo.pallas_kernels.ssd_scan.mlstm import mlstm_scan
from zoo.pallas_kernels.ssd_scan.ops import ssd_scan

__all__ = ["mlstm_scan", "ssd_scan"]
