"""What the Pallas Mosaic GPU (Hopper: wgmma, TMA, warp specialisation) kernels share: when they can run,
their shared-memory tile layout and register layouts, and the accumulating matmul that also runs in GPU
interpret mode (how the CPU test suite runs them)."""

from __future__ import annotations

import math

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from zoo.pallas_kernels.tiles import F32

TILE = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))  # 128-byte rows of 16-bit elements
ROWS, COLUMNS = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)  # a value per row / per column of a tile
SHARED_MEMORY = 227 * 1024  # an sm90 block's dynamic shared memory
LOG2E = math.log2(math.e)  # the kernels keep scores in base 2: exp2 with the scale folded in


def available() -> bool:
    """Whether JAX runs on an sm90 (Hopper) GPU: wgmma is sm90a-only."""
    device = jax.devices()[0]
    return device.platform == "gpu" and getattr(device, "compute_capability", "").startswith("9.")


def interpret_params(interpret: bool):
    return plgpu.InterpretGPUParams() if interpret else None


def accumulate(acc, a, b, interpret: bool, during=lambda: None):
    """acc + a @ b on the tensor cores (a: registers or shared memory, b: shared memory); `during` runs while
    the matmul is in flight. GPU interpret mode (jax 0.11.2) has neither register operands nor run_state, so
    there a must be in shared memory and the product goes to a fresh accumulator: the same sum."""
    if not interpret:
        def add(acc_ref):
            plgpu.wgmma(acc_ref, a, b)
            during()
        return pl.run_state(add)(plgpu.ACC.init(acc))

    def product(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        during()
        return acc_ref[...]

    return acc + pl.run_scoped(product, plgpu.ACC(acc.shape, F32))
