"""Logit error of GQA -> MLA conversion (zoo.mla_conversion) as a function of latent rank, before any training.

    python bench/mla_conversion.py RUN_OR_HF_DIR --data ../shared/data/tinyshakespeare/input.txt \
        --ranks 0,48,32,16,8 --rope-pairs 2,4 --keep high,norm --out bench/results/mla_conversion.jsonl

The scored text is the last `--holdout` fraction of `--data` (default all of it: give a file the teacher never
trained on, e.g. Penn Treebank's test split for a teacher trained on its other splits), cut into `--windows`
windows of `--seq-len` tokens. For each RoPE setting and rank: the largest
logit difference relative to the largest teacher logit, the mean KL(teacher || converted) in nats per token,
both models' perplexity, and the decode cache per token and layer (values) against the source's 2 * KV * Dh.
Rank 0 is full rank, where the only error left is the RoPE pairs that lose their rotation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from zoo.mla_conversion import MLAConversion, convert_model
from zoo.model import DecoderLM
from zoo.train.checkpoint import load_model


def held_out_windows(path: Path, tokenizer, holdout: float, seq_len: int, windows: int) -> np.ndarray:
    text = path.read_text(encoding="utf-8")
    ids = np.asarray(tokenizer.encode(text[int(len(text) * (1 - holdout)):]), np.int32)
    count = min(windows, (len(ids) - 1) // seq_len)
    if count < 1:
        raise ValueError(f"{path}: the held-out part has fewer than {seq_len + 1} tokens")
    return ids[: count * seq_len].reshape(count, seq_len)


def scores(config, params, ids, batch: int):
    """Logits (float32, on host) over all windows, in batches."""
    apply = jax.jit(lambda p, x: DecoderLM(config).apply({"params": p}, x)[0])
    return np.concatenate([np.asarray(apply(params, ids[i:i + batch])) for i in range(0, len(ids), batch)])


def perplexity(logits, ids) -> float:
    logp = jax.nn.log_softmax(jnp.asarray(logits[:, :-1]), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.asarray(ids[:, 1:, None]), axis=-1)
    return float(jnp.exp(jnp.mean(nll)))


def kl(teacher, student) -> float:
    p = jax.nn.log_softmax(jnp.asarray(teacher), axis=-1)
    q = jax.nn.log_softmax(jnp.asarray(student), axis=-1)
    return float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), axis=-1)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--holdout", type=float, default=1.0, help="the fraction of the file (its end) to score")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ranks", default="0,48,32,16,8")
    parser.add_argument("--rope-pairs", default="2,4")
    parser.add_argument("--keep", default="high,norm")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    teacher = load_model(args.checkpoint)
    config = teacher.config.with_kernel_impl("xla")
    ids = held_out_windows(args.data, teacher.tokenizer, args.holdout, args.seq_len, args.windows)
    reference = scores(config, teacher.params, ids, args.batch)
    base = {"checkpoint": str(args.checkpoint), "data": args.data.name, "tokens": int(ids.size),
            "seq_len": args.seq_len, "device": jax.devices()[0].device_kind, "teacher_ppl": perplexity(reference, ids)}
    print(f"teacher perplexity {base['teacher_ppl']:.3f} on {ids.size} held-out tokens of {args.data.name}")
    print("| RoPE pairs kept | keep | rank | K/V energy kept | cache / token / layer | rel. logit error | "
          "KL nats/token | ppl |")
    print("|---|---|---|---|---|---|---|---|")
    records = []
    for pairs in (int(p) for p in args.rope_pairs.split(",")):
        for keep in args.keep.split(","):
            for rank in (int(r) for r in args.ranks.split(",")):
                mla_config, mla_params, reports = convert_model(
                    config, teacher.params, MLAConversion(rank=rank or None, rope_pairs=pairs, keep=keep))
                converted = scores(mla_config, mla_params, ids, args.batch)
                record = {**base, "rope_pairs": pairs, "keep": keep, "rank": reports[0]["rank"],
                          "full_rank": reports[0]["full_rank"],
                          "kv_energy_kept": float(np.mean([r["kv_energy_kept"] for r in reports])),
                          "cache_per_token": reports[0]["cache_per_token"],
                          "source_cache_per_token": reports[0]["source_cache_per_token"],
                          "rel_logit_error": float(np.max(np.abs(converted - reference)) / np.max(np.abs(reference))),
                          "kl": kl(reference, converted), "ppl": perplexity(converted, ids)}
                records.append(record)
                print(f"| {pairs} | {keep} | {record['rank']}{' (full)' if record['rank'] == record['full_rank'] else ''} "
                      f"| {record['kv_energy_kept']:.4f} | {record['cache_per_token']} (was "
                      f"{record['source_cache_per_token']}) | {record['rel_logit_error']:.4f} | {record['kl']:.4f} | "
                      f"{record['ppl']:.3f} |", flush=True)
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in records))


if __name__ == "__main__":
    main()
