"""Checkpoints: an Orbax CheckpointManager over RUN/checkpoints/<step>/, one directory per saved step,
holding everything needed to resume or to use the model:

  params        the float32 master parameters (sharded arrays; restorable onto any mesh)
  optimizer     {"step", "opt_state"}
  model_config  the ModelConfig as JSON (rebuilds the model with nothing else)
  tokenizer     the tokenizer as JSON (byte-level, or the whole Hugging Face tokenizer.json)
  progress      the train config, the data iterator's position and the last metrics
  origin        (models converted from Hugging Face) the original config.json and side files, which
                `zoo convert` needs to export the model back

Saves are asynchronous (training continues while the previous step is written) and atomic: Orbax
writes to a temporary directory and renames it when complete, so a run killed mid-save resumes from
the last complete checkpoint. Old steps beyond `keep` are deleted.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import NamedTuple

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from zoo.config import ModelConfig
from zoo.tokenizer import Tokenizer, tokenizer_from_dict
from zoo.train.mesh import LOGICAL_RULES, param_shardings
from zoo.train.step import boxed_abstract_params

ITEMS = ("params", "optimizer", "model_config", "tokenizer", "progress", "origin")
_JSON_ITEMS = ("model_config", "tokenizer", "progress", "origin")


@contextlib.contextmanager
def _no_read_only_notice():
    """Drops Orbax's "Given directory is read only" warning, logged for every manager opened read-only: that is how
    a finished run is loaded (eval, generation, conversion), and nothing is wrong then."""
    def keep(record):
        return not record.getMessage().startswith("Given directory is read only")

    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(keep)
    try:
        yield
    finally:
        absl_logger.removeFilter(keep)


class Checkpoints:
    """The training run's checkpoints under `directory` (RUN/checkpoints)."""

    def __init__(self, directory: str | Path, *, keep: int | None = 3, read_only: bool = False):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1,
            create=not read_only, read_only=read_only, enable_async_checkpointing=True,
        )
        with _no_read_only_notice():
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, model_config: ModelConfig, tokenizer: Tokenizer, progress: dict,
             origin: dict | None = None) -> None:
        """Starts an asynchronous save of the TrainState `state` at `step`. The arrays are copied
        off the devices before it returns, so the caller may donate them to the next step."""
        self._save(step, model_config, tokenizer, progress, origin, params=ocp.args.StandardSave(state.params),
                   optimizer=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}))

    def save_model(self, step: int, params, model_config: ModelConfig, tokenizer: Tokenizer, progress: dict,
                   origin: dict | None = None) -> None:
        """A model without optimizer state (a converted checkpoint): loadable, not resumable as a run."""
        self._save(step, model_config, tokenizer, progress, origin, params=ocp.args.StandardSave(params))

    def _save(self, step, model_config, tokenizer, progress, origin, **arrays) -> None:
        items = dict(arrays, model_config=ocp.args.JsonSave(model_config.to_dict()),
                     tokenizer=ocp.args.JsonSave(tokenizer.to_dict()), progress=ocp.args.JsonSave(progress))
        if origin is not None:
            items["origin"] = ocp.args.JsonSave(origin)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def read_json(self, step: int) -> dict:
        """model_config, tokenizer, progress and origin (None when not saved) of one step; no arrays are read."""
        saved = [k for k in _JSON_ITEMS if (self.directory / str(step) / k).is_dir()]
        out = self.manager.restore(step, args=ocp.args.Composite(**{k: ocp.args.JsonRestore() for k in saved}))
        return {k: out[k] if k in saved else None for k in _JSON_ITEMS}

    def restore_state(self, step: int, abstract_state):
        """The TrainState of `step`, placed as `abstract_state`'s ShapeDtypeStructs say (their
        shardings may be for a different mesh than the one that saved it)."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state.params),
            optimizer=ocp.args.StandardRestore({"step": abstract_state.step, "opt_state": abstract_state.opt_state}),
        ))
        return abstract_state.replace(params=out["params"], step=out["optimizer"]["step"],
                                      opt_state=out["optimizer"]["opt_state"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def locate(directory: str | Path) -> tuple[Path, int]:
    """(checkpoints directory, step) for a run directory (its latest step), a checkpoints directory
    (its latest step) or one step's directory."""
    path = Path(directory).expanduser().absolute()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or run directory")
    if (path / "params").is_dir() and path.name.isdigit():
        return path.parent, int(path.name)
    for candidate in (path / "checkpoints", path):
        steps = sorted(int(p.name) for p in candidate.iterdir() if p.name.isdigit() and (p / "params").is_dir()) \
            if candidate.is_dir() else []
        if steps:
            return candidate, steps[-1]
    raise FileNotFoundError(f"{path} holds no zoo checkpoint (expected checkpoints/<step>/params inside)")


class LoadedModel(NamedTuple):
    config: ModelConfig
    params: dict
    tokenizer: Tokenizer
    step: int  # 0 for a Hugging Face checkpoint
    origin: dict | None  # the Hugging Face files a converted model came from (HFOrigin.to_dict())


def load_model(directory: str | Path, mesh: Mesh | None = None, rules=LOGICAL_RULES) -> LoadedModel:
    """The model in a run, checkpoints or step directory, or in a Hugging Face checkpoint directory
    (converted on the fly), with the params placed on `mesh` by the logical rules (default: the first
    local device)."""
    from zoo.convert import import_hf, is_hf_checkpoint

    if is_hf_checkpoint(directory):
        config, params, tokenizer, origin = import_hf(directory, mesh)
        return LoadedModel(config, params, tokenizer, 0, origin.to_dict())
    root, step = locate(directory)
    checkpoints = Checkpoints(root, read_only=True)
    meta = checkpoints.read_json(step)
    config = ModelConfig.from_dict(meta["model_config"])
    boxed = boxed_abstract_params(config)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, boxed, is_leaf=lambda x: hasattr(x, "names"))
    else:
        shardings = param_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(lambda box, sh: jax.ShapeDtypeStruct(box.value.shape, box.value.dtype, sharding=sh),
                            boxed, shardings, is_leaf=lambda x: hasattr(x, "names"))
    params = checkpoints.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))
    checkpoints.close()
    return LoadedModel(config, params["params"], tokenizer_from_dict(meta["tokenizer"]), step, meta["origin"])
