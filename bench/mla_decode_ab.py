"""Interleaved A/B timing of versions of the Hopper MLA decode kernel (zoo/pallas_kernels/mla_decode/hopper.py)
on the same inputs, for changes smaller than the run-to-run spread of separate bench runs (this H200's clocks
vary between calls: the same kernel has measured 0.526-0.539 ms at batch 128 / 8K in separate calls).

    git show d830b47:pallas_kernels/mla_decode/hopper.py > /tmp/before.py
    python bench/mla_decode_ab.py /tmp/before.py zoo/pallas_kernels/mla_decode/hopper.py --rounds 41

Each version is imported from its file and called directly (1 split, contiguous cache as a pool of pages in
order), checked bit-equal to the first (or, with --tolerance, within that relative max error of it: for
versions that sum in another order), then timed in rounds that alternate the versions' order (ABAB, then
BABA), each round 20 calls after one untimed call. Prints and records the median and minimum per version.
Same shapes as bench/attention_kernels.py (128 heads, R 512, RoPE 64, bf16).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parent))
from attention_kernels import inputs, traffic_bytes  # noqa: E402

CALLS = 20
SCALE = 0.07  # any softmax scale: every version gets the same


def load(path: str):
    spec = importlib.util.spec_from_file_location(f"hopper_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(fn, args) -> float:
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(CALLS):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / CALLS * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("versions", nargs="+", help="paths of hopper.py versions")
    parser.add_argument("--shapes", default="128x8192,64x32768,128x32768", help="batch x context, comma-separated")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--tolerance", type=float, default=0.0,
                        help="relative max error allowed against the first version (default: bit-equal)")
    parser.add_argument("--out", help="append one JSON record per shape")
    args = parser.parse_args()
    versions = {path: load(path) for path in args.versions}
    for shape in args.shapes.split(","):
        batch, context = map(int, shape.split("x"))
        q_lat, q_pe, c, k_pe, lengths = inputs(batch, context)
        page = versions[args.versions[0]].PAGE
        pool = lambda x: x.reshape(batch * context // page, page, x.shape[-1])  # noqa: E731
        table = jnp.arange(batch * context // page, dtype=jnp.int32).reshape(batch, -1)
        call_args = (q_lat, q_pe, pool(c), pool(k_pe), lengths, table)
        fns = {path: jax.jit(lambda *a, m=m: m.mla_decode(*a, scale=SCALE, splits=1, split_len=context,
                                                          interpret=False)[0])
               for path, m in versions.items()}
        first = jax.block_until_ready(fns[args.versions[0]](*call_args))
        errors = {}
        for path, fn in fns.items():
            errors[path] = float(jnp.max(jnp.abs(fn(*call_args) - first)) / jnp.max(jnp.abs(first)))
            if errors[path] > args.tolerance:
                raise SystemExit(f"{path} differs from {args.versions[0]} by {errors[path]:.2e} (relative max) at "
                                 f"batch {batch}, context {context}; allowed {args.tolerance:.1e}")
        samples = {path: [] for path in fns}
        for r in range(args.rounds):
            for path in args.versions if r % 2 == 0 else args.versions[::-1]:
                samples[path].append(timed(fns[path], call_args))
        record = {"device": jax.devices()[0].device_kind, "batch": batch, "context": context, "rounds": args.rounds,
                  "calls_per_round": CALLS, "bit_equal": not any(errors.values()),
                  "versions": {path: {"median_ms": statistics.median(v), "min_ms": min(v),
                                      "error_vs_first": errors[path],
                                      "GBps": traffic_bytes(batch, context) / statistics.median(v) / 1e6}
                               for path, v in samples.items()}}
        print(json.dumps(record), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")

if __name__ == "__main__":
    main()
