"""The DuoAttention report's table (issue 9) from a `zoo eval --tasks passkey,speed` output folder of a teacher and
its `zoo convert --duo` conversions (bench/duo_report.sh): per model, the share of KV heads that keep the whole
context, passkey accuracy at each length (all depths), agreement with the first model (the teacher) key by key,
and the decode cache and decode speed at each context. Markdown on stdout.

    python bench/duo_table.py runs/duo-report/eval [--heads runs/duo-report]

--heads: the folder holding the conversions (duo-F/duo_heads.json); without it the eval folders are searched.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def heads_file(model_dir: Path, checkpoint: str, heads_root: Path | None) -> Path | None:
    for candidate in ([heads_root / Path(checkpoint).name] if heads_root else []) + [model_dir]:
        if (candidate / "duo_heads.json").is_file():
            return candidate / "duo_heads.json"
    return None


def retrieval_share(path: Path | None) -> str:
    if path is None:
        return "all (full attention)"
    heads = json.loads(path.read_text())
    return f"{heads['retrieval_kv_heads']} / {heads['kv_heads']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("eval_dir", type=Path)
    parser.add_argument("--heads", type=Path, default=None)
    args = parser.parse_args()
    models = sorted(p for p in args.eval_dir.iterdir() if (p / "passkey.json").is_file())
    if not models:
        raise SystemExit(f"no passkey.json under {args.eval_dir}")
    rows, teacher_cells = [], None
    for model_dir in models:
        passkey = json.loads((model_dir / "passkey.json").read_text())
        speed = json.loads((model_dir / "speed.json").read_text())
        cells = {(r["length"], r["depth"]): r["accuracy"] for r in passkey["results"]}
        teacher_cells = teacher_cells or cells
        lengths = sorted({length for length, _ in cells})
        accuracy = {n: sum(a for (length, _), a in cells.items() if length == n) /
                    sum(1 for length, _ in cells if length == n) for n in lengths}
        agreement = 1 - sum(abs(cells[k] - teacher_cells[k]) for k in cells) / len(cells)
        rows.append((Path(passkey["checkpoint"]).name,
                     retrieval_share(heads_file(model_dir, passkey["checkpoint"], args.heads)),
                     accuracy, agreement, {r["context"]: r for r in speed["results"]}, speed["device"]))
    lengths = sorted(rows[0][2])
    contexts = sorted(rows[0][4])
    print(f"Device: {rows[0][5]}; passkey: keys retrieved by greedy decoding, mean over depths; agreement: "
          f"1 - mean |accuracy - {rows[0][0]}'s| over (length, depth) cells.\n")
    print("| model | retrieval KV heads | " + " | ".join(f"passkey {n}" for n in lengths) + " | agreement | "
          + " | ".join(f"cache MiB {c}" for c in contexts) + " | " + " | ".join(f"decode tok/s {c}" for c in contexts) + " |")
    print("|---" * (3 + len(lengths) + 2 * len(contexts)) + "|")
    for name, share, accuracy, agreement, speed, _ in rows:
        print(f"| {name} | {share} | " + " | ".join(f"{accuracy[n]:.2f}" for n in lengths) + f" | {agreement:.2f} | "
              + " | ".join(f"{speed[c]['cache_bytes'] / 2**20:.1f}" for c in contexts) + " | "
              + " | ".join(f"{speed[c]['decode_tokens_per_s']:,.0f}" for c in contexts) + " |")


if __name__ == "__main__":
    main()
