"""Byte-level tokenizer: UTF-8 bytes are ids 0..255, then BOS, EOS and PAD. Needs no files."""

from __future__ import annotations


class ByteTokenizer:
    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259
    # Embedding rows padded to a multiple of 64 so the vocab axis shards evenly.
    padded_vocab_size = 320

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")
