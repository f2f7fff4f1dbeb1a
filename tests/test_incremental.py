"""Incremental distillation (zoo.train.incremental): each round replaces the layer whose replacement costs least
on held-out data (checked against scores recomputed independently of the run), distils, and records the round
before training it, so an interrupted run continues from the next round."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from inputs import saved_model

from zoo.config import LayerConfig, ModelConfig
from zoo.layers.attention import AttentionConfig
from zoo.tokenizer import ByteTokenizer
from zoo.train import data as data_lib
from zoo.train import incremental as inc
from zoo.train.checkpoint import load_model
from zoo.train.data import DataConfig
from zoo.recurrent_init import hybrid_from_attention
from zoo.train.distill import DistillConfig, heldout_ce
from zoo.train.mesh import make_mesh, parse_mesh
from zoo.train.optim import OptimConfig


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    layer = LayerConfig("attention", AttentionConfig(4, 2, 8))
    config = ModelConfig(vocab_size=ByteTokenizer.padded_vocab_size, d_model=32, mlp_hidden=64, layers=(layer,) * 3,
                         max_seq_len=64)
    directory = tmp_path_factory.mktemp("teacher")
    words = np.random.default_rng(0).choice(["the", "cat", "sat", "on", "a", "mat", "and", "ran", "."], 3000)
    (directory / "text.txt").write_text(" ".join(words))
    return saved_model(directory, config, step=1, seed=11)


def settings(teacher):
    return DistillConfig(teacher=str(teacher), stages=("kl",), stage_steps=(2,), batch_size=4, mesh="data=1",
                         log_every=1, eval_every=100, checkpoint_every=100,
                         data=DataConfig(source=str(teacher / "text.txt"), seq_len=32, max_eval_rows=8),
                         optim=OptimConfig(learning_rate=1e-2, warmup_steps=0))


@pytest.mark.slow  # ~3 minutes on 2 cores: every round and every scored layer compiles its own model
def test_rounds_replace_the_cheapest_layer_and_resume(teacher, tmp_path, monkeypatch):
    config = settings(teacher)
    incremental = inc.IncrementalConfig(target_ratio=0.6, per_round=1, letter="M")  # 2 of 3 layers
    calls = []
    real_distill = inc.distill

    def interrupted(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt  # stopped as round 2's training starts
        return real_distill(*args, **kwargs)

    monkeypatch.setattr(inc, "distill", interrupted)
    with pytest.raises(KeyboardInterrupt):
        inc.distill_incrementally(config, incremental, tmp_path / "run", log=lambda *_: None, progress=False)
    recorded = json.loads((tmp_path / "run" / inc.STATE_FILE).read_text())
    assert len(recorded["rounds"]) == 2 and "summary" in recorded["rounds"][0] and "summary" not in recorded["rounds"][1]

    monkeypatch.setattr(inc, "distill", real_distill)
    state = inc.distill_incrementally(config, incremental, tmp_path / "run", log=lambda *_: None, progress=False)
    first, second = state["rounds"]
    assert first["scores"] == recorded["rounds"][0]["scores"] and second["replaced"] == recorded["rounds"][1]["replaced"]
    assert len(first["scores"]) == 3 and len(second["scores"]) == 2  # the replaced layer is not scored again
    for r in (first, second):
        assert r["replaced"] == [int(min(r["scores"], key=lambda i: (r["scores"][i], int(i))))]
    final = load_model(tmp_path / "run" / "round_2")
    mixers = [l.mixer for l in final.config.layers]
    assert mixers.count("mamba2") == 2 and second["fraction_replaced"] == 2 / 3
    assert {i for i, m in enumerate(mixers) if m == "mamba2"} == set(first["replaced"] + second["replaced"])

    # Round 1's score of layer 0, recomputed directly: the teacher's held-out loss with that layer replaced by its
    # recurrent initialisation, minus the teacher's own
    mesh = make_mesh(parse_mesh("data=1"))
    loaded = load_model(teacher)
    data = data_lib.prepare(config.data, loaded.tokenizer)
    params = jax.device_get(loaded.params)
    layout = ["mamba2", "attention", "attention"]
    trial, trial_params, _ = hybrid_from_attention(loaded.config, params, layout, jax.random.key(config.seed))
    increase = (heldout_ce(trial, trial_params, data, 4, mesh) - heldout_ce(loaded.config, params, data, 4, mesh))
    np.testing.assert_allclose(increase, first["scores"]["0"], rtol=1e-4, atol=1e-6)


def test_settings_must_match_to_continue(teacher, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / inc.STATE_FILE).write_text(json.dumps({"rounds": [], "settings": {"other": 1}}))
    with pytest.raises(ValueError, match="different settings"):
        inc.distill_incrementally(settings(teacher), inc.IncrementalConfig(), tmp_path / "run", log=lambda *_: None)


def test_command_line_refuses_a_pattern_with_incremental(teacher, tmp_path, capsys):
    from zoo.cli import main as zoo_main

    assert zoo_main(["distill", "--teacher", str(teacher), "--incremental", "--student-pattern", "AM",
                     "--out", str(tmp_path / "run")]) == 2
    assert "--incremental chooses the layers itself" in capsys.readouterr().err
