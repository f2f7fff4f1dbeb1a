"""Incremental distillation against one-shot replacement (issue 9): held-out perplexity against the fraction of
attention layers replaced.

- incremental: `zoo.train.incremental` with --per-round layers a round, least important first, up to --target-ratio;
- one-shot: for each fraction the incremental run reached (k of n layers), the k layers chosen uniformly
  (evenly spaced) replaced at once and distilled with k times the per-round steps, so both runs spend the same
  tokens to reach k replaced layers.
Writes incremental_vs_oneshot.json and .png to --out (runs in --out/incremental and --out/oneshot_K).

    python bench/incremental_distill.py --teacher runs/teacher --data input.txt --seq-len 512 \\
        --stage-steps 50,50,200 --target-ratio 0.5 --out runs/incremental-bench
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

from zoo.train.data import DataConfig
from zoo.train.distill import DistillConfig, distill
from zoo.recurrent_init import full_attention_layers
from zoo.train.incremental import IncrementalConfig, distill_incrementally
from zoo.train.optim import OptimConfig


def uniform_layers(candidates: list[int], k: int) -> list[int]:
    n = len(candidates)
    return [candidates[int((j + 1) * n / k) - 1] for j in range(k)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--stages", default="mixer,block,kl")
    parser.add_argument("--stage-steps", default="50,50,200", help="per round (one-shot: times the layers replaced)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--target-ratio", type=float, default=0.5)
    parser.add_argument("--per-round", type=int, default=1)
    parser.add_argument("--replace-with", default="M")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    steps = tuple(int(s) for s in args.stage_steps.split(","))
    base = DistillConfig(teacher=args.teacher, stages=tuple(args.stages.split(",")), stage_steps=steps,
                         batch_size=args.batch_size, eval_every=10_000, checkpoint_every=10_000, log_every=50,
                         data=DataConfig(source=args.data, seq_len=args.seq_len),
                         optim=OptimConfig(learning_rate=args.lr, warmup_steps=20))
    state = distill_incrementally(base, IncrementalConfig(target_ratio=args.target_ratio, per_round=args.per_round,
                                                                   letter=args.replace_with),
                                  out / "incremental")
    from zoo.train.checkpoint import load_model

    candidates = full_attention_layers(load_model(args.teacher).config)
    rows = [{"method": "incremental", "student_layers": r["summary"]["student_layers"], "layers": len(
        [i for rr in state["rounds"][:r["round"]] for i in rr["replaced"]]), "fraction": r["fraction_replaced"],
             "perplexity": math.exp(r["summary"]["student_heldout_ce"]),
             "teacher_perplexity": math.exp(r["summary"]["teacher_heldout_ce"])} for r in state["rounds"]]
    for row in list(rows):
        k = row["layers"]
        chosen = uniform_layers(candidates, k)
        n_layers = len(row["student_layers"])
        pattern = "".join(args.replace_with if i in chosen else "A" for i in range(n_layers))
        config = dataclasses.replace(base, student_pattern=pattern, stage_steps=tuple(k * s for s in steps))
        summary = distill(config, out / f"oneshot_{k}")
        rows.append({"method": "one-shot (uniform)", "student_layers": summary["student_layers"], "layers": k,
                     "fraction": k / len(candidates), "perplexity": math.exp(summary["student_heldout_ce"]),
                     "teacher_perplexity": math.exp(summary["teacher_heldout_ce"])})
    (out / "incremental_vs_oneshot.json").write_text(json.dumps(rows, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in ("incremental", "one-shot (uniform)"):
        points = sorted((r["fraction"], r["perplexity"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*points), marker="o", label=method)
    ax.axhline(rows[0]["teacher_perplexity"], color="gray", linestyle="--", label="teacher")
    ax.set_xlabel("fraction of attention layers replaced")
    ax.set_ylabel("held-out perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "incremental_vs_oneshot.png", dpi=120)
    for r in rows:
        print(f"{r['method']:>20}  {r['fraction']:.2f}  {r['perplexity']:.3f}")


if __name__ == "__main__":
    main()
