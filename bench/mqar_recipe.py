"""How fast small models learn MQAR (train/synthetic.py): accuracy by pair count as training goes, for attention
and recurrent models and several learning rates. Finds the cheapest recipe for tests/test_mqar.py and shows the
recall gap (Zoology, Arora et al. 2023). One JSON line per (model, lr, checkpoint) to --out.

    python bench/mqar_recipe.py --steps 3000 --every 500 --out mqar_recipe.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

import jax

from zoo.config import LayerConfig, ModelConfig
from zoo.layers.attention import AttentionConfig
from zoo.layers.gated_deltanet import GatedDeltaNetConfig
from zoo.layers.mamba2 import Mamba2Config
from zoo.train.synthetic import mqar_accuracy, train_mqar


def mixer(kind: str, d_model: int) -> LayerConfig:
    if kind == "attention":
        return LayerConfig("attention", AttentionConfig(d_model // 16, d_model // 16, 16))
    if kind == "gated_deltanet":  # one head of key width 8: an 8 x 16 state a layer
        return LayerConfig("gated_deltanet", GatedDeltaNetConfig(num_heads=1, head_dim=8, chunk_size=32))
    if kind == "mamba2":  # state 8 per channel
        return LayerConfig("mamba2", Mamba2Config(num_heads=2, head_dim=16, state_dim=8, num_groups=1, chunk_size=32))
    raise ValueError(f"unknown layer kind {kind!r}")


def model(kinds: str, d_model: int, vocab: int, max_seq_len: int) -> ModelConfig:
    """kinds: one layer kind for both layers ("attention"), or two joined by "+" ("mamba2+attention")."""
    first, _, second = kinds.partition("+")
    return ModelConfig(vocab_size=vocab, d_model=d_model, mlp_hidden=2 * d_model,
                       layers=(mixer(first, d_model), mixer(second or first, d_model)), max_seq_len=max_seq_len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="attention,mamba2+attention,gated_deltanet,mamba2",
                        help="two-layer models: a layer kind for both layers, or FIRST+SECOND")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--train-pairs", default="2,4,8,16")
    parser.add_argument("--eval-pairs", default="2,4,8,16,32")
    parser.add_argument("--lrs", default="1e-3,3e-3,1e-2")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    train_pairs = tuple(int(p) for p in args.train_pairs.split(","))
    eval_pairs = [int(p) for p in args.eval_pairs.split(",")]
    length = 4 * max(eval_pairs)
    with open(args.out, "a") as out:
        for kind in args.models.split(","):
            config = model(kind, args.d_model, args.vocab, length)
            for lr in (float(x) for x in args.lrs.split(",")):
                started = time.perf_counter()

                def report(step, params, kind=kind, lr=lr, config=config, started=started):
                    row = {"model": kind, "d_model": args.d_model, "vocab": args.vocab, "lr": lr, "batch": args.batch,
                           "train_pairs": list(train_pairs), "step": step, "seconds": round(time.perf_counter() - started, 1),
                           "device": jax.devices()[0].device_kind,
                           "accuracy": {p: round(mqar_accuracy(config, params, p), 4) for p in eval_pairs}}
                    print(json.dumps(row), flush=True)
                    out.write(json.dumps(row) + "\n")
                    out.flush()

                train_mqar(config, pair_counts=train_pairs, steps=args.steps, batch_size=args.batch, learning_rate=lr,
                           progress=False, every=args.every, callback=report)


if __name__ == "__main__":
    main()
