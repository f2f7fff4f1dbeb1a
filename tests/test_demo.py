"""The embedded corpus, the byte tokenizer and the `zoo` CLI (demo, presets, generate)."""

import numpy as np

from zoo.cli import main
from zoo.corpus import is_heldout, load_stdlib_corpus, stdlib_sources
from zoo.demo import DemoSettings, run_demo
from zoo.tokenizer import ByteTokenizer
from zoo.train.checkpoint import load_model


def test_stdlib_corpus_splits_by_module():
    files = stdlib_sources()
    assert len(files) > 100
    heldout = [f for f in files if is_heldout(f.as_posix())]
    assert 0 < len(heldout) < len(files) / 4
    corpus = load_stdlib_corpus(max_train_bytes=200_000, max_heldout_bytes=50_000)
    assert corpus.train.size == 200_000 and corpus.heldout.size == 50_000
    again = load_stdlib_corpus(max_train_bytes=200_000, max_heldout_bytes=50_000)
    np.testing.assert_array_equal(corpus.train, again.train)


def test_byte_tokenizer_round_trips(rng):
    tok = ByteTokenizer()
    text = "naïve café — 東京 " + "".join(chr(c) for c in rng.integers(32, 0x2000, 40))
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and max(ids) < tok.vocab_size
    assert tok.decode(ids) == text


def test_demo_trains_saves_and_generates(tmp_path, capsys):
    settings = DemoSettings(steps=40, batch_size=8, seq_len=64, eval_rows=16, sample_tokens=24)
    result = run_demo(settings, tmp_path / "run")
    assert result["heldout_loss"] < result["initial_loss"] - 1.0  # from ~ln(320) = 5.8 nats/byte
    assert result["sample"].startswith("def ") and len(result["sample"]) > 4
    config, _, tokenizer, step = load_model(tmp_path / "run")[:4]
    assert config.vocab_size == ByteTokenizer.padded_vocab_size and step == 40
    assert isinstance(tokenizer, ByteTokenizer)
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 1000

    capsys.readouterr()
    assert main(["generate", result["checkpoint"], "--prompt", "import ", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("import ")
    assert main(["demo", "--out", str(tmp_path / "run")]) == 2  # refuses a non-empty run directory
    assert "not empty" in capsys.readouterr().err


def test_presets_command_lists_counts(capsys):
    assert main(["presets", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "gqa-tiny" in out and "tpla-tiny" in out and "125m" not in out
    assert main(["generate", "/nonexistent/ckpt"]) == 2


def test_presets_memory_column_is_the_decode_state_at_32k(capsys):
    assert main(["presets", "--memory", "tiny"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if "-tiny" in line}
    # gqa-tiny: 4 layers x (K and V: 2 kv heads x 16 dims x 2 bytes each, + position and segment int32) per token.
    # Columns: name, params, layers, cache@32K (value, unit), bytes/token, attention, recurrent, mixers.
    assert rows["gqa-tiny"][5] == f"{4 * (2 * 2 * 16 * 2 + 8):,}"
    # A pure recurrent model has no attention cache, and its fixed state spread over 32K tokens is tiny.
    assert rows["mamba2-tiny"][6:8] == ["0.0", "MiB"]
    assert int(rows["mamba2-tiny"][5].replace(",", "")) < 10
