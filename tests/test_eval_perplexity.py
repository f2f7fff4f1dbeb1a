"""`zoo eval --tasks ppl` (zoo.eval.perplexity, zoo.eval.report): sliding-window scoring against a per-window
float64 reference, the same checkpoint scored on one device and on several meshes of 8 fake devices, bits per
byte, results that never overwrite earlier ones, and the command's errors."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
from inputs import saved_model, small_hybrid

from zoo.cli import main as zoo_main
from zoo.eval.perplexity import perplexity, sliding_windows
from zoo.model import DecoderLM
from zoo.train.checkpoint import load_model
from zoo.train.mesh import make_mesh, parse_mesh

MAX_SEQ_LEN = 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A hybrid (attention, Mamba-2) with random weights saved as a zoo checkpoint."""
    return saved_model(tmp_path_factory.mktemp("model"), small_hybrid(MAX_SEQ_LEN, chunk_size=8), step=3, seed=11)


def random_text(rng, length):
    letters = np.array(list("abcdefgh ijklmn\nopqrst éü"))  # two-byte characters too
    return "".join(rng.choice(letters, length))


def test_windows_score_every_target_once_with_enough_history(rng):
    for _ in range(200):
        n, context = int(rng.integers(1, 200)), int(rng.integers(1, 40))
        stride = int(rng.integers(1, context + 1))
        windows = sliding_windows(n, context, stride)
        scored = [t for w in windows for t in range(w.first_scored, w.end + 1)]
        assert scored == list(range(1, n + 1))
        for w in windows:
            assert w.end - w.begin <= context
            if w.begin > 0:  # every scored target sees at least context - stride tokens before it
                assert w.first_scored - 1 - w.begin >= context - stride


def reference_nll(config, params, ids, context, stride):
    """Each target scored by the first window (ids[b : b + context], b = 0, stride, ...) that predicts it, the
    model run on that window alone, log-softmax in float64."""
    apply = jax.jit(lambda p, x: DecoderLM(config).apply({"params": p}, x)[0])
    scored = {}
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + context, len(ids) - 1)
        logits = np.asarray(apply(params, ids[None, begin:end]), np.float64)[0]
        log_probs = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        for j in range(end - begin):
            scored.setdefault(begin + 1 + j, -log_probs[j, ids[begin + 1 + j]])
        if end == len(ids) - 1:
            break
    assert sorted(scored) == list(range(1, len(ids)))
    return sum(scored.values())


@pytest.mark.parametrize("context, stride", [(16, 5), (32, 32)])
def test_matches_the_per_window_reference(checkpoint, context, stride, rng):
    model = load_model(checkpoint)
    text = random_text(rng, int(rng.integers(60, 120)))
    result = perplexity(model.config, model.params, model.tokenizer, text, mesh=make_mesh(parse_mesh("data=1")),
                        context=context, stride=stride, batch_size=4, progress=False)
    ids = np.asarray(model.tokenizer.encode(text, bos=True), np.int32)
    want = reference_nll(model.config, model.params, ids, context, stride)
    # float32 logits, summed in float64; the batched windows are padded, the reference's are not
    assert result.tokens == len(ids) - 1 == len(text.encode("utf-8"))
    np.testing.assert_allclose(result.nll, want, rtol=1e-5)
    assert math.isclose(result.perplexity, math.exp(want / result.tokens), rel_tol=1e-5)
    # byte-level: one token per byte, so bits per byte is the mean nats per token in bits
    assert math.isclose(result.bits_per_byte, want / result.tokens / math.log(2), rel_tol=1e-5)


def test_same_scores_on_every_mesh(checkpoint, rng):
    text = random_text(rng, 150)
    scores = {}
    for spec in ("data=1", "data=8", "data=2,fsdp=2,tensor=2", "fsdp=4,tensor=2"):
        mesh = make_mesh(parse_mesh(spec))
        model = load_model(checkpoint, mesh)  # restored onto this mesh from the one checkpoint
        scores[spec] = perplexity(model.config, model.params, model.tokenizer, text, mesh=mesh, context=16,
                                  stride=8, batch_size=8, progress=False)
    single = scores.pop("data=1")
    for spec, result in scores.items():
        assert result.tokens == single.tokens and result.windows == single.windows
        # sharded matmuls may add partial sums in another order: float32 rounding, no more
        np.testing.assert_allclose(result.nll, single.nll, rtol=1e-6, err_msg=spec)
        # perplexity = exp(nll / tokens): a relative nll error e moves it by about e * nll / tokens
        assert math.isclose(result.perplexity, single.perplexity, rel_tol=1e-6 * result.nll / result.tokens + 1e-7), spec


def test_command_writes_results_and_never_overwrites_silently(checkpoint, tmp_path, rng, capsys):
    data, text = tmp_path / "text.txt", random_text(rng, 100)
    data.write_text(text, encoding="utf-8")
    out = tmp_path / "results"
    args = ["eval", str(checkpoint), "--tasks", "ppl", "--data", str(data), "--context", "16", "--stride", "8",
            "--mesh", "data=2", "--batch-size", "4", "--out", str(out)]
    assert zoo_main(args) == 0
    first = json.loads((out / "ppl.json").read_text())
    assert first["step"] == 3 and first["results"][0]["tokens"] == len(text.encode("utf-8")) and (out / "ppl.md").is_file()
    assert "| perplexity |" in (out / "ppl.md").read_text().replace(" bits/byte |", "")
    (out / "ppl.json").write_text('{"earlier": true}')
    assert zoo_main(args) == 0  # a second run keeps the first result and numbers its own
    assert json.loads((out / "ppl.json").read_text()) == {"earlier": True}
    second = json.loads((out / "ppl.1.json").read_text())
    assert second["results"] == first["results"] and (out / "ppl.1.md").is_file()
    assert zoo_main(args + ["--overwrite"]) == 0
    assert json.loads((out / "ppl.json").read_text())["results"] == first["results"]
    assert not list(out.glob("*.partial"))
    # without --out: beside the checkpoint, per step, whichever of its directories is named
    step_dir = checkpoint / "checkpoints" / "3"
    assert zoo_main(["eval", str(step_dir)] + args[2:-2]) == 0
    assert json.loads((checkpoint / "eval" / "3" / "ppl.json").read_text())["results"] == first["results"]
    capsys.readouterr()


@pytest.mark.parametrize("change, message", [
    ({"--context": "64"}, "64 tokens is longer than the model supports (max_seq_len 32)"),
    ({"checkpoint": "/nonexistent/run"}, "no such checkpoint directory"),
    ({"--tasks": "ppl,bogus"}, "bogus; the tasks are ppl"),
    ({"--data": "/nonexistent/text.txt"}, "no such file"),
])
def test_command_errors(checkpoint, tmp_path, change, message, capsys):
    data = tmp_path / "text.txt"
    data.write_text("some text to score", encoding="utf-8")
    options = {"checkpoint": str(checkpoint), "--tasks": "ppl", "--data": str(data), "--context": "16",
               "--mesh": "data=1", "--out": str(tmp_path / "out"), **change}
    args = ["eval", options.pop("checkpoint")] + [x for k, v in options.items() for x in (k, v)]
    assert zoo_main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
