"""The embedded default corpus: the Python standard library's own source, which every machine with
Python has, offline. Split by module (a stable hash of the module path) into train and held-out, so
no file contributes to both."""

from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SKIPPED_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo"}


@dataclass(frozen=True)
class Corpus:
    train: np.ndarray  # uint8 bytes
    heldout: np.ndarray
    train_files: int
    heldout_files: int
    root: str


def stdlib_sources(root: Path | None = None) -> list[Path]:
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not SKIPPED_DIRS & set(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_heldout(relative_path: str, heldout_percent: int = 10) -> bool:
    return zlib.crc32(relative_path.encode()) % 100 < heldout_percent


def load_stdlib_corpus(max_train_bytes: int = 8_000_000, max_heldout_bytes: int = 1_000_000,
                       root: Path | None = None) -> Corpus:
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = stdlib_sources(root)
    if not files:
        raise FileNotFoundError(f"no Python sources under {root}: cannot build the default corpus")
    parts = {"train": [], "heldout": []}
    sizes = {"train": 0, "heldout": 0}
    limits = {"train": max_train_bytes, "heldout": max_heldout_bytes}
    counts = {"train": 0, "heldout": 0}
    for path in files:
        split = "heldout" if is_heldout(path.relative_to(root).as_posix()) else "train"
        if sizes[split] >= limits[split]:
            continue
        data = path.read_bytes() + b"\n"
        parts[split].append(data)
        sizes[split] += len(data)
        counts[split] += 1
    as_array = {k: np.frombuffer(b"".join(v)[: limits[k]], dtype=np.uint8) for k, v in parts.items()}
    return Corpus(as_array["train"], as_array["heldout"], counts["train"], counts["heldout"], str(root))
