"""The training loop behind `zoo train`: build (or resume) a run, step, log, evaluate, checkpoint.

A run directory holds train_config.json, checkpoints/, metrics.jsonl, tensorboard/ and, at the end,
loss_curve.png. Running the same command again on a directory with checkpoints resumes from the
latest one: parameters, optimizer state and the data position are restored, so the resumed run
computes exactly the steps the uninterrupted run would have.

Device work is asynchronous: each step's metrics stay on the device until a log, eval or checkpoint
step fetches them all at once, so the host does not wait for every step. A checkpoint is only
written after its step's loss, gradient norm and new parameter norm are checked finite (the NaN
guard), so the last checkpoint is always a good one.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import flax.linen as nn
import jax
from tqdm.auto import tqdm

from zoo.model import count_params
from zoo.tokenizer import load_tokenizer
from zoo.train import data as data_lib
from zoo.train.checkpoint import Checkpoints
from zoo.train.config import RESUMABLE_FIELDS, TrainConfig
from zoo.train.mesh import data_parallel_size, make_mesh, parse_mesh
from zoo.train.metrics import MetricsLog, plot_loss_curve
from zoo.train.optim import learning_rate_schedule, make_optimizer
from zoo.train.step import (abstract_state, boxed_abstract_params, init_state, make_eval_step, make_train_step,
                            put_batch, state_shardings)

CONFIG_FILE = "train_config.json"


class TrainingDiverged(FloatingPointError):
    pass


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    train_loss: float
    heldout_loss: float
    initial_heldout_loss: float | None  # at step 0 of a fresh run
    checkpoint: Path | None
    stopped_early: bool = False  # SIGTERM / preemption: saved and stopped before `steps`


def _is_resume(config: TrainConfig, run_dir: Path) -> bool:
    """A run directory with a saved config is resumed, and may only change RESUMABLE_FIELDS."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        if run_dir.exists() and any(run_dir.iterdir()):
            raise FileExistsError(f"{run_dir} is not empty and holds no zoo run; pick a new --out")
        return False
    saved = TrainConfig.from_dict(json.loads(path.read_text()))
    changed = [k for k in config.differences(saved) if k.split(".")[0] not in RESUMABLE_FIELDS]
    if changed:
        raise ValueError(f"{run_dir} was started with different settings ({', '.join(changed)}); "
                         f"resume it with the same ones, or pick a new --out. May change on resume: "
                         f"{sorted(RESUMABLE_FIELDS)}")
    return True


class _StopRequest:
    """SIGTERM (a preempted TPU VM, a cancelled job) asks the loop to checkpoint and stop."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train(config: TrainConfig, run_dir: str | Path, *, log=print, progress: bool = True) -> TrainResult:
    config.validate()
    run_dir = Path(run_dir).absolute()
    resuming = _is_resume(config, run_dir)
    primary = jax.process_index() == 0
    mesh = make_mesh(parse_mesh(config.mesh))
    if config.batch_size % (data_parallel_size(mesh) * config.grad_accum):
        raise ValueError(f"batch_size {config.batch_size} must divide into grad_accum {config.grad_accum} micro-batches "
                         f"each split over the data x fsdp axes ({data_parallel_size(mesh)} devices)")
    tokenizer = load_tokenizer(config.data.tokenizer)
    model_config = config.model_config(tokenizer.vocab_size)
    log(f"model: {config.preset}, {count_params(model_config):,} parameters, compute {model_config.dtype}, "
        f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.default_backend()} devices "
        f"({jax.process_count()} process{'es' if jax.process_count() > 1 else ''})")

    data = data_lib.prepare(config.data, tokenizer)
    tokens_per_step = config.batch_size * config.data.seq_len
    log(f"data: {config.data.source}: {len(data.train):,} rows of {config.data.seq_len} tokens "
        f"({len(data.train) * config.data.seq_len / tokens_per_step:,.0f} steps an epoch); held out: {data.heldout_origin}")
    iterator = data_lib.BatchIterator(data.train, config.batch_size, config.data.shuffle_seed,
                                      jax.process_index(), jax.process_count())

    # Written once the settings have proved valid, so a mistyped command leaves no run behind.
    run_dir.mkdir(parents=True, exist_ok=True)
    if primary:
        tmp = run_dir / (CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps(config.to_dict(), indent=2))
        tmp.replace(run_dir / CONFIG_FILE)

    optimizer = make_optimizer(config.optim, config.steps, nn.unbox(boxed_abstract_params(model_config)))
    shardings = state_shardings(model_config, optimizer, mesh)
    checkpoints = Checkpoints(run_dir / "checkpoints", keep=config.keep_checkpoints)
    latest = checkpoints.latest_step()
    if resuming and latest is not None:
        state = checkpoints.restore_state(latest, abstract_state(model_config, optimizer, shardings))
        iterator.restore(checkpoints.read_json(latest)["progress"]["data"])
        log(f"resumed from {checkpoints.directory / str(latest)} (step {latest}, epoch {iterator.epoch})")
    else:
        state = init_state(model_config, optimizer, mesh, jax.random.key(config.seed), shardings)
    start = int(state.step)

    step_fn = make_train_step(model_config, optimizer, mesh, shardings, accumulate=config.grad_accum,
                              z_loss=config.optim.z_loss, remat=config.remat,
                              learning_rate=learning_rate_schedule(config.optim, config.steps))
    eval_fn = make_eval_step(model_config, mesh, shardings)
    metrics = MetricsLog(run_dir, enabled=primary)

    def heldout_loss(params) -> float:
        sums = [eval_fn(params, put_batch(b, mesh)) for b in data_lib.heldout_batches(
            data.heldout, config.batch_size, jax.process_index(), jax.process_count())]
        sums = jax.device_get(sums)
        return float(sum(s["ce"] for s in sums) / max(1.0, sum(s["weight"] for s in sums)))

    initial = None
    if not resuming or latest is None:
        initial = heldout_loss(state.params)
        metrics.write("eval", 0, {"loss": initial})
        log(f"held-out loss at step 0: {initial:.4f}")
    else:
        metrics.write("event", start, {"resumed_from": latest})

    bar = tqdm(total=config.steps, initial=start, desc="training", unit="step", dynamic_ncols=True,
               disable=not (progress and primary))
    pending: list = []
    postfix: dict = {}
    last_flush, last_flush_step = None, start
    train_loss, held, saved, stopped = float("nan"), float("nan"), None, False

    def flush(step: int) -> None:
        """Fetch the pending steps' metrics, log them, and stop on a non-finite loss."""
        nonlocal pending, last_flush, last_flush_step, train_loss
        fetched = jax.device_get(pending)
        pending = []
        now = time.perf_counter()
        rate = None
        if last_flush is not None:  # the first interval includes compilation: no rate for it
            rate = (step - last_flush_step) * tokens_per_step / (now - last_flush)
        first = step - len(fetched) + 1
        for offset, m in enumerate(fetched):
            values = {k: float(v) for k, v in m.items()}
            if not all(math.isfinite(v) for v in values.values()):
                metrics.write("event", first + offset, {"diverged": True, **values})
                raise TrainingDiverged(
                    f"step {first + offset}: loss {values['loss']}, gradient norm {values['grad_norm']}, "
                    f"parameter norm {values['param_norm']}; "
                    f"training stopped. The last good checkpoint is step {checkpoints.latest_step()} in "
                    f"{checkpoints.directory}. Lower optim.learning_rate, raise optim.warmup_steps, or set "
                    "optim.z_loss (e.g. 1e-4), then resume from it with the same command."
                )
            if rate is not None and offset == len(fetched) - 1:
                values["tokens_per_s"] = rate
            metrics.write("train", first + offset, values)
        train_loss = float(fetched[-1]["loss"])
        last_flush, last_flush_step = now, step
        bar.update(step - bar.n)
        postfix["loss"] = f"{train_loss:.3f}"
        if rate is not None:
            postfix["tok/s"] = f"{rate:,.0f}"
        bar.set_postfix(postfix)

    def progress_record(step: int) -> dict:
        return {"step": step, "data": iterator.state(), "train_config": config.to_dict(),
                "train_loss": train_loss, "heldout_loss": held}

    try:
        with _StopRequest() as stop:
            for step in range(start + 1, config.steps + 1):
                state, m = step_fn(state, put_batch(next(iterator), mesh))
                pending.append(m)
                last = step == config.steps
                save = last or step % config.checkpoint_every == 0 or stop.requested
                evaluate = last or step % config.eval_every == 0
                if save or evaluate or step % config.log_every == 0:
                    flush(step)
                if evaluate:
                    held = heldout_loss(state.params)
                    metrics.write("eval", step, {"loss": held})
                    postfix["held-out"] = f"{held:.3f}"
                    bar.set_postfix(postfix)
                if save:
                    checkpoints.save(step, state, model_config, tokenizer, progress_record(step))
                    saved = checkpoints.directory / str(step)
                if (evaluate or save) and last_flush is not None:
                    last_flush = time.perf_counter()  # tokens/s measures training, not these pauses
                if stop.requested and not last:
                    stopped = True
                    log(f"\nSIGTERM: saved step {step}; resume with the same command")
                    break
    finally:
        bar.close()
        checkpoints.wait()
        checkpoints.close()
        metrics.close()
        if primary:
            plot_loss_curve(run_dir)
    final_step = int(state.step)
    log(f"step {final_step}: train loss {train_loss:.4f}, held-out loss {held:.4f}; run: {run_dir}")
    return TrainResult(run_dir, final_step, train_loss, held, initial, saved, stopped)
