"""Wall clock against device time for back-to-back calls of the HBM copy and of the 128-head MLA decode kernel
(batch 128, 8K and 32K): per call the wall-clock time (bench/scan_kernels.time_jax), the host's dispatch time,
and from jax.profiler's device trace the kernels' median duration and the median period between consecutive
kernel starts (a period longer than the duration is the GPU waiting for the host). One JSON line per case;
the "host_top" lists are the host-side trace events with the longest medians.

    JAX_PLATFORMS=cuda python bench/call_gap.py > call_gap.jsonl
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parent))
from attention_kernels import inputs  # noqa: E402
from device_trace import device_trace  # noqa: E402
from scan_kernels import time_jax  # noqa: E402
from zoo.pallas_kernels.mla_decode import mla_decode  # noqa: E402


def trace(fn, *args, calls=20):
    """Device kernels of `calls` back-to-back calls: their count, names, median duration and median start-to-start
    period (microseconds), and the host-side events seen once a call or more, longest median first."""
    events, devices = device_trace(fn, *args, calls=calls)
    kernels = sorted((e["ts"], e["dur"], e["name"]) for e in events if e.get("ph") == "X" and e["pid"] in devices)
    starts = [start for start, _, _ in kernels]
    periods = [b - a for a, b in zip(starts, starts[1:])]
    host = {}
    for event in events:
        if event.get("ph") == "X" and event["pid"] not in devices:
            host.setdefault(event["name"], []).append(event["dur"])
    host_top = sorted(((statistics.median(durations), len(durations), name) for name, durations in host.items()
                       if len(durations) >= calls), reverse=True)[:12]
    return {"kernels": len(kernels), "names": sorted({name for _, _, name in kernels}),
            "dur_med_us": statistics.median(duration for _, duration, _ in kernels),
            "period_med_us": statistics.median(periods) if periods else None, "host_top": host_top}


def dispatch_us(fn, *args, calls=20):
    """Median host time of a call until it returns (the device work runs on after it)."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        out = fn(*args)
        samples.append(time.perf_counter() - start)
        jax.block_until_ready(out)
    return 1e6 * statistics.median(samples)


def main():
    x = jnp.ones((1 << 29,), jnp.bfloat16)  # 1 GiB, as scan_kernels.ceilings
    copy = jax.jit(lambda a: a * 2)
    record = {"what": "copy", "wall_ms": 1e3 * time_jax(copy, x, repeats=7), "dispatch_us": dispatch_us(copy, x),
              **trace(copy, x)}
    print(json.dumps(record), flush=True)
    del x
    for batch, context in ((128, 8192), (128, 32768)):
        operands = inputs(batch, context)
        decode = jax.jit(lambda *a: mla_decode(*a, scale=0.05, impl="pallas"))
        record = {"what": "mla", "batch": batch, "context": context,
                  "wall_ms": 1e3 * time_jax(decode, *operands, repeats=7),
                  "dispatch_us": dispatch_us(decode, *operands), **trace(decode, *operands)}
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
