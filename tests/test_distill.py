"""Staged distillation (zoo.train.distill) end to end at tiny size on CPU: a teacher checkpoint, a hybrid student
whose stages each lower their loss, a loadable student checkpoint, a bit-exact resume, an MLA student, and the whole
pipeline (zoo train -> zoo distill -> zoo generate) from the command line."""

from __future__ import annotations

import json
import math
import shutil

import jax
import numpy as np
import pytest
from inputs import saved_model

from zoo.cli import main as zoo_main
from zoo.config import LayerConfig, ModelConfig
from zoo.errors import ConfigError
from zoo.layers.attention import AttentionConfig
from zoo.tokenizer import ByteTokenizer
from zoo.train.checkpoint import load_model
from zoo.train.data import DataConfig
from zoo.train.distill import DistillConfig, build_student, distill
from zoo.train.metrics import read_records
from zoo.train.optim import OptimConfig


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A 2-layer GQA teacher saved as a zoo checkpoint (random weights: distillation only needs a function)."""
    layer = LayerConfig("attention", AttentionConfig(4, 2, 8))
    config = ModelConfig(vocab_size=ByteTokenizer.padded_vocab_size, d_model=32, mlp_hidden=64, layers=(layer,) * 2,
                         max_seq_len=64)
    return saved_model(tmp_path_factory.mktemp("teacher"), config, step=1, seed=7)


def settings(teacher, **changes):
    base = dict(teacher=str(teacher), student_pattern="AG", stages=("mixer", "block", "kl"), stage_steps=(6, 6, 6),
                batch_size=4, mesh="data=1", log_every=1, eval_every=100, checkpoint_every=3,
                data=DataConfig(seq_len=32, max_eval_rows=8), optim=OptimConfig(learning_rate=1e-2, warmup_steps=0))
    return DistillConfig(**{**base, **changes})


@pytest.mark.slow  # ~100 s on 2 cores; the command-line test below runs two of the stages in CI
def test_stages_lower_their_losses_and_resume_bit_exactly(teacher, tmp_path):
    config = settings(teacher)
    summary = distill(config, tmp_path / "run", log=lambda *_: None, progress=False)
    records = [r for r in read_records(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    for stage in config.stages:
        losses = [r["loss"] for r in records if r["stage"] == stage]
        assert len(losses) == 6 and np.mean(losses[-2:]) < np.mean(losses[:2]), (stage, losses)
    assert [s["stage"] for s in summary["stages"]] == ["mixer", "block", "kl"]
    assert summary["student_layers"] == ["attention", "gated_deltanet"]
    assert summary["student_state_bytes_32k"] < summary["teacher_state_bytes_32k"]
    final = load_model(tmp_path / "run")
    assert final.step == 18 and final.config.layers[1].mixer == "gated_deltanet"

    # Resume from the checkpoint at the block -> kl boundary (step 12): the kl stage re-runs with a fresh
    # optimizer from the saved data position, to the same parameters bit for bit.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run", resumed)
    for step in (15, 18):
        shutil.rmtree(resumed / "checkpoints" / str(step))
    distill(config, resumed, log=lambda *_: None, progress=False)
    again = load_model(resumed)
    assert again.step == 18
    jax.tree.map(np.testing.assert_array_equal, again.params, final.params)


def test_the_whole_pipeline_from_the_command_line(tmp_path, rng):
    """`zoo train` a teacher, `zoo distill` it into an attention + mLSTM hybrid, generate from the student."""
    teacher_dir, out, corpus = str(tmp_path / "teacher"), tmp_path / "student", tmp_path / "corpus.txt"
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "it"]
    corpus.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(400)))  # ~20 KB: quick to pack
    assert zoo_main(["train", "--preset", "gqa-tiny", "--data", str(corpus), "--steps", "2", "--batch-size", "8",
                     "--seq-len", "32", "--mesh", "data=1", "--out", teacher_dir, "--set", "data.max_eval_rows=8"]) == 0
    assert zoo_main(["distill", "--teacher", teacher_dir, "--data", str(corpus), "--student-pattern", "AX",
                     "--stages", "mixer,kl", "--stage-steps", "2,2", "--seq-len", "32", "--batch-size", "4",
                     "--mesh", "data=1", "--out", str(out), "--log-every", "1"]) == 0
    summary = json.loads((out / "distill_summary.json").read_text())
    assert summary["student_layers"] == ["attention", "mlstm"] * 2
    assert [s["stage"] for s in summary["stages"]] == ["mixer", "kl"]
    assert all(s["tokens"] == 2 * 4 * 32 and s["seconds"] > 0 for s in summary["stages"])
    assert math.isfinite(summary["student_heldout_ce"]) and summary["student_state_bytes_32k"] < summary[
        "teacher_state_bytes_32k"]
    assert zoo_main(["generate", str(out), "--prompt", "to be", "--max-new-tokens", "4"]) == 0


def test_mla_student(teacher):
    loaded = load_model(teacher)
    config, params, replaced = build_student(settings(teacher, student_pattern="", mla_rank=16, rope_pairs=2),
                                             loaded.config, loaded.params)
    assert [l.mixer for l in config.layers] == ["mla"] * 2 and replaced == [0, 1]
    assert config.layers[0].mixer_config.kv_lora_rank == 16 and params["layer_0"]["mixer"]["kv_down"].shape[1] == 16 + 8


@pytest.mark.parametrize("changes, message", [
    ({"student_pattern": "AA"}, "exactly one of them"),
    ({"student_pattern": "AG", "mla_rank": 8}, "exactly one of them"),
    ({"stages": ("mixer", "distill")}, "stages: must be"),
    ({"stage_steps": (1, 2)}, "one positive step count per stage"),
    ({"kernel_impl": "cuda"}, "kernel_impl: must be one of"),
])
def test_bad_settings(changes, message, teacher):
    with pytest.raises(ConfigError, match=message):
        settings(teacher, **changes).validate()
