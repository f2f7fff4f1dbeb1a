"""The teacher -> students table from `zoo distill` runs' distill_summary.json files (Markdown on stdout).

    python bench/distill_table.py runs/*/distill_summary.json

Each row's teacher is the one it was distilled from (a table may gather runs whose teachers were trained apart).
Perplexities are exp(held-out cross-entropy) on the held-out rows of the distillation data (the tail `zoo train`
held out of the same source, which the teacher never trained on); retained = teacher perplexity / student
perplexity; decode state = one sequence's cache at a 32K context (attention KV in bfloat16, recurrent state in
float32); minutes = the distillation's wall-clock time (compiles and the held-out evaluations included; a
run resumed part-way counts only what ran after the resume).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main(paths: list[str]) -> None:
    summaries = [(Path(p), json.loads(Path(p).read_text())) for p in paths]
    if not summaries:
        raise SystemExit("no summaries given")
    first = summaries[0][1]
    print("| model | layers | held-out ppl | its teacher's ppl | retained | tokens per stage | minutes | "
          "decode state @32K |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| teacher ({first['teacher_params']:,} params) | {len(first['student_layers'])} x attention | "
          f"see each row | - | - | - | - | {mib(first['teacher_state_bytes_32k'])} |")
    for path, s in summaries:
        mixers = {}
        for mixer in s["student_layers"]:
            mixers[mixer] = mixers.get(mixer, 0) + 1
        layout = ", ".join(f"{n} {m}" for m, n in mixers.items())
        stages = ", ".join(f"{st['stage']} {st['tokens'] / 1e6:.2f}M" for st in s["stages"])
        at_init = math.exp(s["student_heldout_ce_at_init"])
        name = path.parent.name if path.name == "distill_summary.json" else path.stem
        seconds = [st.get("seconds") for st in s["stages"]]
        minutes = f"{sum(seconds) / 60:.1f}" if seconds and None not in seconds else "-"
        print(f"| {name} ({s['student_params']:,} params) | {layout} | "
              f"{math.exp(s['student_heldout_ce']):.3f} (at init {at_init:,.1f}) | "
              f"{math.exp(s['teacher_heldout_ce']):.3f} | {s['retained']:.1%} | {stages} | {minutes} | "
              f"{mib(s['student_state_bytes_32k'])} |")


if __name__ == "__main__":
    main(sys.argv[1:])
