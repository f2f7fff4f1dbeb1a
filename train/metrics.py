"""Run metrics: one JSON record per line in RUN/metrics.jsonl (appended across resumes), the same
scalars as TensorBoard event files in RUN/tensorboard/, and a PNG loss curve drawn from the JSONL.
Only process 0 writes."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._file = self.path.open("a", encoding="utf-8")
            self._writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, kind: str, step: int, values: dict) -> None:
        """kind: "train", "eval" or "event"; numeric values also go to TensorBoard as kind/name."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._writer.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._writer.close()


def read_records(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss_curve(run_dir: str | Path) -> Path | None:
    """RUN/loss_curve.png: training loss per step (and its running mean) with held-out loss points.
    The latest record for a step wins, so a resumed run's curve has no duplicates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(Path(run_dir) / "metrics.jsonl")
    train = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    held = {r["step"]: r["loss"] for r in records if r["kind"] == "eval"}
    if not train:
        return None
    steps = sorted(train)
    losses = [train[s] for s in steps]
    window = max(1, len(steps) // 50)
    smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
              for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train (per step)")
    ax.plot(steps, smooth, color="tab:blue", linewidth=1.5, label=f"train (mean of {window})")
    if held:
        ax.plot(sorted(held), [held[s] for s in sorted(held)], "o-", color="tab:red", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / "loss_curve.png"
    fig.savefig(out)
    plt.close(fig)
    return out
