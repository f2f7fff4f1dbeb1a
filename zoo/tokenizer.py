"""Tokenizers: the built-in byte-level one (needs no files) and any Hugging Face `tokenizer.json`
(through the `tokenizers` library). Both serialise to a JSON-able dict that is saved inside every
checkpoint, so a checkpoint directory alone can encode prompts and decode samples.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Tokens that Hugging Face tokenizers commonly use to end a document, most specific first.
_EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")
_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>")


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255, then BOS, EOS and PAD."""

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259
    # Embedding rows padded to a multiple of 64 so the vocab axis shards evenly.
    padded_vocab_size = 320

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_document(self, text: str) -> np.ndarray:
        """BOS + bytes + EOS, as int32: one training document."""
        body = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
        return np.concatenate([[self.bos_id], body, [self.eos_id]]).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"type": "byte"}


class HFTokenizer:
    """A Hugging Face fast tokenizer loaded from its `tokenizer.json`."""

    def __init__(self, tokenizer_json: str, source: str = "<string>"):
        from tokenizers import Tokenizer

        try:
            self._tokenizer = Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{source}: not a Hugging Face tokenizer.json ({e})") from None
        self._json = tokenizer_json
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._first_known(_EOS_CANDIDATES)
        self.bos_id = self._first_known(_BOS_CANDIDATES)
        pad = self._tokenizer.token_to_id("<pad>")
        # Padding is never a target (its weight is 0), so any id serves when the vocabulary has none.
        self.pad_id = pad if pad is not None else self.eos_id if self.eos_id is not None else 0

    @classmethod
    def from_file(cls, path: str | Path) -> "HFTokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        return cls(path.read_text(encoding="utf-8"), source=str(path))

    def _first_known(self, candidates) -> int | None:
        for token in candidates:
            if (i := self._tokenizer.token_to_id(token)) is not None:
                return i
        return None

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids + (
            [self.eos_id] if eos and self.eos_id is not None else []
        )

    def encode_document(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text, bos=True, eos=True), dtype=np.int32)

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids])

    def to_dict(self) -> dict:
        return {"type": "huggingface", "tokenizer_json": json.loads(self._json)}


Tokenizer = ByteTokenizer | HFTokenizer


def load_tokenizer(spec: str) -> Tokenizer:
    """"byte", or a path to a tokenizer.json (or a directory holding one)."""
    return ByteTokenizer() if spec == "byte" else HFTokenizer.from_file(spec)


def tokenizer_from_dict(data: dict) -> Tokenizer:
    kind = data.get("type")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "huggingface":
        return HFTokenizer(json.dumps(data["tokenizer_json"]), source="checkpoint tokenizer")
    raise ValueError(f"unknown tokenizer type {kind!r} (expected 'byte' or 'huggingface')")
