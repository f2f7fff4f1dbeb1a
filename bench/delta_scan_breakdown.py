"""Where delta_scan's time goes on one GPU: each piece of the Pallas path timed alone, then the whole.

    python bench/delta_scan_breakdown.py          # B=8, T=4096, H=16, K=V=128, bf16
    python bench/delta_scan_breakdown.py --sweep  # also each chunk-parallel kernel at other warp counts

Pieces: the WY representation forward (without and with the inverse the backward needs) and backward
(Pallas kernels, gpu_wy.py); the state walk without and with the per-chunk states the backward needs;
the reverse walk kernel; the walk's whole backward (reverse walk + the chunk-gradient kernel). Timing
as bench/scan_kernels.py (medians). The chunk-parallel kernels are also timed against their XLA forms
(the TPU path's: batched matmuls given the inverse, the vmapped VJP of the chunk math), with the largest
relative difference of their outputs; --sweep repeats that at 1-8 warps per program (the WARPS,
WARPS_BACKWARD and CHUNK_GRAD_WARPS constants the kernels are compiled with).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parent))
import scan_kernels as sk  # noqa: E402
from zoo.pallas_kernels.delta_scan import gpu, gpu_wy, ops  # noqa: E402
from zoo.pallas_kernels.ssd_scan.ops import prepare  # noqa: E402


def relative_difference(got, want):
    return max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                     / jnp.max(jnp.abs(b.astype(jnp.float32)))) for a, b in zip(got, want))


def compare(name, kernel, xla, args, module, constant, warps):
    """Times the kernel (at each warp count) and its XLA form on the same arguments."""
    want = jax.jit(xla)(*args)
    print(f"{name} XLA form  {1e3 * sk.time_jax(jax.jit(xla), *args, repeats=5):.3f} ms", flush=True)
    default = getattr(module, constant)
    for count in warps:
        setattr(module, constant, count)
        fn = jax.jit(lambda *a: kernel(*a))  # a new function, so traced again: the constant is read then
        seconds = sk.time_jax(fn, *args, repeats=5)
        print(f"{name} kernel, {count} warps  {1e3 * seconds:.3f} ms  (max relative difference from XLA "
              f"{relative_difference(fn(*args), want):.1e})", flush=True)
    setattr(module, constant, default)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true")
    sweep = parser.parse_args().sweep
    batch, length, heads, dim = 8, 4096, 16, 128
    (q, k, v, g, beta), (segments, state) = sk.inputs("delta", batch, length, heads, dim)

    def ms(fn, *args):
        return 1e3 * sk.time_jax(jax.jit(fn), *args, repeats=5)

    def warps(default):
        return (1, 2, 4, 8) if sweep else (default,)

    p, padded = prepare("gpu", sk.CHUNK, q, k, v, g, segments, jnp.full((batch,), -1, jnp.int32), state)
    static = ops._Static("gpu", False, sk.CHUNK, "bfloat16")
    xla = static._replace(kind="xla")
    wy_inputs = (p.k, p.v, beta, p.cum, p.seg, p.segprev)
    compare("WY forward", lambda *a: ops.wy_representation(static, *a),
            lambda *a: ops._wy_solve(xla, *a, with_inverse=False)[:2], wy_inputs, gpu_wy, "WARPS", warps(gpu_wy.WARPS))
    print(f"WY + inverse      {ms(lambda *a: ops._wy_forward(static, *a)[0], *wy_inputs):.3f} ms", flush=True)
    (w, u), wy_residuals = ops._wy_forward(static, *wy_inputs)
    _, xla_residuals = ops._wy_forward(xla, *wy_inputs)
    compare("WY backward", lambda dw, du: ops._wy_backward(static, wy_residuals, (dw, du))[:4],
            lambda dw, du: ops._wy_backward(xla, xla_residuals, (dw, du))[:4], (w, u), gpu_wy, "WARPS_BACKWARD",
            warps(gpu_wy.WARPS_BACKWARD))
    walk_inputs = (p.q, p.k, w, u, p.cum, p.seg, p.segprev, padded)
    print(f"walk              {ms(lambda *a: ops._walk(static, *a), *walk_inputs):.3f} ms")
    print(f"walk + states     {ms(lambda *a: ops._walk_forward(static, *a)[0], *walk_inputs):.3f} ms")
    (o, final), (pp, ww, states) = ops._walk_forward(static, *walk_inputs)
    reverse = lambda pp, ww, do, df: gpu.backward(pp, ww, do, df, chunk=sk.CHUNK, interpret=False)  # noqa: E731
    print(f"reverse walk      {ms(reverse, pp, ww, o, final):.3f} ms")
    dleaving, _ = reverse(pp, ww, o, final)
    compare("chunk gradients", lambda *a: gpu.chunk_grads(pp, *a, chunk=sk.CHUNK, interpret=False),
            lambda *a: ops.chunk_grads_xla(pp, *a, chunk=sk.CHUNK), (ww, o, states, dleaving), gpu,
            "CHUNK_GRAD_WARPS", warps(gpu.CHUNK_GRAD_WARPS))
    print(f"walk backward     {ms(lambda r, do, df: ops._walk_backward(static, r, (do, df)), (pp, ww, states), o, final):.3f} ms")
    forward, forward_backward = sk.zoo_fns("delta", "pallas")
    differentiable, fixed = (q, k, v, g, beta), (segments, state)
    weights = jnp.ones(v.shape, jnp.float32)
    print(f"delta_scan fwd    {ms(forward, differentiable, fixed):.3f} ms")
    print(f"delta_scan fwd+bwd {ms(forward_backward, differentiable, fixed, weights):.3f} ms")


if __name__ == "__main__":
    main()
