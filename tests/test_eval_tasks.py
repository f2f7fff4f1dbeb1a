"""`zoo eval --tasks mc,mqar,passkey,speed` (zoo.eval.multiple_choice, loglikelihood, recall, speed): prompts as
lm-evaluation-harness's task templates write them, acc / acc_norm against log-likelihoods computed by a plain
forward pass with a float64 log-softmax, the same scores on several meshes, malformed lines, and the
command's results and errors. MQAR training: tests/test_mqar.py."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from inputs import saved_model, small_hybrid

from zoo.cli import main as zoo_main
from zoo.eval.harness import ZooLM
from zoo.eval.loglikelihood import Request, encode_pair, score_requests
from zoo.eval.multiple_choice import TASKS, evaluate, load_task, parse_lines
from zoo.eval.recall import TokenRange, mqar_batch, visible_tokens, passkey_prompt
from zoo.eval.speed import cache_bytes, measure, plot
from zoo.model import DecoderLM
from zoo.tokenizer import ByteTokenizer
from zoo.train.checkpoint import load_model
from zoo.train.mesh import make_mesh, parse_mesh

FIXTURES = Path(__file__).parent / "fixtures" / "mc"
MAX_SEQ_LEN = 256  # the longest fixture question (BoolQ's first) is ~200 bytes


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An attention + Mamba-2 hybrid with random weights, saved as a zoo checkpoint."""
    config = small_hybrid(MAX_SEQ_LEN, chunk_size=16)
    seed = int(np.random.SeedSequence().entropy % 2**31)
    print(f"model seed={seed}")
    return saved_model(tmp_path_factory.mktemp("model"), config, step=5, seed=seed)


def questions(name):
    with open(FIXTURES / f"{name}.jsonl", encoding="utf-8") as f:
        parsed = parse_lines(TASKS[name], f)
    assert not parsed.malformed
    return parsed.questions


# --- prompts: the harness's templates, written out by hand for the fixture rows -----------------------------

def test_arc_prompts_in_both_published_layouts():
    first, nested, numbered = questions("arc_easy")
    assert first.contexts[0] == ("Question: An astronomer observes that a planet rotates faster after a meteorite "
                                 "impact. Which is the most likely effect of this increase in rotation?\nAnswer:")
    assert first.continuations[2] == " Planetary days will become shorter." and first.gold == 2
    assert nested.contexts[0] == "Question: Which technology was developed most recently?\nAnswer:"
    assert nested.continuations == (" cellular telephone", " television", " refrigerator", " airplane")
    assert nested.gold == 0 and numbered.gold == 0 and len(numbered.choices) == 3


def test_piqa_boolq_and_lambada_prompts():
    piqa = questions("piqa")[1]
    assert piqa.contexts == ("Question: To keep bread fresh longer,\nAnswer:",) * 2
    assert piqa.continuations == (" store it in a sealed bag.", " store it in an open bowl.") and piqa.gold == 0
    original, superglue = questions("boolq")
    assert original.contexts[0] == ("All biomass goes through at least some of these steps: it needs to be grown, "
                                    "collected, dried, fermented, distilled, and burned.\nQuestion: does ethanol take "
                                    "more energy make that produces?\nAnswer:")
    assert original.continuations == (" no", " yes") and original.gold == 0 and superglue.gold == 1
    lambada = questions("lambada")[0]
    assert lambada.contexts == ("the cat sat on the mat and the dog sat on the",)
    assert lambada.continuations == (" mat",)


def test_hellaswag_cleans_wikihow_brackets():
    activitynet, wikihow = questions("hellaswag")
    assert activitynet.contexts[0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert activitynet.continuations[3] == " starts pulling up roofing on a roof." and activitynet.gold == 3
    assert wikihow.contexts[0] == "Home and Garden: How to grow tomatoes. Pick a sunny spot. Tomatoes need"
    assert wikihow.continuations[0] == " six to eight hours of sun Water them daily."
    assert wikihow.continuations[3] == " to be kept. indoors."


def test_winogrande_puts_the_option_in_the_context():
    ian = questions("winogrande")[0]
    stem = "Ian volunteered to eat Dennis's menudo after already having a bowl because "
    assert ian.contexts == (stem + "Ian", stem + "Dennis")
    assert ian.continuations == (" despised eating intestine.",) * 2 and ian.gold == 1
    assert ian.choices == ian.contexts  # acc_norm would divide by these; the harness reports acc only


def test_malformed_lines_are_reported_with_line_numbers_and_the_rest_kept():
    parsed, _ = load_task("piqa", str(FIXTURES / "malformed_piqa.jsonl"))
    assert [q.line for q in parsed.questions] == [1, 7]
    assert [m["line"] for m in parsed.malformed] == [2, 3, 5, 6]
    errors = " | ".join(m["error"] for m in parsed.malformed)
    for part in ("no field 'label'", "not JSON", "answer index 5", "not an object"):
        assert part in errors


def test_encode_pair_moves_trailing_spaces_to_the_continuation():
    tokenizer = ByteTokenizer()
    request = encode_pair(tokenizer, "Answer: ", "yes")
    assert request.context == (tokenizer.bos_id, *b"Answer:") and request.continuation == tuple(b" yes")


# --- scores against a plain forward pass -------------------------------------------------------------------

@functools.cache
def plain_forward(config):
    return jax.jit(lambda p, x: DecoderLM(config).apply({"params": p}, x)[0])


def reference_logprobs(config, params, requests):
    """Each request run alone, followed by zeros up to max_seq_len (a causal model's logits cannot see what
    follows them), through DecoderLM with no positions or segments given; log-softmax in float64."""
    apply = plain_forward(config)
    out = []
    for r in requests:
        row = np.array(list(r.context) + list(r.continuation))
        padded = np.zeros((1, config.max_seq_len), np.int32)
        padded[0, :len(row) - 1] = row[:-1]
        logits = np.asarray(apply(params, padded), np.float64)[0, :len(row) - 1]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        n = len(r.continuation)
        picked = logp[np.arange(len(row) - 1), row[1:]][-n:]
        greedy = np.argmax(logits, -1)[-n:] == row[-n:]
        out.append((picked.sum(), bool(greedy.all())))
    return out


def test_acc_and_acc_norm_equal_a_reference_computed_by_hand(checkpoint):
    mesh = make_mesh(parse_mesh("data=1"))  # several meshes: test_same_scores_on_every_mesh
    model = load_model(checkpoint, mesh)
    for name in ("arc_easy", "hellaswag", "lambada"):
        parsed, source = load_task(name, str(FIXTURES / f"{name}.jsonl"))
        result = evaluate(model.config, model.params, model.tokenizer, name, parsed, mesh=mesh, source=source,
                          progress=False)
        acc, acc_norm, nll = [], [], []
        for q in parsed.questions:
            requests = [encode_pair(model.tokenizer, c, t) for c, t in zip(q.contexts, q.continuations, strict=True)]
            ref = reference_logprobs(model.config, model.params, requests)
            lls = np.array([lp for lp, _ in ref])
            lengths = np.array([len(c) for c in q.choices], np.float64)
            acc.append(float(np.argmax(lls) == q.gold))
            acc_norm.append(float(np.argmax(lls / lengths) == q.gold))
            nll.append(-lls[0])
            if name == "lambada":
                acc[-1] = float(ref[0][1])
        assert result["examples"] == len(parsed.questions)
        assert result["acc"] == pytest.approx(np.mean(acc), abs=0), name
        if name == "lambada":
            # float32 logits summed over a word: relative 1e-5
            assert result["perplexity"] == pytest.approx(np.exp(np.mean(nll)), rel=1e-5)
        else:
            assert result["acc_norm"] == pytest.approx(np.mean(acc_norm), abs=0), name
            assert result["acc_stderr"] == pytest.approx(np.std(acc, ddof=1) / np.sqrt(len(acc)))


def test_same_scores_on_every_mesh(checkpoint, rng):
    text = "".join(rng.choice(list("abcdefgh ij"), 100))
    requests = [Request(tuple(ByteTokenizer().encode(text[:int(rng.integers(1, 40))], bos=True)),
                        tuple(ByteTokenizer().encode(text[-int(rng.integers(1, 8)):]))) for _ in range(11)]
    scores = {}
    for spec in ("data=1", "data=8", "data=2,fsdp=2,tensor=2", "fsdp=4,tensor=2"):
        mesh = make_mesh(parse_mesh(spec))
        model = load_model(checkpoint, mesh)
        scores[spec] = score_requests(model.config, model.params, requests, mesh=mesh, progress=False)
    single = scores.pop("data=1")
    for spec, got in scores.items():
        # sharded matmuls may add partial sums in another order: float32 rounding of a sum of <= 8 terms
        np.testing.assert_allclose([s.logprob for s in got], [s.logprob for s in single], rtol=1e-5, err_msg=spec)
        assert [s.is_greedy for s in got] == [s.is_greedy for s in single], spec


def test_a_too_long_question_is_an_error_unless_truncated(checkpoint):
    model = load_model(checkpoint)
    mesh = make_mesh(parse_mesh("data=1"))
    long = Request(tuple(i % 250 for i in range(MAX_SEQ_LEN + 5)), (7, 8))
    with pytest.raises(ValueError, match="longer than the model supports.*--truncate"):
        score_requests(model.config, model.params, [long], mesh=mesh, progress=False, names=["x.jsonl line 4"])
    short = Request(long.context[-(MAX_SEQ_LEN - 1):], long.continuation)
    cut, kept = score_requests(model.config, model.params, [long, short], mesh=mesh, truncate=True, progress=False)
    assert cut.truncated and not kept.truncated
    assert cut.logprob == pytest.approx(kept.logprob, rel=1e-6)  # the same last 513 tokens


# --- recall probes ------------------------------------------------------------------------------------------

def test_mqar_sequences_query_every_key_once(rng):
    tokens = TokenRange(3, 67)
    pairs = int(rng.integers(1, 32))
    batch = mqar_batch(rng, 5, pairs, tokens, prefix=(1,))
    sequence = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
    for row, weights in zip(sequence, batch["weights"], strict=True):
        listed = row[1:1 + 2 * pairs].reshape(pairs, 2)
        asked = row[1 + 2 * pairs:].reshape(pairs, 2)
        assert len(set(listed[:, 0])) == pairs and set(listed[:, 0]) == set(asked[:, 0])
        assert np.all((listed[:, 0] >= 3) & (listed[:, 0] < 35) & (listed[:, 1] >= 35) & (listed[:, 1] < 67))
        assert dict(map(tuple, listed)) == dict(map(tuple, asked))
        scored = np.flatnonzero(weights) + 1  # positions of the scored targets in the sequence
        assert list(row[scored]) == list(asked[:, 1]) and list(row[scored - 1]) == list(asked[:, 0])


def test_recall_tokens_are_visible_text():
    # bytes 33-126: printable ASCII without the space; never a control byte, a UTF-8 fragment or BOS / EOS
    assert visible_tokens(ByteTokenizer(), ByteTokenizer.padded_vocab_size) == TokenRange(33, 127)


def test_passkey_prompts_fit_and_hide_the_key_at_its_depth(rng):
    tokenizer = ByteTokenizer()
    for length in (200, 333, 1000):
        for depth in (0.0, 0.5, 1.0):
            key = int(rng.integers(10000, 100000))
            request = passkey_prompt(tokenizer, length, depth, key)
            size = len(request.context) + len(request.continuation)
            assert length - 25 <= size <= length  # the filler's sentences are at most 22 bytes
            text = tokenizer.decode(list(request.context[1:]))
            assert tokenizer.decode(list(request.continuation)) == f" {key}"
            assert text.endswith("What is the pass key? The pass key is")
            needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
            head, tail = text.split(needle)
            before, after = head.count(". "), tail.count(". ")  # filler sentences either side of the key
            assert before == round((before + after) * depth), (length, depth, before, after)


# --- speed ---------------------------------------------------------------------------------------------------

def test_speed_rows_and_the_decode_state_of_each_layer_kind(checkpoint, tmp_path):
    model = load_model(checkpoint)
    rows = measure(model.config, model.params, lengths=[16], decode_tokens=4, repeats=2, progress=False)
    assert rows[0]["prefill_tokens_per_s"] > 0 and rows[0]["decode_tokens_per_s"] > 0
    assert rows[0]["cache_bytes"] == cache_bytes(model.config, 1, 16)
    # attention's slot cache grows with the context: K and V (2 kv heads x head dim 8 x 4 bytes each) and each
    # slot's int32 position and segment id; Mamba-2's state does not grow
    kv_per_token = 2 * 2 * 8 * 4 + 2 * 4
    assert cache_bytes(model.config, 1, 64) - cache_bytes(model.config, 1, 16) == 48 * kv_per_token
    path = tmp_path / "speed.png"
    plot({"a": rows, "b": [{**rows[0], "context": 32}]}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the command -------------------------------------------------------------------------------------------

def test_command_scores_tasks_and_reports_malformed_lines(checkpoint, tmp_path, capsys):
    out = tmp_path / "results"
    mc = f"piqa={FIXTURES / 'malformed_piqa.jsonl'},boolq={FIXTURES / 'boolq.jsonl'}"
    assert zoo_main(["eval", str(checkpoint), "--tasks", "mc,mqar,passkey", "--mc", mc, "--mqar-pairs", "2,4",
                     "--mqar-examples", "8", "--passkey-lengths", "64", "--passkey-trials", "1", "--mesh", "data=8",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "malformed_piqa.jsonl line 3: not JSON" in printed
    mc_result = json.loads((out / "mc.json").read_text())
    piqa, boolq = mc_result["results"]
    assert piqa["examples"] == 2 and [m["line"] for m in piqa["malformed"]] == [2, 3, 5, 6]
    assert boolq["examples"] == 2 and not boolq["malformed"]
    assert "4 malformed line(s) skipped: 2, 3, 5, 6" in (out / "mc.md").read_text()
    mqar_rows = json.loads((out / "mqar.json").read_text())["results"]
    assert [r["pairs"] for r in mqar_rows] == [2, 4] and all(0 <= r["accuracy"] <= 1 for r in mqar_rows)
    assert len(json.loads((out / "passkey.json").read_text())["results"]) == 5  # one length x five depths


@pytest.mark.parametrize("args, message", [
    (["--tasks", "mc"], "--tasks mc needs --mc"),
    (["--tasks", "mc", "--mc", "squad"], "unknown task 'squad'"),
    (["--tasks", "mc", "--mc", "piqa=/nonexistent.jsonl"], "no such file"),
    (["--tasks", "mqar", "--mqar-pairs", "4,x"], "--mqar-pairs: expected comma-separated integers"),
    (["--tasks", "mqar", "--mqar-pairs", "100"], "longer than the model supports"),
    (["--tasks", "passkey", "--passkey-lengths", "300"], "longer than the model supports"),
    (["--tasks", "speed", "--speed-lengths", "300"], "longer than the model supports"),
])
def test_command_errors(checkpoint, tmp_path, capsys, args, message):
    assert zoo_main(["eval", str(checkpoint), *args, "--mesh", "data=1", "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_checkpoint_is_one_clear_error(tmp_path, capsys):
    assert zoo_main(["eval", str(tmp_path / "nothing"), "--tasks", "mqar"]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err


# --- the lm-evaluation-harness adapter (driven here without the harness) -------------------------------------

class HarnessRequest:
    def __init__(self, *args):
        self.args = args


def test_harness_adapter_answers_the_three_request_kinds(checkpoint):
    lm = ZooLM(str(checkpoint), mesh="data=1", progress=False)
    tokenizer = lm.model.tokenizer
    pairs = [("Question: is it?\nAnswer:", " yes"), ("The cat sat on the ", "mat")]
    got = lm.loglikelihood([HarnessRequest(*p) for p in pairs])
    want = reference_logprobs(lm.model.config, lm.model.params, [encode_pair(tokenizer, *p) for p in pairs])
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5)
    assert [g[1] for g in got] == [w[1] for w in want]

    text = "a short document"
    rolling = lm.loglikelihood_rolling([HarnessRequest(text)])[0]
    ids = tokenizer.encode(text, bos=True)
    whole = reference_logprobs(lm.model.config, lm.model.params, [Request(tuple(ids[:1]), tuple(ids[1:]))])[0][0]
    assert rolling == pytest.approx(whole, rel=1e-5)  # every token scored, from BOS on

    full = lm.generate_until([HarnessRequest("Once upon", {"until": [], "max_gen_toks": 12})])[0]
    # A random model may stop early (EOS) or emit multi-byte characters, so the text can be shorter than 12
    # characters, or empty: the stop string is taken from its middle, and an empty text must stay empty.
    stop = full[len(full) // 2:][:2] or "never generated"
    cut = lm.generate_until([HarnessRequest("Once upon", {"until": [stop], "max_gen_toks": 12})])[0]
    assert cut == (full[:full.index(stop)] if stop in full else full)
