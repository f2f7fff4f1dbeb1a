"""A directory of safetensors files as Hugging Face writes it: one `model.safetensors`, or shards named by
`model.safetensors.index.json` ({"weight_map": {tensor: file}}).

Reading goes one tensor at a time through memory maps, so a checkpoint is never whole in host memory.
Writing gathers tensors into shards of at most `max_shard_bytes`, writes them into a temporary directory
beside the target and renames it into place: a reader never sees half a checkpoint, and an existing
non-empty directory is never overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from zoo.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 2**30  # Hugging Face's default max_shard_size


class SafetensorsDir:
    """The tensors of a Hugging Face checkpoint directory, by name."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(index, f"not a safetensors index (expected {{'weight_map': ...}}; {e})") from None
            self.files = {name: self.directory / file for name, file in weight_map.items()}
        else:
            shards = sorted(self.directory.glob("*.safetensors"))
            if not shards:
                found = sorted(p.name for p in self.directory.iterdir()) if self.directory.is_dir() else []
                hint = " (PyTorch .bin checkpoints are not read: re-save with safe_serialization=True)" \
                    if any(n.endswith(".bin") for n in found) else ""
                raise CheckpointError(self.directory, f"no {SINGLE_FILE} or {INDEX_FILE}{hint}")
            self.files = {}
            for shard in shards:
                with self._open(shard) as f:
                    self.files.update(dict.fromkeys(f.keys(), shard))

    def _open(self, path: Path, tensor: str | None = None):
        if not path.is_file():
            raise CheckpointError(path, "the file is missing (named by the index)", tensor)
        try:
            return safe_open(path, framework="numpy")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(path, f"not a readable safetensors file ({e})", tensor) from None

    def names(self) -> set[str]:
        return set(self.files)

    def read(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Tensor `name`, checked against `shape` when given."""
        if name not in self.files:
            shards = sorted({p.name for p in self.files.values()})
            listed = ", ".join(shards[:3]) + (f" and {len(shards) - 3} more" if len(shards) > 3 else "")
            raise CheckpointError(self.directory, f"missing: none of the checkpoint's files ({listed}) holds it", name)
        path = self.files[name]
        with self._open(path, name) as f:
            if name not in f.keys():
                raise CheckpointError(path, "named by the index but not in the file", name)
            try:
                found = tuple(f.get_slice(name).get_shape())
                if shape is not None and found != tuple(shape):
                    raise CheckpointError(path, f"has shape {found}, the model expects {tuple(shape)}", name)
                return f.get_tensor(name)
            except SafetensorError as e:
                raise CheckpointError(path, f"cannot be read ({e})", name) from None


def write_safetensors_dir(directory: str | Path, tensors: Iterable[tuple[str, np.ndarray]], *,
                          extra_files: dict[str, str] | None = None,
                          max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write `tensors` (name, array), plus `extra_files` {file name: text}, as a new checkpoint directory.

    Holds at most one shard's tensors in memory. The directory must not exist or be empty."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} exists and is not empty; pick another output directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        shard_files, weight_map, total = [], {}, 0
        pending, pending_bytes = {}, 0

        def flush():
            nonlocal pending, pending_bytes
            if pending:
                name = f"shard-{len(shard_files):05d}.safetensors"
                save_file(pending, staging / name, metadata={"format": "pt"})
                shard_files.append((name, list(pending)))
                pending, pending_bytes = {}, 0

        for name, array in tensors:
            array = np.ascontiguousarray(array)
            if pending and pending_bytes + array.nbytes > max_shard_bytes:
                flush()
            pending[name] = array
            pending_bytes += array.nbytes
            total += array.nbytes
        flush()
        if len(shard_files) == 1:
            (staging / shard_files[0][0]).rename(staging / SINGLE_FILE)
        else:
            count = len(shard_files)
            for i, (temp_name, names) in enumerate(shard_files):
                final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
                (staging / temp_name).rename(staging / final)
                weight_map.update(dict.fromkeys(names, final))
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        for file_name, text in (extra_files or {}).items():
            (staging / file_name).write_text(text)
        if directory.exists():
            directory.rmdir()  # empty, checked above
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory
