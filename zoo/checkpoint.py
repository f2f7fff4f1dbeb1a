"""Checkpoints: params through Orbax (atomic: written to a temporary directory, then renamed) and
the model config as config.json beside them, so a checkpoint directory alone rebuilds the model.

The training issue replaces this with a CheckpointManager that also holds optimizer and data state.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from zoo.config import ModelConfig
from zoo.model import param_shapes


def save(directory: str | Path, params, config: ModelConfig, metadata: dict | None = None) -> Path:
    directory = Path(directory).absolute()
    if directory.exists():
        raise FileExistsError(f"{directory} exists; refusing to overwrite a checkpoint")
    directory.mkdir(parents=True)
    config.save(directory / "config.json")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "params", params)
        checkpointer.wait_until_finished()
    if metadata is not None:
        (directory / "metadata.json").write_text(json.dumps(metadata, indent=2))
    return directory


def load(directory: str | Path):
    """Returns (config, params) from a directory written by `save`."""
    directory = Path(directory).absolute()
    if not (directory / "params").is_dir():
        raise FileNotFoundError(f"{directory} is not a zoo checkpoint (no params/ inside)")
    config = ModelConfig.load(directory / "config.json")
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), param_shapes(config))
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(directory / "params", abstract)
    return config, params
