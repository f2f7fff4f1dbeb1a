"""Where delta_scan's time goes on one GPU: each piece of the Pallas path timed alone, then the whole.

    python bench/delta_scan_breakdown.py          # B=8, T=4096, H=16, K=V=128, bf16

Pieces: the WY representation forward (without and with the inverse the backward needs) and backward
(Pallas kernels, gpu_wy.py); the state walk without and with the per-chunk states the backward needs;
the reverse walk kernel; the walk's whole backward (reverse walk + the chunk-gradient kernel). Timing
as bench/scan_kernels.py (medians).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parent))
import scan_kernels as sk  # noqa: E402
from zoo.pallas_kernels.delta_scan import gpu, ops  # noqa: E402
from zoo.pallas_kernels.ssd_scan.ops import prepare  # noqa: E402


def main():
    batch, length, heads, dim = 8, 4096, 16, 128
    (q, k, v, g, beta), (segments, state) = sk.inputs("delta", batch, length, heads, dim)

    def ms(fn, *args):
        return 1e3 * sk.time_jax(jax.jit(fn), *args, repeats=5)

    p, padded = prepare("gpu", sk.CHUNK, q, k, v, g, segments, jnp.full((batch,), -1, jnp.int32), state)
    static = ops._Static("gpu", False, sk.CHUNK, "bfloat16")
    wy_inputs = (p.k, p.v, beta, p.cum, p.seg, p.segprev)
    print(f"WY forward        {ms(lambda *a: ops.wy_representation(static, *a), *wy_inputs):.3f} ms", flush=True)
    print(f"WY + inverse      {ms(lambda *a: ops._wy_forward(static, *a)[0], *wy_inputs):.3f} ms", flush=True)
    (w, u), wy_residuals = ops._wy_forward(static, *wy_inputs)
    print(f"WY backward       {ms(lambda r, dw, du: ops._wy_backward(static, r, (dw, du)), wy_residuals, w, u):.3f} ms")
    walk_inputs = (p.q, p.k, w, u, p.cum, p.seg, p.segprev, padded)
    print(f"walk              {ms(lambda *a: ops._walk(static, *a), *walk_inputs):.3f} ms")
    print(f"walk + states     {ms(lambda *a: ops._walk_forward(static, *a)[0], *walk_inputs):.3f} ms")
    (o, final), residuals = ops._walk_forward(static, *walk_inputs)
    reverse = lambda pp, ww, do, df: gpu.backward(pp, ww, do, df, chunk=sk.CHUNK, interpret=False)  # noqa: E731
    print(f"reverse walk      {ms(reverse, residuals[0], residuals[1], o, final):.3f} ms")
    print(f"walk backward     {ms(lambda r, do, df: ops._walk_backward(static, r, (do, df)), residuals, o, final):.3f} ms")
    forward, forward_backward = sk.zoo_fns("delta", "pallas")
    differentiable, fixed = (q, k, v, g, beta), (segments, state)
    weights = jnp.ones(v.shape, jnp.float32)
    print(f"delta_scan fwd    {ms(forward, differentiable, fixed):.3f} ms")
    print(f"delta_scan fwd+bwd {ms(forward_backward, differentiable, fixed, weights):.3f} ms")


if __name__ == "__main__":
    main()
