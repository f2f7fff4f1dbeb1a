"""Flash attention (zoo.pallas_kernels.flash_attention) on one GPU against cuDNN through JAX
(jax.nn.dot_product_attention, implementation="cudnn") and torch SDPA, forward and forward+backward.

    python bench/flash_attention.py --out results.jsonl            # GQA/MHA causal, full and windowed; MLA prefill
    python bench/flash_attention.py --sweep                        # Triton tiles and warps at one shape
    python bench/flash_attention.py --sweep-only --mosaic-sweep    # and the Mosaic GPU forward's key blocks, stages
    python bench/flash_attention.py --backward-sweep mha,mla       # the backward's tiles: device time per kernel
    python bench/flash_attention.py --backward-sweep mha,gqa,mla --backward-configs mosaic64x128,64x64x4x3
                                                                   # the Mosaic GPU backward against Triton's default

Shapes: B 8, T 4096, 16 heads, head dim 128, bf16, causal; windows: none (full causal) and T/8. cuDNN takes the
window as local_window_size=(window - 1, 0). torch SDPA runs its flash backend for full causal (is_causal) and,
for a window, a boolean mask (SDPA has no window argument; the mask sends it to the memory-efficient
backend). MLA prefill: q/k 128 no-RoPE + 64 RoPE features (one shared RoPE key), v 128, against cuDNN and SDPA
on the same scores with the RoPE key broadcast to every head and q/k concatenated to 192. Timing: two untimed
calls, then the median of `--repeats` groups of 10 calls. Forward+backward = gradients of sum(o * w).
zoo's forward and backward are the ones impl="pallas" picks: on an sm90 GPU the Mosaic GPU kernels (hopper.py),
whose records also time the Triton forward on the same inputs (zoo_triton_fwd_ms) and the forward+backward with
Triton's backward (zoo_triton_bwd_fwdbwd_ms). For full causal attention, JAX's own Mosaic GPU (Hopper wgmma,
FA3-style) example kernel
(jax.experimental.pallas.ops.gpu.attention_mgpu, causal only: no window, no segments; float16 only) is timed
too, the best of its 64 x {64, 128} tiles: what Pallas reaches on this GPU without Triton.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from scan_kernels import time_jax, time_torch  # noqa: E402
from zoo.pallas_kernels.flash_attention import flash_attention, gpu, hopper  # noqa: E402
from zoo.pallas_kernels.flash_attention.ops import gpu_kernel  # noqa: E402


def jax_inputs(batch, length, heads, dims, dim_v, kv_heads, seed=0):
    keys = jax.random.split(jax.random.key(seed), 2 * len(dims) + 2)
    qs = tuple(jax.random.normal(keys[i], (batch, length, heads, d), jnp.bfloat16) for i, d in enumerate(dims))
    ks = tuple(jax.random.normal(keys[len(dims) + i], (batch, length, kv, d), jnp.bfloat16)
               for i, (d, kv) in enumerate(zip(dims, kv_heads)))
    v = jax.random.normal(keys[-2], (batch, length, kv_heads[0], dim_v), jnp.bfloat16)
    w = jax.random.normal(keys[-1], (batch, length, heads, dim_v), jnp.bfloat16)
    return qs, ks, v, w


def zoo_fns(length, batch, window, scale, blocks=None, platform=None):
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    segments = jnp.ones((batch, length), jnp.int32)

    def forward(qs, ks, v):
        return flash_attention(qs, ks, v, positions, segments, positions, segments, scale=scale, window=window,
                               impl="pallas", blocks=blocks, platform=platform)

    def loss(qs, ks, v, w):
        return jnp.sum(forward(qs, ks, v).astype(jnp.float32) * w)

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


@contextlib.contextmanager
def triton_backward():
    """flash_attention traced within runs Triton's backward after any forward: it does wherever
    hopper.supports_backward refuses."""
    supports_backward = hopper.supports_backward
    hopper.supports_backward = lambda *args: "Triton's backward, asked for by the benchmark"
    try:
        yield
    finally:
        hopper.supports_backward = supports_backward


def cudnn_fns(window, scale):
    local = None if window is None else (window - 1, 0)

    def forward(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, local_window_size=local,
                                            implementation="cudnn")

    def loss(q, k, v, w):
        return jnp.sum(forward(q, k, v).astype(jnp.float32) * w)

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def torch_fns(q, k, v, w, window, scale):
    """q, k, v, w as bf16 numpy-convertible [B, T, H, D] arrays; SDPA wants [B, H, T, D]."""
    import torch
    import torch.nn.functional as F

    to = lambda a: torch.from_numpy(np.asarray(a.astype(jnp.float32))).to("cuda", torch.bfloat16).transpose(1, 2)  # noqa: E731
    q, k, v, w = (to(a).contiguous().requires_grad_(i < 3) for i, a in enumerate((q, k, v, w)))
    length = q.shape[2]
    mask = None
    if window is not None:
        i = torch.arange(length, device="cuda")
        mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
    enable_gqa = k.shape[1] != q.shape[1]

    def forward():
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)

    def forward_backward():
        q.grad = k.grad = v.grad = None
        (forward().float() * w).sum().backward()

    return forward, forward_backward


def mosaic_gpu_forward(q, k, v, repeats) -> dict:
    """The fastest of JAX's Mosaic GPU example kernel's tiles, causal forward (or why it did not run)."""
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu
    except ImportError as error:
        return {"mosaic_gpu_error": f"ImportError: {error}"}
    q, k, v = (x.astype(jnp.float16) for x in (q, k, v))  # the example kernel takes float16 only
    best, errors = None, []
    for block_kv in (128, 64):
        config = attention_mgpu.TuningConfig(block_q=64, block_kv=block_kv, max_concurrent_steps=2, causal=True)
        try:
            ms = 1e3 * time_jax(jax.jit(lambda q, k, v, c=config: attention_mgpu.attention(q, k, v, c)), q, k, v,
                                repeats=repeats)
        except Exception as error:  # noqa: BLE001 - reported: the example kernel refuses some CUDA versions
            errors.append(f"block_kv {block_kv}: {type(error).__name__}: {str(error)[:200]}")
            continue
        if best is None or ms < best[0]:
            best = (ms, block_kv)
    if best is None:
        return {"mosaic_gpu_error": "; ".join(errors)}
    return {"mosaic_gpu_fwd_ms": best[0], "mosaic_gpu_blocks": [64, best[1]]}


def relative_max_error(ours, theirs):
    ours, theirs = ours.astype(jnp.float32), theirs.astype(jnp.float32)
    return float(jnp.max(jnp.abs(ours - theirs)) / jnp.max(jnp.abs(theirs)))


def attention_flops(batch, length, heads, dim_qk, dim_v, window):
    visible = length * (length + 1) / 2 if window is None else window * length - window * (window - 1) / 2
    return 2 * batch * heads * visible * (dim_qk + dim_v)


def measure(case, repeats, peers=True):
    """zoo's forward as impl="pallas" picks it (the Mosaic GPU forward where it applies, else Triton; or the
    platform the case names), its forward+backward, and with `peers` the Triton forward beside a Mosaic one,
    cuDNN, torch SDPA and (full causal) JAX's Mosaic GPU example kernel."""
    batch, length, heads, kv_heads = case["batch"], case["length"], case["heads"], case["kv_heads"]
    dims, dim_v, window = case["dims"], case["dim_v"], case["window"]
    scale = sum(dims) ** -0.5
    shared_rope = len(dims) == 2
    qs, ks, v, w = jax_inputs(batch, length, heads, dims, dim_v, (kv_heads, 1) if shared_rope else (kv_heads,))
    platform = case.get("platform") or gpu_kernel(qs, ks, v)
    parts = hopper.kernel_parts(qs, ks, v)  # as the Mosaic GPU kernels get them
    blocks = case.get("blocks") or (hopper.default_blocks(*parts, v) if platform == "mosaic_gpu"
                                    else gpu.default_blocks(window))
    forward, grad = zoo_fns(length, batch, window, scale, blocks, case.get("platform"))  # None: as impl="auto" runs
    flops = attention_flops(batch, length, heads, sum(dims), dim_v, window)
    record = {**{k: v_ for k, v_ in case.items() if k not in ("blocks", "platform")}, "dtype": "bfloat16",
              "forward_kernel": platform, "blocks": list(blocks)}
    if platform == "mosaic_gpu":
        record["mosaic_stages"] = hopper.STAGES
        record["backward_kernel"] = "gpu" if hopper.supports_backward(*parts, v, blocks[2:]) else "mosaic_gpu"
    else:
        record["warps"] = [gpu.forward_warps(*blocks[:2]), gpu.BACKWARD_WARPS]
        record["stages"] = gpu.STAGES
    record["zoo_fwd_ms"] = 1e3 * time_jax(forward, qs, ks, v, repeats=repeats)
    record["zoo_fwd_TFLOPs"] = flops / record["zoo_fwd_ms"] / 1e9
    if not peers:
        return record
    record["zoo_fwdbwd_ms"] = 1e3 * time_jax(grad, qs, ks, v, w, repeats=repeats)
    if platform == "mosaic_gpu":
        triton_forward, _ = zoo_fns(length, batch, window, scale, gpu.default_blocks(window), "gpu")
        record["zoo_triton_fwd_ms"] = 1e3 * time_jax(triton_forward, qs, ks, v, repeats=repeats)
        record["err_mosaic_vs_triton"] = relative_max_error(forward(qs, ks, v), triton_forward(qs, ks, v))
        if record["backward_kernel"] == "mosaic_gpu":  # Triton's backward beside it
            with triton_backward():
                _, triton_grad = zoo_fns(length, batch, window, scale, (*blocks[:2], *gpu.default_blocks(window)[2:]),
                                         case.get("platform"))
                record["zoo_triton_bwd_fwdbwd_ms"] = 1e3 * time_jax(triton_grad, qs, ks, v, w, repeats=repeats)
            record["err_mosaic_bwd_vs_triton_bwd"] = max(
                relative_max_error(a, b) for a, b in zip(jax.tree.leaves(grad(qs, ks, v, w)),
                                                         jax.tree.leaves(triton_grad(qs, ks, v, w))))
    # The peers see one head dimension: the RoPE key broadcast to every head, the parts concatenated.
    q = jnp.concatenate(qs, axis=-1)
    k = jnp.concatenate([jnp.broadcast_to(x, (*x.shape[:2], kv_heads, x.shape[-1])) for x in ks], axis=-1)
    try:
        c_forward, c_grad = cudnn_fns(window, scale)
        record["cudnn_fwd_ms"] = 1e3 * time_jax(c_forward, q, k, v, repeats=repeats)
        record["cudnn_fwdbwd_ms"] = 1e3 * time_jax(c_grad, q, k, v, w, repeats=repeats)
        record["err_vs_cudnn"] = relative_max_error(forward(qs, ks, v), c_forward(q, k, v))
    except Exception as error:  # noqa: BLE001 - a shape cuDNN refuses is reported, not fatal
        record["cudnn_error"] = f"{type(error).__name__}: {str(error)[:300]}"
    if window is None and not shared_rope:
        record.update(mosaic_gpu_forward(q, k, v, repeats))
    try:
        t_forward, t_forward_backward = torch_fns(q, k, v, w, window, scale)
        record["torch_sdpa_fwd_ms"] = 1e3 * time_torch(t_forward, repeats)
        record["torch_sdpa_fwdbwd_ms"] = 1e3 * time_torch(t_forward_backward, repeats)
    except Exception as error:  # noqa: BLE001
        record["torch_error"] = f"{type(error).__name__}: {str(error)[:300]}"
    return record


# (backward q block, backward k block, warps, stages) of the Triton backward, the first gpu.py's default; or
# ("mosaic", q block, k block): the Mosaic GPU backward (hopper.backward: 2 x 64-row tiles, streaming blocks of
# q block queries to the dk / dv kernel and of k block keys to the dq kernel)
BACKWARD_CONFIGS = [("mosaic", 64, 64), ("mosaic", 128, 64), ("mosaic", 64, 128), (64, 64, 4, 3), (64, 64, 4, 2), (64, 64, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3),
                    (64, 128, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (32, 64, 4, 3), (64, 32, 4, 3)]


def backward_sweep(case, repeats, emit, configs=BACKWARD_CONFIGS):
    """The Triton backward's tiles, warps and stages on one case, and the Mosaic GPU backward ("mosaic"), the
    forward as impl="pallas" picks it: per config the forward+backward call's wall time, from jax.profiler's
    device trace each kernel's median device time (the dq and dk/dv kernels, the forward, XLA's fusions around
    them), and the gradients' relative max error against the default Triton backward's."""
    from device_trace import device_kernels  # the profiler's per-kernel times

    batch, length, heads, kv_heads = case["batch"], case["length"], case["heads"], case["kv_heads"]
    dims, dim_v, window = case["dims"], case["dim_v"], case["window"]
    qs, ks, v, w = jax_inputs(batch, length, heads, dims, dim_v, (kv_heads, 1) if len(dims) == 2 else (kv_heads,))
    platform = gpu_kernel(qs, ks, v)
    parts = hopper.kernel_parts(qs, ks, v)  # as the Mosaic GPU kernels get them
    forward_blocks = (hopper.default_blocks(*parts, v) if platform == "mosaic_gpu" else gpu.default_blocks(window))[:2]
    defaults = gpu.BACKWARD_WARPS, gpu.STAGES
    scale = sum(dims) ** -0.5
    with triton_backward():
        _, triton_grad = zoo_fns(length, batch, window, scale)
        expected = triton_grad(qs, ks, v, w)
    for config in configs:
        backward = contextlib.nullcontext()
        if config[0] == "mosaic":
            record = {**case, "dtype": "bfloat16", "forward_kernel": platform, "backward_kernel": "mosaic_gpu",
                      "backward_blocks": list(config[1:]), "stages": hopper.BACKWARD_STAGES}
            refusal = hopper.supports_backward(*parts, v, config[1:])
            if refusal:  # flash_attention would run Triton's backward instead
                emit({**record, "error": refusal})
                continue
            _, grad = zoo_fns(length, batch, window, scale, (*forward_blocks, *config[1:]), "mosaic_gpu")
        else:
            block_q, block_k, warps, stages = config
            gpu.BACKWARD_WARPS, gpu.STAGES = warps, stages
            record = {**case, "dtype": "bfloat16", "forward_kernel": platform, "backward_kernel": "gpu",
                      "backward_blocks": [block_q, block_k], "backward_warps": warps, "stages": stages}
            _, grad = zoo_fns(length, batch, window, scale, (*forward_blocks, block_q, block_k))
            backward = triton_backward()  # grad is traced at its first call
        try:
            with backward:
                gradients = grad(qs, ks, v, w)
            record["err_vs_triton_backward"] = max(relative_max_error(g, e) for g, e in
                                                   zip(jax.tree.leaves(gradients), jax.tree.leaves(expected)))
            record["zoo_fwdbwd_ms"] = 1e3 * time_jax(grad, qs, ks, v, w, repeats=repeats)
            kernels = device_kernels(grad, qs, ks, v, w, calls=10)
            record["device_us"] = {name: round(us, 1) for name, (_, us) in kernels.items()}
            record["device_ms_per_call"] = sum(n * us for n, us in kernels.values()) / 1e3
        except Exception as error:  # noqa: BLE001 - a tile Triton cannot compile is reported
            record["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        emit(record)
    gpu.BACKWARD_WARPS, gpu.STAGES = defaults


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--sweep-only", action="store_true", help="the sweep without the peer comparison")
    parser.add_argument("--full-causal-only", action="store_true", help="only the first case (MHA, full causal)")
    parser.add_argument("--mosaic-sweep", action="store_true", help="the Mosaic GPU forward's key blocks and stages")
    parser.add_argument("--backward-sweep", default="", help="the backward's tiles on these cases: mha (full causal), "
                        "gqa (16/4, full causal), mla (prefill, 128 + 64), mla192 (the same unsplit), comma-separated")
    parser.add_argument("--backward-configs", default="",
                        help="q block x k block x warps x stages of the Triton backward, or mosaicQxK (the Mosaic GPU "
                        "backward streaming Q-query and K-key blocks), comma-separated (default: BACKWARD_CONFIGS)")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = jax.devices()[0].device_kind
    length, batch = args.length, args.batch
    base = dict(batch=batch, length=length, heads=16, kv_heads=16, dims=(128,), dim_v=128, window=None)
    if args.out:
        open(args.out, "w").close()

    def emit(record):  # written as measured: a call cut short keeps what it had
        record["device"] = device
        print(json.dumps(record), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")

    if args.sweep or args.sweep_only:
        defaults = gpu.WARPS, gpu.BACKWARD_WARPS, gpu.STAGES
        for warps, stages, blocks in [(4, 2, (128, 64, 64, 64)), (8, 2, (128, 64, 64, 64)), (8, 3, (128, 64, 64, 64)),
                                      (4, 3, (128, 64, 64, 64)), (8, 2, (128, 128, 64, 128)), (8, 3, (128, 128, 128, 64)),
                                      (4, 2, (64, 64, 32, 64)), (4, 3, (64, 32, 64, 32)), (8, 2, (64, 128, 128, 32)),
                                      (4, 3, (64, 64, 64, 64)), (4, 4, (64, 32, 64, 64)), (4, 3, (128, 32, 64, 64)),
                                      (8, 3, (128, 32, 128, 32))]:
            gpu.WARPS = gpu.BACKWARD_WARPS = warps
            gpu.STAGES = stages
            try:
                emit(measure({**base, "blocks": blocks, "platform": "gpu"}, args.repeats, peers=False))
            except Exception as error:  # noqa: BLE001 - a tile Triton cannot compile is reported
                print(f"warps {warps} stages {stages} blocks {blocks}: {type(error).__name__}: {str(error)[:200]}",
                      flush=True)
        gpu.WARPS, gpu.BACKWARD_WARPS, gpu.STAGES = defaults
    if args.mosaic_sweep:
        default_stages = hopper.STAGES
        for window, block_k, stages in itertools.product((None, length // 8), (64, 128), (2, 3)):
            hopper.STAGES = stages
            case = {**base, "window": window, "platform": "mosaic_gpu", "blocks": (hopper.PROGRAM_ROWS, block_k, 64, 64)}
            try:
                emit(measure(case, args.repeats, peers=False))
            except Exception as error:  # noqa: BLE001 - a tile that does not fit is reported
                print(f"mosaic block_k {block_k} stages {stages}: {type(error).__name__}: {str(error)[:300]}", flush=True)
        hopper.STAGES = default_stages
    if args.backward_sweep:
        def config(text):  # "64x64x4x3" (Triton) or "mosaic64x64"
            mosaic = text.startswith("mosaic")
            numbers = tuple(map(int, text.removeprefix("mosaic").split("x")))
            return ("mosaic", *numbers) if mosaic else numbers

        configs = [config(c) for c in args.backward_configs.split(",")] if args.backward_configs else BACKWARD_CONFIGS
        named = {"mha": base, "gqa": {**base, "kv_heads": 4}, "mla": {**base, "dims": (128, 64)}, "mla192": {**base, "dims": (192,)}}
        for name in args.backward_sweep.split(","):
            backward_sweep(named[name], args.repeats, emit, configs)
    if args.sweep_only or args.backward_sweep:
        cases = []
    else:
        cases = [base, {**base, "window": length // 8}, {**base, "kv_heads": 4}, {**base, "kv_heads": 4, "window": length // 8},
                 {**base, "dims": (128, 64)},  # MLA prefill, 128 + 64 RoPE (shared key), v 128
                 {**base, "dims": (192,)}]  # the same widths unsplit: q / k 192 (the RoPE key per head), v 128
        cases = cases[:1] if args.full_causal_only else cases
    for case in cases:
        emit(measure(case, args.repeats))


if __name__ == "__main__":
    main()
