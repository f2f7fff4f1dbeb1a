"""The sharded train state and the jitted train / eval steps (the pjit model: every input and output
has an explicit NamedSharding, and XLA's SPMD partitioner inserts the collectives).

A batch is a dict of [batch, length] arrays (train.data.Batch): inputs, targets, positions,
segment_ids and per-target weights (0 where a target crosses a document boundary or is padding).
The loss is the weight-normalised next-token cross-entropy over the whole global batch, so gradient
accumulation over micro-batches is the same computation as one big batch.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from zoo.config import ModelConfig
from zoo.model import DecoderLM
from zoo.train.mesh import BATCH_AXES, LOGICAL_RULES, batch_sharding, param_shardings, replicated

BATCH_FIELDS = ("inputs", "targets", "positions", "segment_ids", "weights")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any
    opt_state: Any


def boxed_abstract_params(config: ModelConfig):
    """Parameter shapes with their logical-axis boxes (nothing is allocated)."""
    model = DecoderLM(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]


def state_shardings(config: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedShardings for every leaf of the TrainState: params by their logical axes, the optimizer's
    copies of the params (Adam's moments) like the params, its scalars (counts) replicated."""
    boxed = boxed_abstract_params(config)
    params = param_shardings(boxed, mesh, rules)
    abstract_opt = jax.eval_shape(optimizer.init, nn.unbox(boxed))
    opt = optax.tree_utils.tree_map_params(
        optimizer, lambda _, sharding: sharding, abstract_opt, params,
        transform_non_params=lambda _: replicated(mesh),
    )
    return TrainState(step=replicated(mesh), params=params, opt_state=opt)


def abstract_state(config: ModelConfig, optimizer, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs carrying their target shardings: what a checkpoint restores into."""
    params = nn.unbox(boxed_abstract_params(config))
    shapes = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=jax.eval_shape(optimizer.init, params)
    )
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def init_state(config: ModelConfig, optimizer, mesh: Mesh, key: jax.Array, shardings: TrainState) -> TrainState:
    """Parameters initialised directly in their shards (no device ever holds the whole model)."""
    model = DecoderLM(config)

    def init(key):
        params = nn.unbox(model.init(key, jnp.zeros((1, 8), jnp.int32))["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

    with jax.set_mesh(mesh):
        return jax.jit(init, out_shardings=shardings)(key)


def token_losses(logits: jax.Array, targets: jax.Array):
    """Per-token cross-entropy and log-partition (for z-loss), in float32."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - target_logit, log_z


def _forward_sums(model: DecoderLM, params, batch, z_loss: float):
    logits, _ = model.apply(
        {"params": params}, batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"]
    )
    ce, log_z = token_losses(logits, batch["targets"])
    w = batch["weights"].astype(jnp.float32)
    return {"ce": jnp.sum(ce * w), "z": z_loss * jnp.sum(jnp.square(log_z) * w), "weight": jnp.sum(w)}


def _microbatches(batch, accumulate: int):
    """[B, L] -> [accumulate, B / accumulate, L]; micro-batch j holds rows j, j + accumulate, ... so
    that each device's rows stay on it (a row split, not a shuffle across the batch sharding)."""
    def split(x):
        x = x.reshape(x.shape[0] // accumulate, accumulate, *x.shape[1:])
        x = jax.lax.with_sharding_constraint(x, PartitionSpec(BATCH_AXES))
        return jnp.swapaxes(x, 0, 1)

    return {k: split(v) for k, v in batch.items()}


def make_train_step(config: ModelConfig, optimizer, mesh: Mesh, shardings: TrainState, *, accumulate: int = 1,
                    z_loss: float = 0.0, learning_rate=None, remat: str = "none", rules=LOGICAL_RULES):
    """The jitted step (state, batch) -> (state, metrics). The state's buffers are donated.
    `remat`: zoo.model.REMAT_POLICIES (activation memory against recomputation)."""
    model = DecoderLM(config, remat=remat)

    def micro_grads(params, micro, total_weight):
        def loss(params):
            sums = _forward_sums(model, params, micro, z_loss)
            return (sums["ce"] + sums["z"]) / total_weight, sums

        return jax.grad(loss, has_aux=True)(params)

    def step(state: TrainState, batch):
        total_weight = jnp.maximum(jnp.sum(batch["weights"].astype(jnp.float32)), 1.0)
        if accumulate == 1:
            grads, sums = micro_grads(state.params, batch, total_weight)
        else:
            def body(carry, micro):
                grads, sums = micro_grads(state.params, micro, total_weight)
                return jax.tree.map(jnp.add, carry, (grads, sums)), None

            zero = (jax.tree.map(jnp.zeros_like, state.params),
                    {k: jnp.zeros((), jnp.float32) for k in ("ce", "z", "weight")})
            (grads, sums), _ = jax.lax.scan(body, zero, _microbatches(batch, accumulate))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                               opt_state=opt_state)
        metrics = {
            "loss": sums["ce"] / total_weight,
            "z_loss": sums["z"] / total_weight,
            "grad_norm": optax.tree.norm(grads),
            "update_norm": optax.tree.norm(updates),
            "param_norm": optax.tree.norm(new_state.params),  # finite iff every new parameter is
            "tokens": sums["weight"],
        }
        if learning_rate is not None:
            metrics["learning_rate"] = learning_rate(state.step)
        return new_state, metrics

    data = {k: batch_sharding(mesh) for k in BATCH_FIELDS}
    jitted = jax.jit(step, in_shardings=(shardings, data), out_shardings=(shardings, replicated(mesh)),
                     donate_argnums=0)
    return _under(mesh, rules, jitted)


def make_eval_step(config: ModelConfig, mesh: Mesh, shardings: TrainState, rules=LOGICAL_RULES):
    """The jitted (params, batch) -> {"ce", "weight"} sums over the batch, for held-out loss."""
    model = DecoderLM(config)
    data = {k: batch_sharding(mesh) for k in BATCH_FIELDS}

    def evaluate(params, batch):
        sums = _forward_sums(model, params, batch, 0.0)
        return {"ce": sums["ce"], "weight": sums["weight"]}

    return _under(mesh, rules, jax.jit(evaluate, in_shardings=(shardings.params, data), out_shardings=replicated(mesh)))


def _under(mesh: Mesh, rules, fn):
    """Trace and run `fn` with the mesh and the logical rules in scope, so the layers' activation
    constraints (by logical name) resolve to mesh axes."""

    def call(*args):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return fn(*args)

    return call


def put_batch(batch: dict, mesh: Mesh) -> dict:
    """This process's rows of the global batch -> global arrays sharded over data x fsdp (on one host
    that is all the rows; on several, each host passes only its own)."""
    sharding: NamedSharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
