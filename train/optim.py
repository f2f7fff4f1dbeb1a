"""The optimizer: AdamW with linear warmup then cosine / linear / constant decay, global-norm
clipping, and weight decay only where it regularises (matrices), never on norms, biases or the
parameters of a recurrence (A_log, dt, decay rates, S4D's poles), whose values set time scales.

Master parameters are float32 whatever the compute dtype (ModelConfig.param_dtype), so the
update below always runs in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import optax

from zoo.errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant")

# Parameters that set a recurrence's time scales or a gate's prior: decaying them towards zero would
# change the model's memory, not regularise it. Matched on the parameter's own (last) name.
NO_DECAY_NAMES = frozenset({"A_log", "dt_bias", "D", "log_dt", "log_a_real", "a_imag", "sink_logits"})


@dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 3e-4
    warmup_steps: int = 100  # capped at a tenth of the run for short runs
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1  # the decay ends at learning_rate * min_lr_ratio
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # global gradient norm; 0 disables clipping
    z_loss: float = 0.0  # weight of log(Z)^2 (PaLM uses 1e-4); 0 disables

    def validate(self, field: str = "optim") -> None:
        if self.learning_rate <= 0:
            raise ConfigError(f"{field}.learning_rate", f"must be positive, got {self.learning_rate}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"{field}.schedule", f"must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"{field}.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("warmup_steps", "weight_decay", "clip_norm", "z_loss", "eps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{field}.{name}", f"must be >= 0, got {getattr(self, name)}")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{field}.{name}", f"must be in [0, 1), got {getattr(self, name)}")


def learning_rate_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = min(config.warmup_steps, max(1, total_steps // 10))
    peak, end = config.learning_rate, config.learning_rate * config.min_lr_ratio
    decay_steps = max(1, total_steps - warmup)
    decay = {
        "cosine": optax.cosine_decay_schedule(peak, decay_steps, alpha=config.min_lr_ratio),
        "linear": optax.linear_schedule(peak, end, decay_steps),
        "constant": optax.constant_schedule(peak),
    }[config.schedule]
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decays(path, leaf) -> bool:
    """Whether weight decay applies to one parameter: matrices and tensors only, never biases,
    normalisation weights (some are per-head matrices) or the parameters of NO_DECAY_NAMES."""
    names = [str(getattr(p, "key", p)) for p in path]
    return (leaf.ndim >= 2 and not names[-1].endswith("bias") and names[-1] not in NO_DECAY_NAMES
            and not any("norm" in n for n in names))


def weight_decay_mask(params):
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: OptimConfig, total_steps: int, abstract_params) -> optax.GradientTransformation:
    """`abstract_params` (shapes suffice) fixes the weight-decay mask."""
    config.validate()
    adamw = optax.adamw(
        learning_rate_schedule(config, total_steps), b1=config.b1, b2=config.b2, eps=config.eps,
        weight_decay=config.weight_decay, mask=weight_decay_mask(abstract_params),
    )
    if config.clip_norm == 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw)
