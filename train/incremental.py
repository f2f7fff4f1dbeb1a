"""Incremental distillation (as in Apriel-H1, ServiceNow 2025): attention layers become recurrent a few at a time,
the least important first, with a distillation after each round, until the target fraction is replaced.

Importance of an attention layer is measured, not guessed: the held-out cross-entropy of the current student
with that one layer replaced by its recurrent initialisation (zoo.recurrent_init, untrained), minus the current
student's. A layer whose replacement costs least is one the model leans on least. This costs one held-out pass
per remaining attention layer and round; every other score in use (attention entropy, gradient norms) is a proxy
for this number.

Round r (1-based) replaces `per_round` layers of the round r-1 student (round 0: the teacher), then runs a
normal staged distillation (zoo.train.distill) from the original teacher into run_dir/round_r: the mixer and
block stages align the layers replaced this round, the kl stage the whole student. run_dir/incremental.json
records each round's scores, choice and result, written before the round's training starts, so a rerun of the
same command continues where it stopped: finished rounds are read back, an interrupted one resumes from its
latest checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import jax

from zoo.config import ModelConfig
from zoo.errors import ConfigError
from zoo.recurrent_init import LETTERS, full_attention_layers, hybrid_from_attention
from zoo.train import data as data_lib
from zoo.train.checkpoint import load_model
from zoo.train.distill import DistillConfig, heldout_ce, distill
from zoo.train.mesh import host_array, make_mesh, param_shardings, parse_mesh
from zoo.train.step import boxed_abstract_params

STATE_FILE = "incremental.json"
RECURRENT_LETTERS = tuple(letter for letter in LETTERS if letter not in ("A", "S"))


@dataclass(frozen=True)
class IncrementalConfig:
    target_ratio: float = 0.5  # of the teacher's full-attention layers
    per_round: int = 1
    letter: str = "M"  # what replaced layers become (zoo.recurrent_init.LETTERS)

    def validate(self) -> None:
        if not 0 < self.target_ratio <= 1:
            raise ConfigError("target_ratio", f"must be in (0, 1], got {self.target_ratio}")
        if self.per_round < 1:
            raise ConfigError("per_round", f"must be positive, got {self.per_round}")
        if self.letter not in RECURRENT_LETTERS:
            raise ConfigError("letter", f"must be one of {RECURRENT_LETTERS}, got {self.letter!r}")


def _replace(config: ModelConfig, params: dict, layers: list[int], kind: str, seed: int):
    layout = ["attention"] * config.n_layers  # "attention" here: keep the layer as it is, whatever it is
    for i in layers:
        layout[i] = kind
    return hybrid_from_attention(config, params, layout, jax.random.key(seed))


def layer_importance(config: ModelConfig, params: dict, candidates: list[int], kind: str, data, *, batch_size: int,
                     mesh, seed: int = 0) -> tuple[float, dict[int, float]]:
    """(held-out cross-entropy of the model, {layer: the increase when that layer alone becomes `kind`})."""
    def placed(c, p):
        shardings = param_shardings(boxed_abstract_params(c), mesh)
        return jax.tree.map(lambda x, s: jax.device_put(host_array(x).astype(c.param_dtype), s), p, shardings)

    base = heldout_ce(config, placed(config, params), data, batch_size, mesh)
    scores = {}
    for i in candidates:
        trial, trial_params, _ = _replace(config, params, [i], kind, seed)
        scores[i] = heldout_ce(trial, placed(trial, trial_params), data, batch_size, mesh) - base
    return base, scores


def _read_state(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"rounds": []}


def _write_state(path: Path, state: dict) -> None:
    if jax.process_index() == 0:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(path)  # whole or absent


def distill_incrementally(config: DistillConfig, incremental: IncrementalConfig, run_dir: str | Path, *, log=print,
                          progress: bool = True) -> dict:
    """Run (or continue) the rounds; returns incremental.json's content. `config` gives each round's distillation
    settings (its student_pattern and mla_rank are not used)."""
    incremental.validate()
    run_dir = Path(run_dir).absolute()
    state_path = run_dir / STATE_FILE
    state = _read_state(state_path)
    settings = json.loads(json.dumps({"distill": config.to_dict(), "incremental": dataclasses.asdict(incremental)}))
    if state.get("settings", settings) != settings:
        raise ValueError(f"{run_dir} was started with different settings; rerun with the same ones or pick a new --out")
    if not state_path.is_file() and run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"{run_dir} is not empty and holds no incremental distillation; pick a new --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    state["settings"] = settings

    mesh = make_mesh(parse_mesh(config.mesh))
    teacher = load_model(config.teacher, mesh)
    data = data_lib.prepare(config.data, teacher.tokenizer)
    candidates = full_attention_layers(teacher.config)
    if not candidates:
        raise ValueError(f"{config.teacher} has no full-attention layer to replace")
    target = max(1, round(incremental.target_ratio * len(candidates)))
    kind = LETTERS[incremental.letter]
    current_config, current_params = teacher.config, jax.device_get(teacher.params)
    replaced: list[int] = []
    round_index = 0
    while len(replaced) < target:
        round_index += 1
        round_dir = run_dir / f"round_{round_index}"
        if len(state["rounds"]) < round_index:  # a new round: score what is left, record the choice first
            remaining = [i for i in candidates if i not in replaced]
            base, scores = layer_importance(current_config, current_params, remaining, kind, data,
                                            batch_size=config.batch_size, mesh=mesh, seed=config.seed)
            chosen = sorted(sorted(scores, key=lambda i: (scores[i], i))[:min(incremental.per_round, target - len(replaced))])
            log(f"round {round_index}: held-out cross-entropy {base:.4f}; increase when replaced: "
                + ", ".join(f"layer {i} {scores[i]:+.4f}" for i in remaining) + f"; replacing {chosen}")
            state["rounds"].append({"round": round_index, "heldout_ce_before": base,
                                    "scores": {str(i): v for i, v in scores.items()}, "replaced": chosen})
            _write_state(state_path, state)
        record = state["rounds"][round_index - 1]
        chosen = record["replaced"]
        replaced = sorted(replaced + chosen)
        if "summary" not in record:
            student = _replace(current_config, current_params, chosen, kind, config.seed + round_index)
            pattern = "".join(incremental.letter if i in replaced else "A" for i in range(current_config.n_layers))
            round_config = dataclasses.replace(config, student_pattern=pattern, mla_rank=None)
            summary = distill(round_config, round_dir, log=log, progress=progress,
                              student=(student[0], student[1], chosen))
            record["summary"] = {k: summary[k] for k in ("teacher_heldout_ce", "student_heldout_ce", "retained",
                                                        "student_layers", "student_state_bytes_32k")}
            record["fraction_replaced"] = len(replaced) / len(candidates)
            record["tokens"] = sum(s["tokens"] for s in summary["stages"])
            _write_state(state_path, state)
        student = load_model(round_dir)
        current_config, current_params = student.config, jax.device_get(student.params)
    last = state["rounds"][-1]["summary"]
    log(f"{len(replaced)} of {len(candidates)} attention layers replaced ({replaced}) in {round_index} rounds; held-out "
        f"perplexity teacher {math.exp(last['teacher_heldout_ce']):.3f}, student {math.exp(last['student_heldout_ce']):.3f}")
    return state
