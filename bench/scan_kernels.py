"""Chunked-scan kernels on one GPU: zoo's Pallas kernels, zoo's XLA reference and flash-linear-attention
in the same run.

    python bench/scan_kernels.py --ops ssd,delta --lengths 2048,4096,8192 --out results.jsonl

Shapes: B=8, H=16, K=V=128, bf16 inputs, one document per row, zero initial state, final state
returned by every implementation. Two scans, each as zoo's Pallas kernels (impl="pallas"), zoo's XLA
reference (impl="xla", float32 inside) and the fla peer (scale 1, output_final_state=True):
  ssd:   the scalar-decay scan (Mamba-2 SSD / RetNet / simple GLA form), zoo.pallas_kernels.ssd_scan vs
         fla chunk_simple_gla;
  delta: the gated delta rule (Gated DeltaNet; L2-normalised q, k; beta = sigmoid),
         zoo.pallas_kernels.delta_scan vs fla chunk_gated_delta_rule.
Forward and forward+backward (gradients of sum(o * w) wrt every input but the state) are timed
separately.

Timing: after two untimed calls (compilation / autotuning), `--repeats` groups of 10 back-to-back calls
each synchronised once; the median per-call time is reported. Ceilings measured in the same run: HBM
copy bandwidth (a 1 GiB bf16 array read and written by XLA) and dense bf16 matmul throughput (8192^3).
Achieved figures: TFLOP/s of the chunked algorithm (chunk C = 64, K = V = D; per token and head,
forward: ssd 4CD + 4D^2, delta 8CD + 6D^2 (Gram matrix, triangular solve, corrections, output, state);
forward+backward counted as 3x forward) and GB/s of the forward's compulsory traffic (read q, k, v in
bf16 and the float32 gates, write o in bf16).
Correctness in the same run: our kernel's o against fla's and against the XLA reference (relative
max error), recorded with the timings.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from zoo.pallas_kernels.delta_scan import delta_scan
from zoo.pallas_kernels.ssd_scan import ssd_scan

CHUNK = 64


def time_jax(fn, *args, repeats: int) -> float:
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(10):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / 10)
    return statistics.median(samples)


def nvidia_smi(*args: str) -> str | None:
    """nvidia-smi's report for GPU 0 with these arguments; None where nvidia-smi is missing or fails."""
    try:
        return subprocess.run(["nvidia-smi", *args, "-i", "0"], capture_output=True, text=True, timeout=30,
                              check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def power_capped(fn, *args, **kwargs):
    """(fn(*args, **kwargs), the share of its wall time that the driver spent capping the GPU's clocks for
    power: nvidia-smi's "SW Power Capping" counter; None without nvidia-smi). Compute-bound kernels slow with it."""
    def counter():
        report = nvidia_smi("-q", "-d", "PERFORMANCE")
        found = report and re.search(r"SW Power Capping\s*:\s*(\d+)\s*us", report.split("Counters", 1)[-1])
        return int(found[1]) if found else None

    before, start = counter(), time.perf_counter()
    result = fn(*args, **kwargs)
    after, seconds = counter(), time.perf_counter() - start
    return result, None if before is None or after is None else (after - before) / 1e6 / seconds


def gpu_clocks() -> dict:
    """GPU 0's SM clock now and its board's maximum (MHz), and its temperature (C), from nvidia-smi (empty
    without it; None for a field it cannot read). A compute-bound kernel's time follows the SM clock, which
    the driver lowers under sustained load."""
    fields = {"clocks.sm": "sm_clock_MHz", "clocks.max.sm": "max_sm_clock_MHz", "temperature.gpu": "temperature_C"}
    report = nvidia_smi(f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits")
    if report is None:
        return {}

    def number(text):
        try:
            return float(text)
        except ValueError:  # "[N/A]" on boards that do not report a field
            return None

    return {name: number(value) for name, value in zip(fields.values(), report.split(","))}


def time_torch(fn, repeats: int) -> float:
    import torch

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) / 10)
    return statistics.median(samples)


def ceilings(repeats: int) -> dict:
    """HBM copy (1 GiB read + 1 GiB written), HBM read (1 GiB summed: the ceiling of a kernel that mostly
    reads, as decode does; on an H200 it is ~1.5x the copy's) and dense bf16 matmul."""
    x = jnp.ones((1 << 29,), jnp.bfloat16)  # 1 GiB
    copy = jax.jit(lambda a: a * 2)
    seconds = time_jax(copy, x, repeats=repeats)
    read_seconds = time_jax(jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32)), x, repeats=repeats)
    a = jnp.ones((8192, 8192), jnp.bfloat16)
    matmul = jax.jit(lambda a, b: a @ b)
    mm_seconds = time_jax(matmul, a, a, repeats=repeats)
    return {"copy_GBps": 2 * x.nbytes / seconds / 1e9, "read_GBps": x.nbytes / read_seconds / 1e9,
            "matmul_bf16_TFLOPs": 2 * 8192**3 / mm_seconds / 1e12}


def inputs(op, batch, length, heads, dim, seed=0):
    """The differentiable inputs of `op` (q, k, v, gates...) and the fixed ones (segments, state)."""
    rng = np.random.default_rng(seed)
    normal = lambda *s: rng.normal(size=s)  # noqa: E731
    q, k, v = normal(batch, length, heads, dim), normal(batch, length, heads, dim), normal(batch, length, heads, dim)
    log_decay = np.log(1 / (1 + np.exp(-normal(batch, length, heads)))) / 16
    if op == "ssd":
        q, k = q * dim**-0.5, k * dim**-0.5
        gates = (log_decay,)
    else:
        unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
        q, k = unit(q) * dim**-0.5, unit(k)
        gates = (log_decay, 1 / (1 + np.exp(-normal(batch, length, heads))))
    differentiable = (*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)), *(jnp.asarray(g, jnp.float32) for g in gates))
    return differentiable, (jnp.zeros((batch, length), jnp.int32), jnp.zeros((batch, heads, dim, dim), jnp.float32))


SCANS = {"ssd": ssd_scan, "delta": delta_scan}
FLOPS_PER_TOKEN_HEAD = {"ssd": lambda d: 4 * CHUNK * d + 4 * d * d, "delta": lambda d: 8 * CHUNK * d + 6 * d * d}
GATES = {"ssd": 1, "delta": 2}


def zoo_fns(op, impl):
    scan = SCANS[op]

    def forward(differentiable, fixed):
        segments, state = fixed
        return scan(*differentiable, segments, state, None, CHUNK, impl=impl, dtype=jnp.bfloat16)

    def loss(differentiable, fixed, w):
        o, final = forward(differentiable, fixed)
        return jnp.sum(o.astype(jnp.float32) * w)

    return jax.jit(forward), jax.jit(jax.grad(loss))


def fla_fns(op, differentiable, w):
    import torch

    to_torch = lambda a: torch.from_numpy(np.array(a.astype(jnp.float32))).cuda()  # noqa: E731
    tq, tk, tv = (to_torch(a).bfloat16().requires_grad_() for a in differentiable[:3])
    gates = [to_torch(a).requires_grad_() for a in differentiable[3:]]
    tw = to_torch(w).bfloat16()
    if op == "ssd":
        from fla.ops.simple_gla import chunk_simple_gla

        def forward():
            return chunk_simple_gla(tq, tk, tv, g=gates[0], scale=1.0, output_final_state=True)
    else:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        def forward():
            return chunk_gated_delta_rule(q=tq, k=tk, v=tv, g=gates[0], beta=gates[1], scale=1.0,
                                          output_final_state=True)

    def forward_backward():
        o, _ = forward()
        (o * tw).sum().backward()

    return forward, forward_backward


def measure(op, length, args) -> dict:
    b, h, d = args.batch, args.heads, args.dim
    device = jax.devices()[0].device_kind
    differentiable, fixed = inputs(op, b, length, h, d)
    w = jnp.asarray(np.random.default_rng(1).normal(size=differentiable[2].shape), jnp.float32)
    token_heads = b * length * h
    flops = token_heads * FLOPS_PER_TOKEN_HEAD[op](d)
    traffic = token_heads * (4 * d * 2 + 4 * GATES[op])
    row = {"kind": f"{op}_scan", "device": device, "batch": b, "length": length, "heads": h, "dim": d,
           "dtype": "bfloat16", "chunk": CHUNK}
    times, outputs = {}, {}
    for impl in ("pallas", "xla"):
        fwd, fwd_bwd = zoo_fns(op, impl)
        times[f"zoo_{impl}_fwd_ms"] = 1e3 * time_jax(fwd, differentiable, fixed, repeats=args.repeats)
        times[f"zoo_{impl}_fwd_bwd_ms"] = 1e3 * time_jax(fwd_bwd, differentiable, fixed, w, repeats=args.repeats)
        outputs[impl] = np.asarray(fwd(differentiable, fixed)[0], np.float32)
    row["err_pallas_vs_xla"] = float(np.abs(outputs["pallas"] - outputs["xla"]).max() / np.abs(outputs["xla"]).max())
    print(json.dumps({**row, **times}), flush=True)
    if not args.no_peer:
        fwd, fwd_bwd = fla_fns(op, differentiable, w)
        times["fla_fwd_ms"] = 1e3 * time_torch(fwd, args.repeats)
        o_fla = fwd()[0].detach().float().cpu().numpy()
        row["err_pallas_vs_fla"] = float(np.abs(outputs["pallas"] - o_fla).max() / np.abs(o_fla).max())
        try:
            times["fla_fwd_bwd_ms"] = 1e3 * time_torch(fwd_bwd, args.repeats)
        except Exception as error:  # fla's gated backward refuses on some Triton versions (fla issue 640)
            row["fla_fwd_bwd_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    row.update(times)
    fwd_ms = times["zoo_pallas_fwd_ms"]
    row["zoo_pallas_fwd_TFLOPs"] = flops / fwd_ms / 1e9
    row["zoo_pallas_fwd_GBps"] = traffic / fwd_ms / 1e6
    row["zoo_pallas_fwd_bwd_TFLOPs"] = 3 * flops / times["zoo_pallas_fwd_bwd_ms"] / 1e9
    row["speedup_fwd_bwd_vs_xla"] = times["zoo_xla_fwd_bwd_ms"] / times["zoo_pallas_fwd_bwd_ms"]
    print(json.dumps(row), flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default="ssd,delta")
    parser.add_argument("--lengths", default="2048,4096,8192")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = jax.devices()[0].device_kind
    limits = ceilings(args.repeats)
    print(f"{device}: copy {limits['copy_GBps']:.0f} GB/s, bf16 matmul {limits['matmul_bf16_TFLOPs']:.0f} TFLOP/s",
          flush=True)
    records = [{"kind": "ceilings", "device": device, **limits}]
    for op in args.ops.split(","):
        for length in map(int, args.lengths.split(",")):
            records.append(measure(op, length, args))
    if args.out:
        with open(args.out, "a") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
