"""A JSONL corpus of passkey documents for training a model that retrieves (the DuoAttention report, issue 9): each
line is one document in zoo.eval.recall's passkey format (a five-digit key at a random depth of filler text, then
the question and the key), of min-length..max-length byte tokens. `zoo eval --tasks passkey` draws fresh keys with
its own seed, so a model scores by retrieving, not by remembering.

    python bench/passkey_corpus.py --out passkey.jsonl --documents 20000 --min-length 256 --max-length 2047
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from zoo.eval.recall import passkey_prompt
from zoo.tokenizer import ByteTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--documents", type=int, default=20_000)
    parser.add_argument("--min-length", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=2047)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    tokenizer = ByteTokenizer()
    rng = np.random.default_rng(args.seed)
    with open(args.out, "w") as out:
        for _ in range(args.documents):
            request = passkey_prompt(tokenizer, int(rng.integers(args.min_length, args.max_length + 1)),
                                     float(rng.uniform()), int(rng.integers(10_000, 100_000)))
            text = tokenizer.decode(list(request.context + request.continuation)) + ".\n"
            out.write(json.dumps({"text": text}) + "\n")


if __name__ == "__main__":
    main()
