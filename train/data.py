"""The data pipeline: text source -> tokens -> packed fixed-length rows -> shuffled, per-host batches
whose position is checkpointed, so a resumed run sees exactly the batches it would have seen.

Sources (all through `datasets`):
  "stdlib"                      the embedded default corpus (the Python standard library's source,
                                one document per module; held-out modules by a stable hash), offline
  a local .txt / .jsonl / .json / .parquet file, a directory of them, or a glob
                                .txt files are one document per file; json/parquet one per record
  anything else                 a Hugging Face Hub dataset name (needs the network or the HF cache)

Packing: each document is tokenized with BOS ... EOS, documents are concatenated and cut into rows of
seq_len + 1 tokens (the last row of each map batch padded), with per-row segment ids (1, 2, ... for
the documents in the row, 0 for padding). A batch's positions restart at 0 at every document start,
and a target only counts (weight 1) when it belongs to the same document as its input, so no
prediction ever crosses a document boundary.
"""

from __future__ import annotations

import glob
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from zoo.corpus import is_heldout, stdlib_sources
from zoo.errors import ConfigError
from zoo.tokenizer import Tokenizer

LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
EVAL_SPLITS = ("validation", "valid", "test")


@dataclass(frozen=True)
class DataConfig:
    source: str = "stdlib"
    eval_source: str = ""  # "" -> the source's own validation split, else a held-out tail of it
    tokenizer: str = "byte"  # "byte" or a path to a Hugging Face tokenizer.json
    seq_len: int = 256
    text_field: str = "text"  # the column holding text, for json / parquet / hub sources
    hub_config: str = ""  # a hub dataset's configuration name, e.g. "wikitext-103-raw-v1"
    eval_fraction: float = 0.02  # the tail of the packed rows held out when there is no eval split
    max_eval_rows: int = 1024
    shuffle_seed: int = 0

    def validate(self, field: str = "data") -> None:
        if self.seq_len < 2:
            raise ConfigError(f"{field}.seq_len", f"must be at least 2, got {self.seq_len}")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"{field}.eval_fraction", f"must be in (0, 1), got {self.eval_fraction}")
        if self.max_eval_rows < 1:
            raise ConfigError(f"{field}.max_eval_rows", f"must be positive, got {self.max_eval_rows}")


# --- sources ------------------------------------------------------------------------------------
def _stdlib_documents() -> tuple[datasets.Dataset, datasets.Dataset]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_sources(root)
    if not files:
        raise FileNotFoundError(f"no Python sources under {root}: cannot build the default corpus")
    split = {"train": [], "heldout": []}
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="replace")
        split["heldout" if is_heldout(path.relative_to(root).as_posix()) else "train"].append(text)
    return (datasets.Dataset.from_dict({"text": split["train"]}),
            datasets.Dataset.from_dict({"text": split["heldout"]}))


def _local_files(source: str) -> list[str] | None:
    """The files a local source names, or None when it names nothing on disk (then: a hub name)."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix in LOCAL_BUILDERS and p.is_file())
        if not files:
            raise FileNotFoundError(f"{path}: no {sorted(LOCAL_BUILDERS)} files inside")
        return files
    if path.is_file():
        return [str(path)]
    if any(c in source for c in "*?["):
        files = sorted(glob.glob(str(path), recursive=True))
        if not files:
            raise FileNotFoundError(f"{source}: the pattern matches no files")
        return files
    if path.suffix in LOCAL_BUILDERS or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{source}: no such file")
    return None


def _load_local(files: list[str], text_field: str) -> datasets.Dataset:
    kinds = {Path(f).suffix for f in files}
    unknown = kinds - set(LOCAL_BUILDERS)
    if unknown:
        raise ConfigError("data.source", f"unsupported file type {sorted(unknown)}; use {sorted(LOCAL_BUILDERS)}")
    builders = {LOCAL_BUILDERS[k] for k in kinds}
    if len(builders) > 1:
        raise ConfigError("data.source", f"mixed file types {sorted(kinds)} in one source; give one kind")
    builder = builders.pop()
    options = {"sample_by": "document"} if builder == "text" else {}
    try:
        ds = datasets.load_dataset(builder, data_files=files, split="train", **options)
    except Exception as e:  # datasets raises many types for unreadable files; name the files
        raise ValueError(f"could not read {files[0] if len(files) == 1 else f'{len(files)} files'}: {e}") from None
    return _text_column(ds, "text" if builder == "text" else text_field, files[0])


def _text_column(ds: datasets.Dataset, field: str, where: str) -> datasets.Dataset:
    if field not in ds.column_names:
        raise ConfigError("data.text_field", f"{where} has no column {field!r}; columns: {ds.column_names}")
    return ds.select_columns([field]).rename_column(field, "text") if field != "text" else ds.select_columns(["text"])


def _load_hub(name: str, config: str, text_field: str) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    try:
        splits = datasets.load_dataset(name, config or None)
    except Exception as e:
        raise ValueError(
            f"data source {name!r} is neither a local file nor a loadable Hugging Face Hub dataset ({e}). "
            "Offline? Give a local .txt / .jsonl / .parquet path, or 'stdlib' for the embedded corpus."
        ) from None
    if "train" not in splits:
        raise ConfigError("data.source", f"{name} has no 'train' split; splits: {list(splits)}")
    held = next((s for s in EVAL_SPLITS if s in splits), None)
    return (_text_column(splits["train"], text_field, name),
            None if held is None else _text_column(splits[held], text_field, f"{name}[{held}]"))


def load_documents(config: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train documents, held-out documents or None) as datasets with one "text" column."""
    if config.source == "stdlib":
        train, held = _stdlib_documents()
    elif (files := _local_files(config.source)) is not None:
        train, held = _load_local(files, config.text_field), None
    else:
        train, held = _load_hub(config.source, config.hub_config, config.text_field)
    if config.eval_source:
        files = _local_files(config.eval_source)
        held = (_load_local(files, config.text_field) if files is not None
                else _load_hub(config.eval_source, config.hub_config, config.text_field)[0])
    return train, held


# --- tokenize and pack ----------------------------------------------------------------------------
def pack_documents(docs: list[np.ndarray], row_len: int) -> dict[str, list[np.ndarray]]:
    """Concatenate documents and cut into rows of `row_len` tokens with per-row segment ids (1, 2, ...
    in order of appearance in the row; 0 pads the last row)."""
    if not docs:
        return {"tokens": [], "segments": []}
    tokens = np.concatenate(docs)
    doc_index = np.repeat(np.arange(len(docs), dtype=np.int64), [len(d) for d in docs])
    pad = -len(tokens) % row_len
    tokens = np.concatenate([tokens, np.zeros(pad, np.int32)]).reshape(-1, row_len)
    doc_index = np.concatenate([doc_index, np.full(pad, -1)]).reshape(-1, row_len)
    segments = doc_index - doc_index[:, :1] + 1  # documents are consecutive, so this numbers them 1, 2, ...
    segments = np.where(doc_index < 0, 0, segments).astype(np.int32)
    return {"tokens": list(tokens), "segments": list(segments)}


def tokenize_and_pack(docs: datasets.Dataset, tokenizer: Tokenizer, row_len: int, desc: str) -> datasets.Dataset:
    def pack(batch):
        return pack_documents([tokenizer.encode_document(t) for t in batch["text"] if t], row_len)

    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("int32"), length=row_len),
                                  "segments": datasets.Sequence(datasets.Value("int32"), length=row_len)})
    return docs.map(pack, batched=True, batch_size=1000, remove_columns=docs.column_names, features=features,
                    desc=desc).with_format("numpy")


@dataclass
class PackedData:
    train: datasets.Dataset  # rows of seq_len + 1 tokens: "tokens", "segments"
    heldout: datasets.Dataset
    heldout_origin: str  # where the held-out rows come from, for logs


def prepare(config: DataConfig, tokenizer: Tokenizer) -> PackedData:
    config.validate()
    train_docs, held_docs = load_documents(config)
    row_len = config.seq_len + 1
    train = tokenize_and_pack(train_docs, tokenizer, row_len, "packing train")
    if held_docs is not None:
        held = tokenize_and_pack(held_docs, tokenizer, row_len, "packing held-out")
        origin = "the source's held-out split" if not config.eval_source else config.eval_source
    else:
        count = min(config.max_eval_rows, max(1, round(len(train) * config.eval_fraction)))
        if len(train) - count < 1:
            raise ValueError(f"{config.source}: only {len(train)} rows of {row_len} tokens; too little to hold any out")
        held = train.select(range(len(train) - count, len(train)))
        train = train.select(range(len(train) - count))
        origin = f"the last {count} rows ({count * row_len:,} tokens) of the source, never trained on"
    if len(held) > config.max_eval_rows:
        # Evenly spaced, so a held-out set of many documents is represented throughout.
        held = held.select(np.linspace(0, len(held) - 1, config.max_eval_rows).astype(np.int64).tolist())
    return PackedData(train, held, origin)


# --- batches --------------------------------------------------------------------------------------
def rows_to_batch(tokens: np.ndarray, segments: np.ndarray) -> dict[str, np.ndarray]:
    """Packed rows [n, L + 1] -> the train step's batch of [n, L] arrays."""
    seg = segments[:, :-1]
    length = seg.shape[1]
    index = np.arange(length, dtype=np.int32)
    starts = np.ones_like(seg, dtype=bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    first = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "positions": (index - first).astype(np.int32),
        "segment_ids": seg.astype(np.int32),
        "weights": ((segments[:, 1:] == seg) & (seg > 0)).astype(np.float32),
    }


def fingerprint(rows: datasets.Dataset) -> str:
    """A cheap content check (row count + a CRC of a few rows) that a resumed run reads the same data."""
    picks = sorted({0, len(rows) // 2, len(rows) - 1})
    crc = zlib.crc32(np.ascontiguousarray(rows[picks]["tokens"]).tobytes())
    return f"{len(rows)}:{crc:08x}"


class BatchIterator:
    """Endless shuffled batches of this process's rows of each global batch. Epoch e visits the rows
    in the permutation seeded by (seed, e); a partial last batch is dropped. `state()` / `restore()`
    make the position part of a checkpoint."""

    def __init__(self, rows: datasets.Dataset, global_batch: int, seed: int, process_index: int = 0,
                 process_count: int = 1):
        if global_batch % process_count:
            raise ConfigError("batch_size", f"{global_batch} does not split over {process_count} hosts")
        if len(rows) < global_batch:
            raise ValueError(f"the data has {len(rows)} packed rows, fewer than one batch of {global_batch}; "
                             "use a smaller batch_size or seq_len, or more data")
        self.rows = rows
        self.global_batch = global_batch
        self.seed = seed
        self.local = slice(process_index * global_batch // process_count,
                           (process_index + 1) * global_batch // process_count)
        self.batches_per_epoch = len(rows) // global_batch
        self.epoch = 0
        self.batch = 0
        self._order = None
        self._fingerprint = fingerprint(rows)

    def _permutation(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, np.random.default_rng([self.seed, self.epoch]).permutation(len(self.rows)))
        return self._order[1]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        start = self.batch * self.global_batch
        indices = self._permutation()[start : start + self.global_batch][self.local]
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        picked = self.rows[np.sort(indices).tolist()]  # sorted reads are sequential in the Arrow file
        order = np.argsort(np.argsort(indices))
        return rows_to_batch(picked["tokens"][order], picked["segments"][order])

    def state(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "global_batch": self.global_batch,
                "fingerprint": self._fingerprint}

    def restore(self, state: dict) -> None:
        expected = {"seed": self.seed, "global_batch": self.global_batch, "fingerprint": self._fingerprint}
        changed = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"the data differs from the checkpoint's ({detail}); a resumed run would not see "
                             "the batches it would have seen")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


def heldout_batches(rows: datasets.Dataset, global_batch: int, process_index: int = 0, process_count: int = 1):
    """All held-out rows in order, in global batches (the last one padded with zero-weight rows)."""
    local = slice(process_index * global_batch // process_count, (process_index + 1) * global_batch // process_count)
    for start in range(0, len(rows), global_batch):
        picked = rows[start : start + global_batch]
        tokens, segments = picked["tokens"], picked["segments"]
        missing = global_batch - len(tokens)
        if missing:
            tokens = np.concatenate([tokens, np.zeros((missing, tokens.shape[1]), tokens.dtype)])
            segments = np.concatenate([segments, np.zeros((missing, segments.shape[1]), segments.dtype)])
        yield rows_to_batch(tokens[local], segments[local])
