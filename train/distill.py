"""Staged distillation of a transformer teacher into a student: a hybrid whose chosen attention layers become
recurrent layers initialised from them (zoo.recurrent_init), or an MLA conversion (zoo.mla_conversion). The
stages follow MOHAWK (Bick et al. 2024, arXiv 2408.10189) and its successors; each runs for its own number of
steps with a fresh optimizer over its trainable group, every other parameter frozen:

  mixer  each replaced layer's mixer, fed the teacher's normalised input to that layer, against the teacher
         mixer's output (alignment MSE, averaged over the replaced layers); trains the replaced mixers
  block  each replaced layer's whole block (mixer, norms, MLP), fed the teacher's input to that block, against
         the teacher block's output; trains the replaced blocks
  kl     the whole student against the teacher's next-token distribution: T^2 KL(teacher || student) at
         temperature T (optionally over the teacher's top-k logits only), plus ce_weight x cross-entropy on the
         data; trains every parameter (kl_trainable="all") or the replaced blocks only ("replaced")

Teacher and student live on one mesh, sharded by the same logical rules; the teacher is only run forward. A
run directory holds distill_config.json, checkpoints/ (the student, loadable like any zoo checkpoint),
metrics.jsonl (with each record's stage), tensorboard/ and distill_summary.json. Running the same command on a
directory with checkpoints resumes from the latest one, in its stage, at its data position.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from zoo.config import ModelConfig
from zoo.errors import ConfigError
from zoo.layers import MIXERS
from zoo.model import Block, DecoderLM, count_params, decode_state_bytes
from zoo.pallas_kernels.dispatch import IMPLS
from zoo.train import data as data_lib
from zoo.train.checkpoint import Checkpoints, load_model
from zoo.train.distill_losses import alignment_mse, logit_kl
from zoo.train.mesh import (LOGICAL_RULES, data_parallel_size, host_array, make_mesh, param_shardings,
                            parse_mesh)
from zoo.train.metrics import MetricsLog, plot_loss_curve
from zoo.train.optim import OptimConfig, make_optimizer
from zoo.train.step import TrainState, boxed_abstract_params, put_batch, token_losses

STAGES = ("mixer", "block", "kl")
CONFIG_FILE = "distill_config.json"
SUMMARY_FILE = "distill_summary.json"


@dataclass(frozen=True)
class DistillConfig:
    teacher: str  # a zoo checkpoint (run, checkpoints or step directory) or a Hugging Face directory
    student_pattern: str = ""  # one letter per layer (zoo.recurrent_init.LETTERS), repeated to the depth
    window: int | None = None  # the window of S layers
    mla_rank: int | None = None  # instead of a pattern: every attention layer to MLA at this rank (0: full)
    rope_pairs: int = 4  # MLA: RoPE pairs kept per KV head
    stages: tuple[str, ...] = STAGES
    stage_steps: tuple[int, ...] = (100, 100, 400)
    temperature: float = 1.0
    top_k: int | None = None  # kl: the teacher's top-k logits only
    ce_weight: float = 0.0  # kl: weight of the data's cross-entropy
    kl_trainable: str = "all"  # "all" or "replaced"
    batch_size: int = 16
    seed: int = 0
    mesh: str = ""
    kernel_impl: str = "auto"  # teacher's and student's kernels: auto (Pallas on GPU/TPU), xla, pallas, interpret
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 200
    data: data_lib.DataConfig = field(default_factory=data_lib.DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(learning_rate=1e-3, warmup_steps=20))

    def __post_init__(self):
        object.__setattr__(self, "stages", tuple(self.stages))
        object.__setattr__(self, "stage_steps", tuple(int(s) for s in self.stage_steps))

    def validate(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if not self.stages or unknown:
            raise ConfigError("stages", f"must be a non-empty list of {STAGES}, got {list(self.stages)}")
        if len(self.stage_steps) != len(self.stages) or min(self.stage_steps) < 1:
            raise ConfigError("stage_steps", f"need one positive step count per stage ({len(self.stages)}), "
                                             f"got {list(self.stage_steps)}")
        if bool(self.student_pattern.strip("A")) == (self.mla_rank is not None):
            raise ConfigError("student_pattern", "give a pattern that replaces layers (letters S, M, G, R, X) or "
                                                 "mla_rank, exactly one of them")
        if self.kl_trainable not in ("all", "replaced"):
            raise ConfigError("kl_trainable", f"must be 'all' or 'replaced', got {self.kl_trainable!r}")
        if self.temperature <= 0:
            raise ConfigError("temperature", f"must be positive, got {self.temperature}")
        if self.kernel_impl not in IMPLS:
            raise ConfigError("kernel_impl", f"must be one of {IMPLS}, got {self.kernel_impl!r}")
        for name in ("batch_size", "log_every", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be positive, got {getattr(self, name)}")
        self.data.validate()
        self.optim.validate()

    @property
    def total_steps(self) -> int:
        return sum(self.stage_steps)

    def stage_at(self, step: int) -> int:
        """The index of the stage that global step `step` (1-based) belongs to."""
        return int(np.searchsorted(np.cumsum(self.stage_steps), step))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "DistillConfig":
        raw = dict(raw)
        raw["data"] = data_lib.DataConfig(**raw.get("data", {}))
        raw["optim"] = OptimConfig(**raw.get("optim", {}))
        return cls(**raw)


# --- the student ------------------------------------------------------------------------------------------

def build_student(config: DistillConfig, teacher_config: ModelConfig, teacher_params) -> tuple[ModelConfig, dict, list]:
    """(student config, host params, replaced layer indices), from the teacher's weights."""
    if config.mla_rank is not None:
        from zoo.mla_conversion import MLAConversion, convert_model

        student, params, reports = convert_model(teacher_config, teacher_params,
                                                 MLAConversion(rank=config.mla_rank or None, rope_pairs=config.rope_pairs))
        return student, params, [r["layer"] for r in reports]
    from zoo.recurrent_init import hybrid_from_attention, layout_from_pattern

    layout = layout_from_pattern(config.student_pattern, teacher_config.n_layers)
    student, params, replaced = hybrid_from_attention(teacher_config, teacher_params, layout,
                                                      jax.random.key(config.seed), window=config.window)
    windowed = [i for i, kind in enumerate(layout) if kind == "sliding"]
    return student, params, sorted(replaced + windowed)


def trainable_labels(params: dict, stage: str, replaced: list[int], kl_trainable: str) -> dict:
    """"train" / "freeze" for every parameter leaf in the stage."""
    def label(path, _):
        top = path[0].key
        if stage == "kl" and kl_trainable == "all":
            return "train"
        if top not in {f"layer_{i}" for i in replaced}:
            return "freeze"
        return "train" if stage != "mixer" or path[1].key == "mixer" else "freeze"

    return jax.tree_util.tree_map_with_path(label, params)


# --- losses -------------------------------------------------------------------------------------------------

def _capture(teacher_config, teacher_params, batch, layers: set[str], inner: tuple[str, ...]):
    """The teacher's logits and the outputs of `layers` (block names) and of their submodules named `inner`."""
    def wanted(module, method):
        path = module.path
        return method == "__call__" and len(path) >= 1 and path[0] in layers and (len(path) == 1 or path[-1] in inner)

    logits, state = DecoderLM(teacher_config).apply(
        {"params": teacher_params}, batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"],
        capture_intermediates=wanted, mutable=["intermediates"])
    return jax.lax.stop_gradient(logits), jax.lax.stop_gradient(state["intermediates"])


def stage_loss(stage: str, config: DistillConfig, teacher_config: ModelConfig, student_config: ModelConfig,
               replaced: list[int]):
    """loss(student_params, teacher_params, batch) -> (mean loss, metrics) for one stage."""
    dtype, param_dtype = jnp.dtype(student_config.dtype), jnp.dtype(student_config.param_dtype)

    def loss(params, teacher_params, batch):
        weights = batch["weights"].astype(jnp.float32)
        total = jnp.maximum(jnp.sum(weights), 1.0)
        where = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
        if stage == "kl":
            teacher_logits = jax.lax.stop_gradient(DecoderLM(teacher_config).apply(
                {"params": teacher_params}, batch["inputs"], **where)[0])
            logits = DecoderLM(student_config).apply({"params": params}, batch["inputs"], **where)[0]
            kl = logit_kl(teacher_logits, logits, weights, temperature=config.temperature, top_k=config.top_k) / total
            ce = jnp.sum(token_losses(logits, batch["targets"])[0] * weights) / total
            return kl + config.ce_weight * ce, {"kl": kl, "ce": ce}
        blocks = {f"layer_{i}" for i in replaced}
        if stage == "block":  # each replaced block's input is the previous block's output
            blocks |= {f"layer_{i - 1}" for i in replaced if i > 0}
        _, captured = _capture(teacher_config, teacher_params, batch, blocks, ("mixer", "mixer_norm"))
        mse = 0.0
        for i in replaced:
            name, layer = f"layer_{i}", student_config.layers[i]
            if stage == "mixer":
                x = captured[name]["mixer_norm"]["__call__"][0]
                target = captured[name]["mixer"]["__call__"][0][0]
                mixer = MIXERS[layer.mixer].module(layer.mixer_config, student_config.d_model, dtype=dtype,
                                                   param_dtype=param_dtype)
                out = mixer.apply({"params": params[name]["mixer"]}, x, **where)[0]
            else:
                x = (jnp.take(teacher_params["embed"], batch["inputs"], axis=0).astype(dtype) if i == 0
                     else captured[f"layer_{i - 1}"]["__call__"][0][0])
                target = captured[name]["__call__"][0][0]
                out = Block(student_config, i).apply({"params": params[name]}, x, batch["positions"],
                                                     batch["segment_ids"])[0]
            mse = mse + alignment_mse(out, target, weights) / total
        mse = mse / len(replaced)
        return mse, {"mse": mse}

    return loss


# --- the loop -----------------------------------------------------------------------------------------------

@functools.cache
def _ce_sums(config: ModelConfig):
    """One jitted held-out cross-entropy per model config (compiled once, reused at every evaluation)."""
    def sums(params, batch):
        logits = DecoderLM(config).apply({"params": params}, batch["inputs"], positions=batch["positions"],
                                         segment_ids=batch["segment_ids"])[0]
        w = batch["weights"].astype(jnp.float32)
        return jnp.sum(token_losses(logits, batch["targets"])[0] * w), jnp.sum(w)

    return jax.jit(sums)


def heldout_ce(config: ModelConfig, params, data, batch_size, mesh) -> float:
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        parts = [_ce_sums(config)(params, put_batch(b, mesh)) for b in data_lib.heldout_batches(
            data.heldout, batch_size, jax.process_index(), jax.process_count())]
    parts = jax.device_get(parts)
    return float(sum(p[0] for p in parts) / max(1.0, sum(p[1] for p in parts)))


@functools.cache
def _stage_optimizer(config: DistillConfig, stage_index: int, student_config: ModelConfig, replaced: tuple[int, ...]):
    """The stage's optimizer: AdamW on its trainable group, nothing on the rest (one per stage and run)."""
    params = nn.unbox(boxed_abstract_params(student_config))
    labels = trainable_labels(params, config.stages[stage_index], list(replaced), config.kl_trainable)
    inner = make_optimizer(config.optim, config.stage_steps[stage_index], params)
    return optax.multi_transform({"train": inner, "freeze": optax.set_to_zero()}, labels)


@functools.cache
def _optimizer_init(optimizer):
    return jax.jit(optimizer.init)


@functools.cache
def _stage_step(config: DistillConfig, stage_index: int, teacher_config: ModelConfig, student_config: ModelConfig,
                replaced: tuple[int, ...], mesh):
    """The jitted (state, teacher_params, batch) -> (state, metrics) of one stage, built (and compiled) once."""
    loss = stage_loss(config.stages[stage_index], config, teacher_config, student_config, list(replaced))
    optimizer = _stage_optimizer(config, stage_index, student_config, replaced)

    def step(state: TrainState, teacher_params, batch):
        (value, parts), grads = jax.value_and_grad(loss, has_aux=True)(state.params, teacher_params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": value, **parts, "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    jitted = jax.jit(step, donate_argnums=0)

    def call(*args):
        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
            return jitted(*args)

    return call


def distill(config: DistillConfig, run_dir: str | Path, *, log=print, progress: bool = True,
            student: tuple[ModelConfig, dict, list[int]] | None = None) -> dict:
    """Run (or resume) a distillation; returns the summary written to distill_summary.json. `student` (config,
    host params, layers to align), when given, replaces the one build_student makes from the teacher (an
    incremental round starts from the previous round's student: zoo.train.incremental)."""
    config.validate()
    run_dir = Path(run_dir).absolute()
    saved_config = run_dir / CONFIG_FILE
    if saved_config.is_file():
        saved = DistillConfig.from_dict(json.loads(saved_config.read_text()))
        fixed = {k for k in config.to_dict()
                 if k not in ("log_every", "eval_every", "checkpoint_every", "mesh", "kernel_impl")}
        changed = sorted(k for k in fixed if config.to_dict()[k] != saved.to_dict()[k])
        if changed:
            raise ValueError(f"{run_dir} was started with different settings ({', '.join(changed)}); resume with the "
                             "same ones or pick a new --out")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"{run_dir} is not empty and holds no distillation run; pick a new --out")
    mesh = make_mesh(parse_mesh(config.mesh))
    if config.batch_size % data_parallel_size(mesh):
        raise ValueError(f"batch_size {config.batch_size} must split over the data x fsdp axes "
                         f"({data_parallel_size(mesh)} devices)")
    teacher = load_model(config.teacher, mesh)
    student_config, host_params, replaced = student or build_student(config, teacher.config, teacher.params)
    replaced = tuple(replaced)
    # Both models run on the requested kernels; the student is saved with the config it was built with.
    teacher_run, student_run = (c if config.kernel_impl == "auto" else c.with_kernel_impl(config.kernel_impl)
                                for c in (teacher.config, student_config))
    log(f"teacher: {config.teacher} ({count_params(teacher.config):,} parameters); student: "
        f"{[l.mixer for l in student_config.layers]} ({count_params(student_config):,} parameters), "
        f"distilled layers {list(replaced)}")
    shardings = param_shardings(boxed_abstract_params(student_config), mesh)
    params = jax.tree.map(lambda x, s: jax.device_put(host_array(x).astype(student_config.param_dtype), s), host_params,
                          shardings)

    data = data_lib.prepare(config.data, teacher.tokenizer)  # the teacher's tokenizer, whatever data.tokenizer says
    iterator = data_lib.BatchIterator(data.train, config.batch_size, config.data.shuffle_seed, jax.process_index(),
                                      jax.process_count())
    run_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        saved_config.write_text(json.dumps(config.to_dict(), indent=2))
    checkpoints = Checkpoints(run_dir / "checkpoints")
    metrics = MetricsLog(run_dir, enabled=jax.process_index() == 0)
    start = checkpoints.latest_step() or 0
    stage_index = config.stage_at(start) if start else 0  # the stage whose optimizer state the checkpoint holds
    optimizer = _stage_optimizer(config, stage_index, student_run, replaced)
    state = TrainState(step=jnp.asarray(start, jnp.int32), params=params, opt_state=_optimizer_init(optimizer)(params))
    if start:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        state = checkpoints.restore_state(start, abstract)
        iterator.restore(checkpoints.read_json(start)["progress"]["data"])
        log(f"resumed from {checkpoints.directory / str(start)} (step {start}, stage {config.stages[stage_index]})")

    teacher_ce = heldout_ce(teacher_run, teacher.params, data, config.batch_size, mesh)
    summary_path = run_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {
        "teacher_heldout_ce": teacher_ce, "stages": []}
    if not start:
        summary["student_heldout_ce_at_init"] = heldout_ce(student_run, state.params, data, config.batch_size, mesh)
        log(f"held-out cross-entropy: teacher {teacher_ce:.4f}, student at initialisation "
            f"{summary['student_heldout_ce_at_init']:.4f}")
    tokens_per_step = config.batch_size * config.data.seq_len
    bar = tqdm(total=config.total_steps, initial=start, desc="distilling", unit="step", dynamic_ncols=True,
               disable=not (progress and jax.process_index() == 0))
    ends = np.cumsum(config.stage_steps)
    try:
        for index in range(stage_index, len(config.stages)):
            stage = config.stages[index]
            if index != stage_index:  # a new stage: its own trainable group and a fresh optimizer
                optimizer = _stage_optimizer(config, index, student_run, replaced)
                state = TrainState(step=state.step, params=state.params, opt_state=_optimizer_init(optimizer)(state.params))
            step_fn = _stage_step(config, index, teacher_run, student_run, replaced, mesh)
            stage_start = time.perf_counter()
            first = int(state.step) + 1
            for step in range(first, int(ends[index]) + 1):
                state, m = step_fn(state, teacher.params, put_batch(next(iterator), mesh))
                last_of_stage = step == ends[index]
                if step % config.log_every == 0 or last_of_stage:
                    values = {k: float(v) for k, v in jax.device_get(m).items()}
                    if not all(math.isfinite(v) for v in values.values()):
                        raise FloatingPointError(f"step {step} ({stage}): {values}; the last good checkpoint is step "
                                                 f"{checkpoints.latest_step()} in {checkpoints.directory}")
                    metrics.write("train", step, {"stage": stage, **values})
                    bar.set_postfix(stage=stage, loss=f"{values['loss']:.4f}")
                if step % config.eval_every == 0 or last_of_stage:
                    held = heldout_ce(student_run, state.params, data, config.batch_size, mesh)
                    metrics.write("eval", step, {"stage": stage, "loss": held})
                if step % config.checkpoint_every == 0 or last_of_stage:
                    checkpoints.save(step, state, student_config, teacher.tokenizer,
                                     {"step": step, "stage": stage, "data": iterator.state(),
                                      "distill_config": config.to_dict()})
                if last_of_stage:
                    summary["stages"] = [s for s in summary["stages"] if s["stage_index"] != index] + [{
                        "stage_index": index, "stage": stage, "steps": config.stage_steps[index],
                        "tokens": config.stage_steps[index] * tokens_per_step, "final_loss": values["loss"],
                        "student_heldout_ce": held,
                        "seconds": round(time.perf_counter() - stage_start, 1)}]  # of this process: compile included
                bar.update(1)
    finally:
        bar.close()
        checkpoints.wait()
        checkpoints.close()
        metrics.close()
        if jax.process_index() == 0:
            plot_loss_curve(run_dir)
    context = 32768
    summary.update({
        "teacher": config.teacher, "student_layers": [l.mixer for l in student_config.layers],
        "teacher_params": count_params(teacher.config), "student_params": count_params(student_config),
        "teacher_state_bytes_32k": sum(decode_state_bytes(teacher.config, context).values()),
        "student_state_bytes_32k": sum(decode_state_bytes(student_config, context).values()),
        "student_heldout_ce": summary["stages"][-1]["student_heldout_ce"] if summary["stages"] else None,
    })
    summary["retained"] = math.exp(summary["teacher_heldout_ce"]) / math.exp(summary["student_heldout_ce"])
    if jax.process_index() == 0:
        summary_path.write_text(json.dumps(summary, indent=2))
    log(f"held-out perplexity: teacher {math.exp(teacher_ce):.3f}, student {math.exp(summary['student_heldout_ce']):.3f}"
        f" ({summary['retained']:.1%} retained); run: {run_dir}")
    return summary
