"""Checkpoints: an Orbax CheckpointManager over RUN/checkpoints/<step>/, one directory per saved step,
holding everything needed to resume or to use the model:

  params        the float32 master parameters (sharded arrays; restorable onto any mesh)
  optimizer     {"step", "opt_state"}
  model_config  the ModelConfig as JSON (rebuilds the model with nothing else)
  tokenizer     the tokenizer as JSON (byte-level, or the whole Hugging Face tokenizer.json)
  progress      the train config, the data iterator's position and the last metrics

Saves are asynchronous (training continues while the previous step is written) and atomic: Orbax
writes to a temporary directory and renames it when complete, so a run killed mid-save resumes from
the last complete checkpoint. Old steps beyond `keep` are deleted.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from zoo.config import ModelConfig
from zoo.tokenizer import Tokenizer, tokenizer_from_dict
from zoo.train.mesh import LOGICAL_RULES, param_shardings
from zoo.train.step import boxed_abstract_params

ITEMS = ("params", "optimizer", "model_config", "tokenizer", "progress")
_JSON_ITEMS = ("model_config", "tokenizer", "progress")


class Checkpoints:
    """The training run's checkpoints under `directory` (RUN/checkpoints)."""

    def __init__(self, directory: str | Path, *, keep: int | None = 3, read_only: bool = False):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1,
            create=not read_only, read_only=read_only, enable_async_checkpointing=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, model_config: ModelConfig, tokenizer: Tokenizer, progress: dict) -> None:
        """Starts an asynchronous save of the TrainState `state` at `step`. The arrays are copied
        off the devices before it returns, so the caller may donate them to the next step."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                optimizer=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
                model_config=ocp.args.JsonSave(model_config.to_dict()),
                tokenizer=ocp.args.JsonSave(tokenizer.to_dict()),
                progress=ocp.args.JsonSave(progress),
            ),
            force=True,
        )

    def read_json(self, step: int) -> dict:
        """model_config, tokenizer and progress of one step (no arrays are read)."""
        out = self.manager.restore(step, args=ocp.args.Composite(**{k: ocp.args.JsonRestore() for k in _JSON_ITEMS}))
        return {k: out[k] for k in _JSON_ITEMS}

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


def load_model(directory: str | Path, mesh: Mesh | None = None, rules=LOGICAL_RULES):
    """(ModelConfig, params, tokenizer, step) from a run, checkpoints or step directory, with the
    params placed on `mesh` by the logical rules (default: the first local device)."""
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
    return config, params["params"], tokenizer_from_dict(meta["tokenizer"]), step
