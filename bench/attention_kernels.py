"""Decode kernels on one GPU, with the HBM copy ceiling measured in the same run:
- MLA absorbed decode (zoo.pallas_kernels.mla_decode) against zoo's XLA form of the same step;
- GQA decode (zoo.pallas_kernels.decode_attention) against its XLA form and cuDNN (jax.nn.dot_product_attention).

    python bench/attention_kernels.py --batches 64,128 --contexts 4096,8192,16384,32768 --out results.jsonl
    python bench/attention_kernels.py --sweep   # also head_block x block x warps x stages at one shape
    python bench/attention_kernels.py --heads 16  # the memory-bound case: 128 heads split over 8 GPUs
    python bench/attention_kernels.py --gqa-only --gqa-batches 8,64 --contexts 8192,32768

MLA shape as DeepSeek-V2/V3 decode: 128 heads (--heads), kv_lora_rank 512, RoPE dim 64, bf16 cache and
queries, every row attending to its whole context (lengths = context). Paged: the same cache cut into
64-slot pages and scattered over a pool in a random order, read through the block table; "l2_resident":
the paged kernel with every row's table pointing at its first page, so that reads hit L2 and the time is
the kernel's compute (the Mosaic GPU kernel's ceiling where it is compute-bound). XLA =
zoo.layers.mla.latent_attention on the same bf16 arrays. Achieved GB/s counts the compulsory traffic: the
cache read once (c and k_pe), queries read and outputs written once; TFLOP/s counts 2 * H * context *
(2R + P) per row. GQA shape as Llama-3-8B: 32 query heads, 8 key heads of 128, bf16 cache [B, S, 8, 128]
full to the context; GB/s counts keys and values read once. Timing: two untimed calls, then median of
`--repeats` groups of 10 calls. power_capped_fraction: the share of the MLA kernel's timing during which the
driver capped the clocks for power (nvidia-smi's counter); the 128-head kernel is compute-bound, so its time
moves with it (bench/device_trace.py gives device times without host dispatch).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parent))
from scan_kernels import ceilings, power_capped, time_jax  # noqa: E402
from zoo.layers.mla import latent_attention  # noqa: E402
from zoo.pallas_kernels.decode_attention import decode_attention  # noqa: E402
from zoo.pallas_kernels.decode_attention import gpu as decode_gpu  # noqa: E402
from zoo.pallas_kernels.mla_decode import gpu, mla_decode  # noqa: E402
from zoo.pallas_kernels.mla_decode.ops import gpu_kernel, split_walk  # noqa: E402

HEADS, RANK, ROPE = 128, 512, 64  # HEADS: --heads
GQA_HEADS, GQA_KV_HEADS, GQA_DIM = 32, 8, 128


def inputs(batch, context):
    keys = jax.random.split(jax.random.key(0), 4)
    shapes = [(batch, HEADS, RANK), (batch, HEADS, ROPE), (batch, context, RANK), (batch, context, ROPE)]
    q_lat, q_pe, c, k_pe = (jax.random.normal(k, s, jnp.bfloat16) for k, s in zip(keys, shapes))
    return q_lat, q_pe, c, k_pe, jnp.full((batch,), context, jnp.int32)


def xla_decode(q_lat, q_pe, c, k_pe, lengths, *, scale):
    mask = jnp.arange(c.shape[1])[None, None, :] < lengths[:, None, None]
    return latent_attention(q_lat[:, None, :, None], q_pe[:, None], c[:, :, None], k_pe, mask, scale=scale)[:, 0, :, 0]


def traffic_bytes(batch, context):
    return 2 * batch * (context * (RANK + ROPE) + HEADS * (RANK + ROPE)) + 4 * batch * HEADS * RANK


def flops(batch, context):
    return 2 * batch * HEADS * context * (2 * RANK + ROPE)


def paged(c, k_pe, page):
    """The contiguous caches as a shuffled pool of pages and the block table that reads them back."""
    batch, context = c.shape[:2]
    pages = batch * context // page
    where = jax.random.permutation(jax.random.key(1), pages).astype(jnp.int32)  # pool page of each row page
    pool = lambda x: jnp.zeros((pages, page, x.shape[-1]), x.dtype).at[where].set(x.reshape(pages, page, -1))  # noqa: E731
    return pool(c), pool(k_pe), where.reshape(batch, context // page)


def measure(batch, context, repeats, **kernel_args):
    args = inputs(batch, context)
    scale = (RANK + ROPE) ** -0.5  # any scale: the timing does not depend on it
    ours = jax.jit(lambda *a: mla_decode(*a, scale=scale, impl="pallas", **kernel_args))
    seconds, capped = power_capped(time_jax, ours, *args, repeats=repeats)
    record = {"batch": batch, "context": context, "heads": HEADS, "rank": RANK, "rope": ROPE, "dtype": "bfloat16",
              "zoo_pallas_ms": 1e3 * seconds, "zoo_pallas_GBps": traffic_bytes(batch, context) / seconds / 1e9,
              "zoo_pallas_TFLOPs": flops(batch, context) / seconds / 1e12, "power_capped_fraction": capped,
              **kernel_args,
              "warps": gpu.WARPS, "stages": gpu.STAGES}
    return record, ours, args, scale


def gqa_measure(batch, context, repeats):
    """GQA decode over a full cache: zoo's kernel, its XLA form and cuDNN, and their agreement."""
    keys = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(keys[0], (batch, GQA_HEADS, GQA_DIM), jnp.bfloat16)
    k, v = (jax.random.normal(key, (batch, context, GQA_KV_HEADS, GQA_DIM), jnp.bfloat16) for key in keys[1:])
    positions = jnp.broadcast_to(jnp.arange(context, dtype=jnp.int32), (batch, context))
    segments, q_pos, q_seg = jnp.ones_like(positions), jnp.full((batch,), context - 1, jnp.int32), jnp.ones((batch,), jnp.int32)
    scale = GQA_DIM**-0.5
    traffic = 2 * k.nbytes + 2 * q.nbytes
    record = {"kernel": "gqa_decode", "batch": batch, "context": context, "heads": GQA_HEADS, "kv_heads": GQA_KV_HEADS,
              "head_dim": GQA_DIM, "dtype": "bfloat16", "warps": decode_gpu.WARPS, "stages": decode_gpu.STAGES}
    outputs = {}
    for name, impl in (("zoo_pallas", "pallas"), ("zoo_xla", "xla")):
        fn = jax.jit(lambda q, k, v, impl=impl: decode_attention(q, k, v, positions, segments, q_pos, q_seg, scale=scale,
                                                                 impl=impl))
        seconds = time_jax(fn, q, k, v, repeats=repeats)
        outputs[name] = fn(q, k, v).astype(jnp.float32)
        record.update({f"{name}_ms": 1e3 * seconds, f"{name}_GBps": traffic / seconds / 1e9})
    try:
        cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q[:, None], k, v, scale=scale,
                                                                     implementation="cudnn")[:, 0])
        seconds = time_jax(cudnn, q, k, v, repeats=repeats)
        outputs["cudnn"] = cudnn(q, k, v).astype(jnp.float32)
        record.update(cudnn_ms=1e3 * seconds, cudnn_GBps=traffic / seconds / 1e9)
    except Exception as error:  # noqa: BLE001 - cuDNN may refuse one query against many keys
        record["cudnn_error"] = f"{type(error).__name__}: {str(error)[:300]}"
    want = outputs["zoo_xla"]
    for name, got in outputs.items():
        if name != "zoo_xla":
            record[f"err_{name}_vs_xla"] = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    return record


def main():
    global HEADS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="64,128")
    parser.add_argument("--contexts", default="4096,8192,16384,32768")
    parser.add_argument("--heads", type=int, default=HEADS, help="MLA query heads (128: one GPU; 16: TP 8)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--splits", type=int, help="MLA splits of each row (default: the kernel's choice)")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--sweep-grid", default="32,64:32,64,128:4,8:2,3",
                        help="head_blocks:blocks:warps:stages, each a ','-list")
    parser.add_argument("--gqa-batches", default="8,64", help="GQA decode batches ('' skips GQA)")
    parser.add_argument("--gqa-only", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    HEADS = args.heads
    device = jax.devices()[0].device_kind
    ceiling = ceilings(args.repeats)
    print(f"{device}: copy {ceiling['copy_GBps']:.0f} GB/s, read {ceiling['read_GBps']:.0f} GB/s, bf16 matmul "
          f"{ceiling['matmul_bf16_TFLOPs']:.0f} TFLOP/s",
          flush=True)
    records = []

    def report(record):
        record.update(device=device, **ceiling)
        records.append(record)
        print(json.dumps(record), flush=True)
        if args.out:  # after every record: a call cut off at its time limit keeps what it measured
            with open(args.out, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)

    contexts = list(map(int, args.contexts.split(",")))
    if args.sweep and not args.gqa_only:
        defaults = gpu.WARPS, gpu.STAGES
        reference = None
        head_blocks, blocks, warps_, stages_ = (list(map(int, x.split(","))) for x in args.sweep_grid.split(":"))
        for head_block, block, warps, stages in itertools.product(head_blocks, blocks, warps_, stages_):
            gpu.WARPS, gpu.STAGES = warps, stages
            try:
                record, ours, inputs_, scale = measure(128, 8192, args.repeats, head_block=head_block, block=block)
            except Exception as error:  # noqa: BLE001 - a configuration Triton cannot compile is reported
                print(f"head_block {head_block} block {block} warps {warps} stages {stages}: {type(error).__name__}: "
                      f"{str(error)[:200]}", flush=True)
                continue
            if reference is None:
                reference = jax.jit(lambda *a: xla_decode(*a, scale=scale))(*inputs_).astype(jnp.float32)
            got = ours(*inputs_)
            record["err_pallas_vs_xla"] = float(jnp.max(jnp.abs(got - reference)) / jnp.max(jnp.abs(reference)))
            report(record)
            del inputs_, ours
        gpu.WARPS, gpu.STAGES = defaults
        del reference
    for batch, context in itertools.product(map(int, args.batches.split(",")) if not args.gqa_only else (), contexts):
        record, ours, inputs_, scale = measure(batch, context, args.repeats,
                                               **({"splits": args.splits} if args.splits else {}))
        xla = jax.jit(lambda *a: xla_decode(*a, scale=scale))
        xla_seconds = time_jax(xla, *inputs_, repeats=args.repeats)
        got, want = ours(*inputs_), xla(*inputs_).astype(jnp.float32)
        q_lat, q_pe, c, k_pe, lengths = inputs_
        record["kernel"] = "mosaic_gpu" if gpu_kernel(HEADS, RANK, ROPE, 64, jnp.bfloat16) == "mosaic_gpu" else "triton"
        if record["kernel"] == "mosaic_gpu" and "splits" not in record:
            record["splits"] = split_walk(batch, HEADS, RANK, ROPE, context // 64, 64, None, "mosaic_gpu")[0]
        if record["kernel"] == "mosaic_gpu":  # the Triton kernel on the same inputs
            triton = jax.jit(lambda *a: mla_decode(*a, scale=scale, impl="pallas", platform="gpu"))
            triton_seconds = time_jax(triton, *inputs_, repeats=args.repeats)
            record.update(zoo_triton_ms=1e3 * triton_seconds,
                          zoo_triton_GBps=traffic_bytes(batch, context) / triton_seconds / 1e9,
                          err_triton_vs_xla=float(jnp.max(jnp.abs(triton(*inputs_) - want)) / jnp.max(jnp.abs(want))))
        c_pool, pe_pool, table = paged(c, k_pe, 64)
        paged_decode = jax.jit(lambda *a: mla_decode(*a[:5], scale=scale, block_table=a[5], impl="pallas",
                                                     **({"splits": args.splits} if args.splits else {})))
        paged_seconds = time_jax(paged_decode, q_lat, q_pe, c_pool, pe_pool, lengths, table, repeats=args.repeats)
        got_paged = paged_decode(q_lat, q_pe, c_pool, pe_pool, lengths, table)
        # Every page of a row read from its first one: the reads hit L2, so this times the kernel's compute
        one_page = jnp.broadcast_to(table[:, :1], table.shape)
        record["zoo_l2_resident_ms"] = 1e3 * time_jax(paged_decode, q_lat, q_pe, c_pool, pe_pool, lengths, one_page,
                                                      repeats=args.repeats)
        del c_pool, pe_pool
        record.update(zoo_paged_ms=1e3 * paged_seconds,
                      zoo_paged_GBps=traffic_bytes(batch, context) / paged_seconds / 1e9,
                      paged_equals_contiguous=bool(jnp.array_equal(got_paged, got)), zoo_xla_ms=1e3 * xla_seconds,
                      zoo_xla_GBps=traffic_bytes(batch, context) / xla_seconds / 1e9,
                      fraction_of_copy=record["zoo_pallas_GBps"] / ceiling["copy_GBps"],
                      fraction_of_read=record["zoo_pallas_GBps"] / ceiling["read_GBps"],
                      err_pallas_vs_xla=float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))))
        report(record)
        del inputs_
    for batch, context in itertools.product([int(b) for b in args.gqa_batches.split(",") if b], contexts):
        record = gqa_measure(batch, context, args.repeats)
        record.update(fraction_of_copy=record["zoo_pallas_GBps"] / ceiling["copy_GBps"],
                      fraction_of_read=record["zoo_pallas_GBps"] / ceiling["read_GBps"])
        report(record)


if __name__ == "__main__":
    main()
