"""What the Pallas Mosaic GPU (Hopper: wgmma, TMA, warp specialisation) kernels share: when they can run,
their shared-memory tile layout and register layouts, and the accumulating matmul that also runs in GPU
interpret mode (how the CPU test suite runs them)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from zoo.pallas_kernels.tiles import F32, MASKED

TILE = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))  # 128-byte rows of 16-bit elements
ROWS, COLUMNS = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)  # a value per row / per column of a tile
# An sm90 block's 227 KB of dynamic shared memory, less what Mosaic GPU adds to the kernels' buffers (barriers,
# alignment: 3.6 KB measured on the MLA decode kernel), so that supports() refuses what would not compile.
SHARED_MEMORY = 227 * 1024 - 4096
LOG2E = math.log2(math.e)  # the kernels keep scores in base 2: exp2 with the scale folded in


def available() -> bool:
    """Whether JAX runs on an sm90 (Hopper) GPU: wgmma is sm90a-only."""
    device = jax.devices()[0]
    return device.platform == "gpu" and getattr(device, "compute_capability", "").startswith("9.")


def pick(what: str, platform: str | None, refusal: str | None, interpret: bool, preferred: bool = True) -> str:
    """Which GPU kernel runs: "mosaic_gpu" where the Hopper kernel takes the inputs (`refusal` None: its
    supports()) on an sm90 GPU and is `preferred`, or where platform="mosaic_gpu" asks for it (an error naming
    `what` and the reason where it cannot run); else "gpu" (Triton)."""
    if platform == "mosaic_gpu":
        if refusal:
            raise ValueError(f"the Mosaic GPU {what} does not take these inputs: {refusal}")
        if not (interpret or available()):
            raise ValueError(f"the Mosaic GPU {what} needs an sm90 (Hopper) GPU; platform='gpu' runs the Triton one")
        return "mosaic_gpu"
    usable = platform is None and not interpret and refusal is None and preferred and available()
    return "mosaic_gpu" if usable else "gpu"


def softmax_finish(running_max, total):
    """A row's online softmax finished (running max in base 2, the kernels' convention): the factor that
    normalises its output and its log-sum-exp in base e; a row that saw nothing gets factor 0 and MASKED (so
    output 0 and no weight where splits or tiles are combined)."""
    empty = total == 0.0
    safe_total = jnp.where(empty, 1.0, total)
    return jnp.where(empty, 0.0, 1.0 / safe_total), jnp.where(empty, MASKED, running_max / LOG2E + jnp.log(safe_total))


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
