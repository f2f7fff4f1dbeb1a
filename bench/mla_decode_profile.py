"""Where the Hopper MLA decode kernel's time goes, from Mosaic GPU's on-device profiler: every warpgroup of
every program records when it enters and leaves the kernel's named scopes (jax.named_scope in
zoo/pallas_kernels/mla_decode/hopper.py), and this sums them per warpgroup.

    python bench/mla_decode_profile.py --batch 128 --context 2048 --out profile.json

Prints, per warpgroup (hopper.WARPGROUPS: 0 and 1 compute, 2 memory), each region's exclusive time (its
own, less the regions nested in it) per program and how often it was entered, the time outside every
region, and the programs' span (first to last event); means over programs. Times are in thousands of SM
clock cycles (the profiler reads %clock). The profiler's buffer lives in shared memory next to the kernel's,
so the walk is kept short (--context) and regions past the buffer (--space ranges a warpgroup) are dropped.
The kernel is also timed with the profiler off, on the same inputs. Same shapes as bench/attention_kernels.py.
The profile comes back through a host callback: run with JAX_PLATFORMS=cuda,cpu.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parent))
from attention_kernels import HEADS, RANK, ROPE  # noqa: E402
from scan_kernels import time_jax  # noqa: E402
from zoo.pallas_kernels.mla_decode import hopper, mla_decode  # noqa: E402

def summarize(trace: dict) -> dict:
    """Per warpgroup: each region's mean exclusive kilocycles per program and entries ('<name> count'),
    'outside' and 'span'."""
    by_trace = collections.defaultdict(list)
    for event in trace["traceEvents"]:
        by_trace[event["tid"]].append(event)
    totals = [collections.defaultdict(float) for _ in range(hopper.WARPGROUPS)]
    programs = [0] * hopper.WARPGROUPS
    for tid, events in by_trace.items():
        wg = (tid - 1) % hopper.WARPGROUPS
        programs[wg] += 1
        stack, inside = [], 0.0
        for event in events:
            if event["ph"] == "B":
                stack.append([event["name"], event["ts"], 0.0])
                continue
            name, start, nested = stack.pop()
            duration = event["ts"] - start
            totals[wg][name] += duration - nested
            totals[wg][f"{name} count"] += 1
            if stack:
                stack[-1][2] += duration
            else:
                inside += duration
        span = events[-1]["ts"] - events[0]["ts"]
        totals[wg]["span"] += span
        totals[wg]["outside"] += span - inside
    return {f"warpgroup {wg}": {name: round(value / max(programs[wg], 1), 3) for name, value in sorted(totals[wg].items())}
            for wg in range(hopper.WARPGROUPS)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--splits", type=int, default=1)
    parser.add_argument("--space", type=int, default=100, help="profiler ranges per warpgroup")
    parser.add_argument("--out")
    args = parser.parse_args()
    keys = jax.random.split(jax.random.key(0), 4)
    shapes = [(args.batch, HEADS, RANK), (args.batch, HEADS, ROPE), (args.batch, args.context, RANK),
              (args.batch, args.context, ROPE)]
    inputs = [jax.random.normal(k, s, jnp.bfloat16) for k, s in zip(keys, shapes)]
    inputs.append(jnp.full((args.batch,), args.context, jnp.int32))

    def run():
        return jax.jit(lambda *a: mla_decode(*a, scale=0.05, impl="pallas", platform="mosaic_gpu",
                                             splits=args.splits))

    milliseconds = 1e3 * time_jax(run(), *inputs, repeats=5)
    directory = tempfile.mkdtemp()
    plain = dict(hopper.COMPILER_PARAMS)
    hopper.COMPILER_PARAMS.update(profile_space=args.space, profile_dir=directory, profile_bounds_check=True)
    try:
        jax.block_until_ready(run()(*inputs))
    finally:
        hopper.COMPILER_PARAMS.clear()
        hopper.COMPILER_PARAMS.update(plain)
    (path,) = glob.glob(os.path.join(directory, "*.json"))
    with open(path) as f:
        summary = summarize(json.load(f))
    record = {"device": jax.devices()[0].device_kind, "batch": args.batch, "context": args.context,
              "splits": args.splits, "heads": HEADS, "unprofiled_ms": milliseconds, **summary}
    print(json.dumps(record, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f)


if __name__ == "__main__":
    main()
