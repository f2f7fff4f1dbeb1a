"""Where an S4D layer's training step goes, at the ListOps shape (bench/listops.py: batch 32, 2,000 tokens, 128
channels, state 64): forward + backward of one layer in the FFT form and for several chunk sizes, with and without padding in the
segment ids, beside one attention layer (4 heads x 32) of the same width. Median ms per call; JSON lines to --out.

    python bench/s4d_step.py --out s4d_step.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from scan_kernels import time_jax  # noqa: E402
from zoo.layers.attention import Attention, AttentionConfig  # noqa: E402
from zoo.layers.s4d import S4D, S4DConfig  # noqa: E402


def layer_step(module, x, positions, segments):
    params = module.init(jax.random.key(0), x[:1], positions=positions[:1], segment_ids=segments[:1])

    def loss(p, x):
        return jnp.sum(module.apply(p, x, positions=positions, segment_ids=segments)[0].astype(jnp.float32) ** 2)

    return jax.jit(jax.grad(loss)), params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=2000)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--chunks", default="16,32,64,128")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((args.batch, args.length, args.channels)), dtype)
    positions = jnp.broadcast_to(jnp.arange(args.length, dtype=jnp.int32), x.shape[:2])
    real = jnp.ones(x.shape[:2], jnp.int32)
    padded = real.at[:, 3 * args.length // 4:].set(0)  # a ListOps row: real tokens, then padding (segment 0)
    variants = [(f"s4d chunk {c}", S4D(S4DConfig(state_dim=64, chunk_size=c), args.channels, dtype=dtype))
                for c in (int(c) for c in args.chunks.split(","))]
    variants.insert(0, ("s4d fft", S4D(S4DConfig(state_dim=64, convolution="fft"), args.channels, dtype=dtype)))
    variants.append(("attention 4x32", Attention(AttentionConfig(4, 4, 32), args.channels, dtype=dtype)))
    with open(args.out, "a") as out:
        for name, module in variants:
            for segments_name, segments in (("one segment", real), ("padded", padded)):
                step, params = layer_step(module, x, positions, segments)
                cost = step.lower(params, x).compile().cost_analysis()
                cost = cost[0] if isinstance(cost, list) else cost
                row = {"layer": name, "segments": segments_name, "batch": args.batch, "length": args.length,
                       "channels": args.channels, "dtype": args.dtype, "device": jax.devices()[0].device_kind,
                       "ms": round(1e3 * time_jax(step, params, x, repeats=args.repeats), 3),
                       "gflop": round(cost.get("flops", 0) / 1e9, 2), "gbytes": round(cost.get("bytes accessed", 0) / 1e9, 2)}
                print(json.dumps(row), flush=True)
                out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
