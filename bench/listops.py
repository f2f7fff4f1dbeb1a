"""S4D against a small transformer on ListOps at Long Range Arena's settings (train/listops.py: 500-2000 tokens,
depth 10, 10 arguments; 96,000 training, 2,000 validation and 2,000 test expressions), both as zoo.classifier
models trained the same way (AdamW, warmup + cosine, batch 32, mean pooling). One JSON line per evaluation to
--out: validation accuracy as training goes, then test accuracy at the end.

    python bench/listops.py --data listops.npz --model s4d --lr 1e-2 --seconds 300 --out listops.jsonl

The splits are drawn once into --data (an .npz) and reused by every later run; `--draw-only` stops there."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

from zoo.config import LayerConfig, ModelConfig
from zoo.layers.attention import AttentionConfig
from zoo.layers.s4d import S4DConfig
from zoo.train.listops import VOCAB, accuracy, make_split, train_classifier

SPLIT_SEEDS = {"train": 0, "valid": 1, "test": 2}


def model_config(name: str, max_len: int, convolution: str = "fft", chunk: int = 16) -> ModelConfig:
    if name == "s4d":  # the S4 LRA ListOps model's shape: 8 layers of 128 channels, state 64, GLU out, no MLP
        layer = LayerConfig("s4d", S4DConfig(state_dim=64, chunk_size=chunk, convolution=convolution), mlp=False)
        return ModelConfig(vocab_size=len(VOCAB), d_model=128, mlp_hidden=0, layers=(layer,) * 8, max_seq_len=max_len)
    if name == "transformer":  # 4 layers of 4 heads x 32 (RoPE), MLP 512
        layer = LayerConfig("attention", AttentionConfig(4, 4, 32))
        return ModelConfig(vocab_size=len(VOCAB), d_model=128, mlp_hidden=512, layers=(layer,) * 4, max_seq_len=max_len)
    raise ValueError(f"unknown model {name!r}; known: s4d, transformer")


def load_splits(path: Path, rows: dict[str, int], min_length: int, max_length: int) -> dict[str, dict[str, np.ndarray]]:
    if path.exists():
        data = np.load(path)
        return {name: {"inputs": data[f"{name}_inputs"], "labels": data[f"{name}_labels"]} for name in SPLIT_SEEDS}
    splits = {name: make_split(seed, rows[name], min_length=min_length, max_length=max_length, progress=True)
              for name, seed in SPLIT_SEEDS.items()}
    tmp = path.with_suffix(".partial.npz")
    np.savez(tmp, **{f"{name}_{k}": v for name, split in splits.items() for k, v in split.items()})
    tmp.rename(path)  # whole or absent: a later run never reads a half-written file
    return splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help=".npz of the splits (drawn if missing)")
    parser.add_argument("--min-length", type=int, default=500)
    parser.add_argument("--max-length", type=int, default=2000)
    parser.add_argument("--rows", default="96000,2000,2000", help="train, valid, test rows (LRA's sizes)")
    parser.add_argument("--draw-only", action="store_true")
    parser.add_argument("--model", choices=("s4d", "transformer"), default="s4d")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30_000, help="at most; --seconds may shorten the run")
    parser.add_argument("--seconds", type=float, default=None, help="end training in about this time")
    parser.add_argument("--every", type=int, default=1000, help="validation accuracy every this many steps")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype (weights stay float32)")
    parser.add_argument("--convolution", choices=("fft", "chunked"), default="fft",
                        help="S4D's training form: fft (one expression per row, as in the reference) or chunked")
    parser.add_argument("--chunk", type=int, default=16, help="S4D's chunk length in the chunked form")
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = dict(zip(SPLIT_SEEDS, (int(n) for n in args.rows.split(","))))
    splits = load_splits(args.data, rows, args.min_length, args.max_length)
    if args.draw_only:
        return
    if not args.out:
        parser.error("--out is needed to train")
    config = model_config(args.model, args.max_length, args.convolution, args.chunk).replace(dtype=args.dtype)
    s4d_form = (args.convolution if args.convolution == "fft" else f"chunked {args.chunk}") if args.model == "s4d" else None
    base = {"model": args.model, "s4d_form": s4d_form, "lr": args.lr, "batch": args.batch,
            "dtype": args.dtype, "device": jax.devices()[0].device_kind}
    started = time.perf_counter()

    def write(row):
        row = {**base, **row, "seconds": round(time.perf_counter() - started, 1)}
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as out:
            out.write(json.dumps(row) + "\n")

    def validate(step, params, loss):
        write({"step": step, "train_loss": round(loss, 4), "valid_accuracy": accuracy(config, params, splits["valid"])})

    params, steps = train_classifier(config, splits["train"], steps=args.steps, seconds=args.seconds,
                                     batch_size=args.batch, learning_rate=args.lr, every=args.every,
                                     callback=validate, progress=False)
    write({"step": steps, "final": True, "valid_accuracy": accuracy(config, params, splits["valid"]),
           "test_accuracy": accuracy(config, params, splits["test"]),
           "params": sum(leaf.size for leaf in jax.tree.leaves(params)),
           "epochs": round(steps * args.batch / len(splits["train"]["labels"]), 2)})


if __name__ == "__main__":
    main()
