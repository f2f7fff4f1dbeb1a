"""`zoo demo`: train a tiny byte-level model on the embedded default corpus (the Python standard
library's source) with the training loop of `zoo train`, then generate a sample from it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zoo.generate import Generator, Sampling
from zoo.train.checkpoint import load_model
from zoo.train.config import TrainConfig
from zoo.train.trainer import train


@dataclass(frozen=True)
class DemoSettings:
    preset: str = "gqa-tiny"
    steps: int = 600
    batch_size: int = 32
    seq_len: int = 128
    learning_rate: float = 3e-3
    eval_rows: int = 128
    seed: int = 0
    prompt: str = "def "
    sample_tokens: int = 200

    def train_config(self) -> TrainConfig:
        return TrainConfig().with_overrides([
            f"preset={self.preset}", f"steps={self.steps}", f"batch_size={self.batch_size}", f"seed={self.seed}",
            f"data.seq_len={self.seq_len}", f"data.max_eval_rows={self.eval_rows}", "data.source=stdlib",
            f"optim.learning_rate={self.learning_rate}", f"eval_every={max(1, self.steps // 3)}",
            f"checkpoint_every={self.steps}",
        ])


def run_demo(settings: DemoSettings, out_dir: str | Path, log=print) -> dict:
    result = train(settings.train_config(), out_dir, log=log)
    log(f"held-out loss: {result.initial_heldout_loss:.3f} -> {result.heldout_loss:.3f} nats/byte "
        f"({result.heldout_loss / 0.6931471805599453:.3f} bits/byte); loss curve: {result.run_dir / 'loss_curve.png'}")

    config, params, tokenizer = load_model(result.checkpoint)[:3]
    generator = Generator(config, params, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    sample = generator([tokenizer.encode(settings.prompt)], settings.sample_tokens,
                       Sampling(temperature=0.8, top_k=40), seed=settings.seed)[0]
    text = settings.prompt + tokenizer.decode(sample)
    log("sample (temperature 0.8, top-k 40):\n" + text)
    return {"initial_loss": result.initial_heldout_loss, "heldout_loss": result.heldout_loss,
            "checkpoint": str(result.checkpoint), "sample": text}
