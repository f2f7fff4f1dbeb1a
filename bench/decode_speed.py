"""Generation speed of zoo presets on one GPU: prefill and decode tokens/s at a long context, and the decode
cache's bytes, e.g. an MLA model against the same-size GQA model (issue: MLA vs GQA at 32K).

    python bench/decode_speed.py --presets gqa-125m,mla-125m --context 32768 --batch 8 --new-tokens 64

Each preset runs in bf16 (random weights: speed does not depend on them) through zoo.generate.Generator, the
path `zoo generate` takes, with kernel_impl "auto" (Pallas on GPUs: flash attention for the prefill, the MLA
and GQA decode kernels for the decode) and, with --also-xla, "xla" (at 32K its dense prefill needs ~400 GB). A row's prompt is `context - new_tokens` tokens.
Prefill time = a call generating 1 token; decode tokens/s = batch * (new_tokens - 1) / (time of the call
generating new_tokens - prefill time). Medians of --repeats calls after one untimed (compiling) call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from zoo.generate import Generator, Sampling
from zoo.model import cache_bytes, init_cache, init_params
from zoo.presets import get_preset


def timed(fn, repeats):
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure(preset, impl, context, batch, new_tokens, repeats):
    config = get_preset(preset).replace(max_seq_len=context, dtype="bfloat16")
    if impl != "auto":
        config = config.with_kernel_impl(impl)
    params = init_params(config, jax.random.key(0))
    generator = Generator(config, params)
    prompt_len = context - new_tokens
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, config.vocab_size, prompt_len).tolist() for _ in range(batch)]
    greedy = Sampling(temperature=0.0)
    prefill_s = timed(lambda: generator(prompts, 1, greedy), repeats)
    total_s = timed(lambda: generator(prompts, new_tokens, greedy), repeats)
    decode_s = total_s - prefill_s
    cache = jax.eval_shape(lambda: init_cache(config, batch, context))
    return {"preset": preset, "impl": impl, "context": context, "batch": batch, "new_tokens": new_tokens,
            "prefill_s": prefill_s, "prefill_tokens_per_s": batch * prompt_len / prefill_s,
            "decode_tokens_per_s": batch * (new_tokens - 1) / decode_s,
            "decode_ms_per_step": 1e3 * decode_s / (new_tokens - 1),
            "cache_bytes": cache_bytes(cache), "device": jax.devices()[0].device_kind}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="gqa-125m,mla-125m")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--also-xla", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    records = []
    for preset in args.presets.split(","):
        for impl in ("auto", "xla") if args.also_xla else ("auto",):
            record = measure(preset, impl, args.context, args.batch, args.new_tokens, args.repeats)
            records.append(record)
            print(json.dumps(record), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


if __name__ == "__main__":
    main()
