"""What the GPU runs for one MLA decode call and for how long, from jax.profiler's device trace: every
kernel a call launches (the Mosaic GPU kernel, and any XLA fusion around it) with its median device time,
the device time per call without host dispatch, and the HBM copy ceiling's kernel timed the same way in
the same run. Also the share of the run that the driver capped the clocks for power, and the SM clock
right after it with the board's maximum (nvidia-smi): both move a compute-bound kernel's time from run to
run and from board to board.

    python bench/device_trace.py --batches 128,64 --contexts 8192,32768 --calls 20 --out trace.jsonl

Shapes and traffic as bench/attention_kernels.py (128 heads, rank 512, RoPE 64, bf16, contiguous cache
full to the context). Run with JAX_PLATFORMS=cuda.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import statistics
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parent))
from attention_kernels import inputs, traffic_bytes  # noqa: E402
from scan_kernels import gpu_clocks, power_capped  # noqa: E402
from zoo.pallas_kernels.mla_decode import mla_decode  # noqa: E402


def device_trace(fn, *args, calls: int) -> tuple[list, set]:
    """jax.profiler's trace events of `calls` back-to-back calls (after two untimed ones), and the ids of the
    processes that are GPU devices in it."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    directory = tempfile.mkdtemp()
    with jax.profiler.trace(directory):
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
    (path,) = glob.glob(f"{directory}/**/*.trace.json.gz", recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
               and "/device:gpu" in e["args"]["name"].lower()}
    return events, devices


def device_kernels(fn, *args, calls: int) -> dict:
    """{kernel name: (launches per call, median device microseconds)} over `calls` back-to-back calls."""
    events, devices = device_trace(fn, *args, calls=calls)
    durations = collections.defaultdict(list)
    for event in events:
        if event.get("ph") == "X" and event["pid"] in devices:
            durations[event["name"]].append(event["dur"])
    return {name: (len(times) / calls, statistics.median(times)) for name, times in durations.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="128")
    parser.add_argument("--contexts", default="8192")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--out")
    args = parser.parse_args()
    device = jax.devices()[0].device_kind
    x = jnp.ones((1 << 29,), jnp.bfloat16)  # 1 GiB, as scan_kernels.ceilings
    copy = jax.jit(lambda a: a * 2)
    (copy_us,) = [us for _, us in device_kernels(copy, x, calls=args.calls).values()]
    del x
    copy_GBps = 2 * (1 << 30) / copy_us / 1e3
    records = []
    for batch in map(int, args.batches.split(",")):
        for context in map(int, args.contexts.split(",")):
            operands = inputs(batch, context)
            fn = jax.jit(lambda *a: mla_decode(*a, scale=0.05, impl="pallas"))
            kernels, capped = power_capped(device_kernels, fn, *operands, calls=args.calls)
            clocks = gpu_clocks()  # right after the calls, before the clock falls back to idle
            main_name = max(kernels, key=lambda name: kernels[name][0] * kernels[name][1])
            kernel_us = kernels[main_name][1]
            record = {"device": device, "batch": batch, "context": context, "calls": args.calls,
                      "copy_device_GBps": copy_GBps, "kernel": main_name, "kernel_device_ms": kernel_us / 1e3,
                      "device_ms_per_call": sum(n * us for n, us in kernels.values()) / 1e3,
                      "kernel_GBps": traffic_bytes(batch, context) / kernel_us / 1e3,
                      "kernels_per_call": {name: [n, round(us, 1)] for name, (n, us) in kernels.items()},
                      "power_capped_fraction": capped, **clocks}
            record["fraction_of_copy"] = record["kernel_GBps"] / copy_GBps
            print(json.dumps(record), flush=True)
            records.append(record)
            del operands
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


if __name__ == "__main__":
    main()
