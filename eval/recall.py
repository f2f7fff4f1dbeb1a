"""Recall probes where recurrent layers are weak: multi-query associative recall (MQAR) and passkey retrieval.

MQAR (Arora et al. 2023, "Zoology", arXiv 2312.04927): a sequence lists N key-value pairs, then queries every
key again in a random order, each followed by its value:

    k1 v1 k2 v2 ... kN vN  kσ1 vσ1 kσ2 vσ2 ... kσN vσN

Keys are distinct and come from one half of a token range, values from the other half. The score is the
fraction of queried values predicted by argmax from the key just before them. An attention layer can look
every pair up; a recurrent layer must hold all N pairs in its fixed-size state, so its accuracy falls once
N outgrows that state (the paper's Figure 2). `mqar_batch` is also the training data for a model trained
on the task.

Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention", arXiv 2305.16300): a five-digit key hidden at a
given depth in repeated filler text, then "What is the pass key? The pass key is"; the score is whether
greedy decoding produces the key (lm-evaluation-harness's is_greedy on " 12345"), at increasing context
lengths. Examples come from a fixed seed, so every model sees the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zoo.eval.loglikelihood import Request, encode_pair, score_requests, token_scores


@dataclass(frozen=True)
class TokenRange:
    """Keys from [low, middle), values from [middle, high)."""
    low: int
    high: int

    @property
    def middle(self) -> int:
        return (self.low + self.high) // 2

    def check(self, pairs: int) -> None:
        if self.middle - self.low < pairs:
            raise ValueError(f"MQAR with {pairs} pairs needs {pairs} distinct keys; the key range "
                             f"[{self.low}, {self.middle}) has {self.middle - self.low}")


def visible_tokens(tokenizer, vocab_size: int) -> TokenRange:
    """The longest run of ids that each decode to visible text and are not special tokens: what a model trained
    on text predicts (a byte-level model never predicts a lone UTF-8 continuation byte, nor a BOS)."""
    specials = {i for i in (getattr(tokenizer, n, None) for n in ("bos_id", "eos_id", "pad_id")) if i is not None}

    def visible(i: int) -> bool:
        if i in specials:
            return False
        try:
            text = tokenizer.decode([i])
        except Exception:  # ids past the tokenizer's own vocabulary (padded embedding rows)
            return False
        return bool(text.strip()) and text.isprintable() and "\ufffd" not in text

    best, start = (0, 0), None
    for i in range(vocab_size + 1):
        if i < vocab_size and visible(i):
            start = i if start is None else start
        elif start is not None:
            best = max(best, (start, i), key=lambda r: r[1] - r[0])
            start = None
    if best[1] - best[0] < 4:
        raise ValueError("the tokenizer has no run of 4 visible tokens to draw MQAR keys and values from")
    return TokenRange(*best)


def mqar_batch(rng: np.random.Generator, rows: int, pairs: int, tokens: TokenRange, prefix: tuple[int, ...] = ()
               ) -> dict[str, np.ndarray]:
    """`rows` MQAR sequences of `pairs` pairs: inputs / targets / weights [rows, len(prefix) + 4 * pairs - 1],
    weight 1 on each queried value (the target after a query key)."""
    tokens.check(pairs)
    keys = np.stack([rng.choice(np.arange(tokens.low, tokens.middle), pairs, replace=False) for _ in range(rows)])
    values = rng.integers(tokens.middle, tokens.high, (rows, pairs))
    order = np.argsort(rng.random((rows, pairs)), axis=1)
    listed = np.stack([keys, values], axis=2).reshape(rows, 2 * pairs)
    queried = np.stack([np.take_along_axis(keys, order, 1), np.take_along_axis(values, order, 1)], axis=2)
    sequence = np.concatenate([np.tile(np.asarray(prefix, np.int64), (rows, 1)), listed,
                               queried.reshape(rows, 2 * pairs)], axis=1)
    weights = np.zeros(sequence.shape, np.float32)
    weights[:, len(prefix) + 2 * pairs + 1::2] = 1.0  # the values of the query half
    return {"inputs": sequence[:, :-1].astype(np.int32), "targets": sequence[:, 1:].astype(np.int32),
            "weights": weights[:, 1:]}


def mqar(config, params, tokenizer, *, mesh, pair_counts: list[int], examples: int = 256, seed: int = 0,
         batch_size: int = 8, progress: bool = True) -> list[dict]:
    """Per pair count: accuracy over `examples` sequences x pairs queries, and the fraction of sequences with
    every query right. One forward pass scores all queries of a sequence."""
    bos = getattr(tokenizer, "bos_id", None)
    prefix = () if bos is None else (bos,)
    tokens = visible_tokens(tokenizer, config.vocab_size)
    results = []
    for pairs in pair_counts:
        if len(prefix) + 4 * pairs - 1 > config.max_seq_len:
            raise ValueError(f"MQAR with {pairs} pairs is {len(prefix) + 4 * pairs} tokens, longer than the model "
                             f"supports (max_seq_len {config.max_seq_len})")
        batch = mqar_batch(np.random.default_rng([seed, pairs]), examples, pairs, tokens, prefix)
        sequences = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
        scored = token_scores(config, params, sequences.tolist(), mesh=mesh, batch_size=batch_size,
                              progress=progress, desc=f"mqar {pairs} pairs")
        queries = batch["weights"] > 0
        right = np.stack([greedy[q] for (_, greedy), q in zip(scored, queries, strict=True)])  # [examples, pairs]
        results.append({"pairs": pairs, "tokens": int(sequences.shape[1]), "examples": examples,
                        "accuracy": float(right.mean()), "all_right": float(np.mean(right.all(axis=1)))})
    return results


FILLER = ("The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ", "There and back again. ")
QUESTION = "What is the pass key? The pass key is"


def _filler(sentences: int) -> str:
    return "".join(FILLER[i % len(FILLER)] for i in range(sentences))


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> Request:
    """The longest prompt of at most `length` tokens (with the continuation " KEY") whose filler hides the key
    at `depth` (0 = first, 1 = just before the question)."""
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "

    def prompt(sentences: int) -> Request:
        before = round(sentences * depth)
        return encode_pair(tokenizer, _filler(before) + needle + _filler(sentences - before) + QUESTION,
                           f" {key}")

    def size(r: Request) -> int:
        return len(r.context) + len(r.continuation)

    per_sentence = len(tokenizer.encode(_filler(50))) / 50
    sentences = max(0, int((length - size(prompt(0))) / per_sentence) + 2)
    while sentences > 0 and size(prompt(sentences)) > length:
        sentences -= 1
    return prompt(sentences)


def passkey(config, params, tokenizer, *, mesh, lengths: list[int], depths: list[float], trials: int = 4,
            seed: int = 0, batch_size: int = 8, progress: bool = True) -> list[dict]:
    """Per (length, depth): the fraction of `trials` keys that greedy decoding retrieves."""
    rng = np.random.default_rng(seed)
    cells, requests = [], []
    for length in lengths:
        if length > config.max_seq_len + 1:
            raise ValueError(f"passkey length {length} tokens is longer than the model supports (max_seq_len "
                             f"{config.max_seq_len})")
        for depth in depths:
            for _ in range(trials):
                cells.append((length, depth))
                requests.append(passkey_prompt(tokenizer, length, depth, int(rng.integers(10000, 100000))))
    scores = score_requests(config, params, requests, mesh=mesh, batch_size=batch_size, progress=progress,
                            desc="passkey")
    results = []
    for length in lengths:
        for depth in depths:
            mine = [s for c, s in zip(cells, scores, strict=True) if c == (length, depth)]
            size = [len(r.context) + len(r.continuation) for c, r in zip(cells, requests, strict=True)
                    if c == (length, depth)]
            results.append({"length": length, "tokens": int(np.mean(size)), "depth": depth, "trials": trials,
                            "accuracy": float(np.mean([s.is_greedy for s in mine])),
                            "key_logprob": float(np.mean([s.logprob for s in mine]))})
    return results
