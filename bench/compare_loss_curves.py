"""Two training runs' loss curves side by side (e.g. the same run with kernel_impl=xla and =pallas).

    python bench/compare_loss_curves.py RUN_A/metrics.jsonl RUN_B/metrics.jsonl [--out result.json]

Prints the per-step train losses, their largest and mean absolute difference, each run's held-out
losses and its median loop tokens/s after step 10 (compilation and warm-up excluded); the numbers go
to --out as JSON as well.
"""

from __future__ import annotations

import argparse
import json
import statistics

from zoo.train.metrics import read_records


def losses(path, kind, key):
    return {r["step"]: r[key] for r in read_records(path) if r.get("kind") == kind and key in r}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--out")
    args = parser.parse_args()
    train_a, train_b = losses(args.a, "train", "loss"), losses(args.b, "train", "loss")
    steps = sorted(set(train_a) & set(train_b))
    diffs = [abs(train_a[s] - train_b[s]) for s in steps]
    for s in steps:
        print(f"step {s:5d}  {train_a[s]:.4f}  {train_b[s]:.4f}  diff {train_a[s] - train_b[s]:+.4f}")
    result = {
        "steps": len(steps), "max_abs_diff": max(diffs), "mean_abs_diff": statistics.fmean(diffs),
        "final_train": [train_a[steps[-1]], train_b[steps[-1]]],
        "heldout_a": losses(args.a, "eval", "loss"), "heldout_b": losses(args.b, "eval", "loss"),
        "median_tokens_per_s": [statistics.median(v for s, v in losses(path, "train", "tokens_per_s").items() if s > 10)
                                for path in (args.a, args.b)],
    }
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
