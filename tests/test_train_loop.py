"""The training loop (train/trainer.py) end to end: checkpoints, resume after a kill, restore onto other meshes,
the run directory, the NaN guard and the `zoo train` command; on 8 fake CPU devices (conftest.py). A resumed run
replays the same compiled computation on the same inputs, so its losses must be bit-identical.
(The step, meshes, optimizer, data and config are tests/test_train_step.py's.)"""

import logging
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from inputs import saved_model, small_hybrid
from zoo.cli import main
from zoo.tokenizer import ByteTokenizer
from zoo.train.checkpoint import Checkpoints, load_model
from zoo.train.config import TrainConfig
from zoo.train.mesh import make_mesh, parse_mesh
from zoo.train.metrics import read_records
from zoo.train.optim import make_optimizer
from zoo.train.step import abstract_state, boxed_abstract_params, state_shardings
from zoo.train.trainer import TrainingDiverged, train

# The shared data folder sits beside the repository (not inside it), wherever pytest is started.
SHAKESPEARE = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt")


# --- checkpoints, resume, restore onto other meshes ------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """20 steps on mesh (2,2,2) with checkpoints at 10 and 20, every step's loss logged."""
    run = tmp_path_factory.mktemp("runs") / "a"
    config = TrainConfig().with_overrides([
        "steps=20", "batch_size=16", "data.seq_len=32", "log_every=1", "eval_every=100", "checkpoint_every=10",
        "mesh=data=2,fsdp=2,tensor=2", "optim.learning_rate=3e-3", "data.max_eval_rows=32",
    ])
    result = train(config, run, progress=False)
    return config, run, result


def _train_losses(run, after_resume=False):
    records = read_records(run / "metrics.jsonl")
    if after_resume:
        records = records[max(i for i, r in enumerate(records) if "resumed_from" in r):]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(finished_run, tmp_path):
    config, run, result = finished_run
    assert result.step == 20 and Checkpoints(run / "checkpoints", read_only=True).all_steps() == [10, 20]
    # The killed run: its step-20 checkpoint never completed (Orbax leaves only a temporary
    # directory, which must be ignored), so it resumes from step 10.
    killed = tmp_path / "killed"
    shutil.copytree(run, killed)
    shutil.rmtree(killed / "checkpoints" / "20")
    partial = killed / "checkpoints" / "20.orbax-checkpoint-tmp-1234"
    (partial / "params").mkdir(parents=True)
    resumed = train(config, killed, progress=False)
    assert resumed.step == 20
    want, got = _train_losses(run), _train_losses(killed, after_resume=True)
    assert sorted(got) == list(range(11, 21))
    assert [got[s] for s in range(11, 21)] == [want[s] for s in range(11, 21)]  # bit-identical
    assert resumed.heldout_loss == result.heldout_loss


def test_restore_onto_other_meshes_gives_identical_params(finished_run):
    config, run, _ = finished_run
    on_saved_mesh = load_model(run, mesh=make_mesh(parse_mesh("data=2,fsdp=2,tensor=2")))[1]
    on_tensor = load_model(run, mesh=make_mesh(parse_mesh("tensor=8")))[1]
    model_config, on_one_device, tokenizer, step = load_model(run)[:4]
    assert step == 20 and isinstance(tokenizer, ByteTokenizer)
    assert on_tensor["layer_0"]["mlp"]["gate"].sharding.spec == PartitionSpec("fsdp", "tensor")
    for a, b, c in zip(*(jax.tree.leaves(p) for p in (on_saved_mesh, on_tensor, on_one_device))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    # The whole train state (optimizer moments too) restores onto another mesh.
    optimizer = make_optimizer(config.optim, config.steps, nn.unbox(boxed_abstract_params(model_config)))
    mesh = make_mesh(parse_mesh("fsdp=8"))
    target = abstract_state(model_config, optimizer, state_shardings(model_config, optimizer, mesh))
    state = Checkpoints(run / "checkpoints", read_only=True).restore_state(20, target)
    assert int(state.step) == 20
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(on_one_device)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert state.opt_state[1][0].mu["embed"].sharding.spec == PartitionSpec("tensor", "fsdp")  # tensor is size 1


def test_run_directory_holds_metrics_tensorboard_and_loss_curve(finished_run):
    _, run, _ = finished_run
    records = read_records(run / "metrics.jsonl")
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == list(range(1, 21))
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 20]
    assert any("tokens_per_s" in r for r in records)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # warmup 2: step 1 has learning rate 0, step 2 a huge one, so step 2's parameters overflow.
    config = TrainConfig().with_overrides([
        "steps=4", "batch_size=8", "data.seq_len=16", "checkpoint_every=1", "optim.learning_rate=1e38",
        "optim.warmup_steps=2", "optim.clip_norm=0", "data.max_eval_rows=8", "mesh=data=1",
    ])  # one device: the guard does not depend on the mesh, and a one-device step compiles faster
    with pytest.raises(TrainingDiverged, match="step 2: .* last good checkpoint is step 1"):
        train(config, tmp_path / "run", progress=False)
    _, params, _, step = load_model(tmp_path / "run")[:4]
    assert step == 1 and all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))


def test_zoo_train_command_resumes_and_refuses_changed_settings(tmp_path, capsys):
    # One device: the sharded loop is finished_run's; `zoo generate` on a run is test_demo's and test_distill's.
    out = str(tmp_path / "run")
    args = ["train", "--steps", "4", "--batch-size", "8", "--seq-len", "16", "--mesh", "data=1", "--out", out,
            "--set", "data.max_eval_rows=8", "--set", "checkpoint_every=2"]
    assert main(args) == 0
    assert main(["train", "--resume", out, "--set", "steps=6"]) == 0  # continues from step 4
    assert "resumed from" in capsys.readouterr().out
    assert Checkpoints(tmp_path / "run" / "checkpoints", read_only=True).latest_step() == 6
    assert main(args[:-2] + ["--set", "optim.learning_rate=1"]) == 2
    assert "different settings (optim.learning_rate)" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path), "--steps", "1"]) == 2  # non-empty, not a run
    bad = tmp_path / "bad"
    assert main(["train", "--out", str(bad), "--data", str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err and not bad.exists()  # a failed start leaves no run


# --- real text --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_hybrid_learns_tiny_shakespeare(tmp_path):
    import os

    if not os.path.isfile(SHAKESPEARE):
        pytest.skip(f"{SHAKESPEARE} is absent (the shared data folder beside the repository)")
    text = open(SHAKESPEARE, "rb").read()
    counts = np.bincount(np.frombuffer(text, np.uint8), minlength=256)
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * np.log(p)).sum())  # nats per byte, about 3.3 for this text
    config = TrainConfig().with_overrides([
        "preset=samba-tiny", f"data.source={SHAKESPEARE}", "steps=300", "batch_size=16", "data.seq_len=128",
        "optim.learning_rate=3e-3", "eval_every=300", "checkpoint_every=300", "data.max_eval_rows=64",
    ])
    result = train(config, tmp_path / "run", progress=False)
    assert result.heldout_loss < 0.75 * unigram, (result.heldout_loss, unigram)


def test_loading_a_finished_run_warns_of_nothing(tmp_path, caplog):
    config = small_hybrid(max_seq_len=32, chunk_size=8)
    saved_model(tmp_path, config, step=7, seed=0)
    with caplog.at_level(logging.WARNING):
        loaded = load_model(tmp_path)
    assert loaded.step == 7 and loaded.config == config
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
