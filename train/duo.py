"""Which attention heads need the whole context: DuoAttention's optimisation-based identification (Xiao et al.
2024, arXiv 2410.10819, section 3.2), and the conversion of a transformer into DuoAttention layers.

Every full-attention layer becomes a gated zoo.layers.duo_attention layer (its weights unchanged, a gate
alpha per KV head starting at 1). With all weights frozen, the gates are trained on passkey-retrieval sequences
(a key hidden at a random depth of filler text, then the question and the key: zoo.eval.recall.passkey_prompt)
so that the gated model's last hidden states at the answer's positions match the full-attention model's:

    loss = mean over answer positions of ||h_full - h_gated||^2  +  l1 * sum of |alpha|

The L1 term pushes every gate towards streaming; a head whose gate stays high is one the model needs for
retrieval. `choose_retrieval_heads` keeps the highest gates (a fraction of the KV heads over the whole model,
or those above a threshold) and `duo_config` writes the choice into the layers' configs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from zoo.config import LayerConfig, ModelConfig
from zoo.eval.recall import passkey_prompt
from zoo.layers.duo_attention import DuoAttentionConfig
from zoo.model import DecoderLM
from zoo.recurrent_init import full_attention_layers

GATE = "duo_gate"


def duo_config(config: ModelConfig, *, window: int, sink_tokens: int,
               retrieval_heads: dict[int, tuple[int, ...]] | None = None) -> ModelConfig:
    """`config` with every convertible layer as DuoAttention: gated (retrieval_heads None) or with the KV heads
    `retrieval_heads[layer]` attending in full."""
    layers = list(config.layers)
    targets = full_attention_layers(config)
    if not targets:
        raise ValueError("the model has no full-attention layer to convert to DuoAttention")
    for i in targets:
        attention = layers[i].mixer_config
        fields = {f.name: getattr(attention, f.name) for f in dataclasses.fields(attention)}
        fields.update(window=window, sink_tokens=sink_tokens,
                      retrieval_heads=None if retrieval_heads is None else tuple(retrieval_heads.get(i, ())))
        layers[i] = LayerConfig("duo_attention", DuoAttentionConfig(**fields), layers[i].mlp)
    return config.replace(layers=tuple(layers))


def passkey_batch(tokenizer, rng: np.random.Generator, batch: int, length: int) -> dict[str, np.ndarray]:
    """`batch` passkey sequences of at most `length` tokens, right-padded: {"tokens" [B, length], "weights"
    [B, length]: 1 at the positions whose next token is part of the key}."""
    tokens = np.zeros((batch, length), np.int32)
    weights = np.zeros((batch, length), np.float32)
    for row in range(batch):
        request = passkey_prompt(tokenizer, length, float(rng.uniform()), int(rng.integers(10_000, 100_000)))
        sequence = request.context + request.continuation
        tokens[row, :len(sequence)] = sequence
        weights[row, len(request.context) - 1:len(sequence) - 1] = 1.0
    return {"tokens": tokens, "weights": weights}


def _last_hidden(config: ModelConfig, params, tokens):
    _, state = DecoderLM(config).apply({"params": params}, tokens, capture_intermediates=lambda m, _: m.name == "final_norm",
                                       mutable=["intermediates"])
    return state["intermediates"]["final_norm"]["__call__"][0].astype(jnp.float32)


def gate_paths(config: ModelConfig) -> list[int]:
    return [i for i, layer in enumerate(config.layers)
            if layer.mixer == "duo_attention" and layer.mixer_config.retrieval_heads is None]


def with_gates(params: dict, gates: dict[int, jax.Array]) -> dict:
    out = dict(params)
    for i, gate in gates.items():
        out[f"layer_{i}"] = {**params[f"layer_{i}"], "mixer": {**params[f"layer_{i}"]["mixer"], GATE: gate}}
    return out


def _gate_step(teacher: ModelConfig, gated: ModelConfig, optimizer, l1: float):
    def loss_fn(gates, params, batch):
        target = _last_hidden(teacher, params, batch["tokens"])
        hidden = _last_hidden(gated, with_gates(params, gates), batch["tokens"])
        weights = batch["weights"][..., None]
        distill = jnp.sum(jnp.square(hidden - target) * weights) / (jnp.sum(weights) * hidden.shape[-1])
        penalty = sum(jnp.sum(jnp.abs(g)) for g in gates.values())
        return distill + l1 * penalty, distill

    @jax.jit
    def step(gates, opt_state, params, batch):
        (_, distill), grads = jax.value_and_grad(loss_fn, has_aux=True)(gates, params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, gates)
        gates = jax.tree.map(lambda g: jnp.clip(g, 0.0, 1.0), optax.apply_updates(gates, updates))
        return gates, opt_state, distill

    return step


def identify_retrieval_heads(config: ModelConfig, params, tokenizer, *, window: int, sink_tokens: int,
                             steps: int = 200, batch_size: int = 4, length: int = 1024, learning_rate: float = 0.02,
                             l1: float = 0.05, seed: int = 0, progress: bool = True, log=None) -> dict[int, np.ndarray]:
    """Trained gates {layer: [num_kv_heads] in [0, 1]} of every convertible layer of (config, params)."""
    gated = duo_config(config, window=window, sink_tokens=sink_tokens)
    gates = {i: jnp.ones((gated.layers[i].mixer_config.num_kv_heads,), jnp.float32) for i in gate_paths(gated)}
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(gates)
    step = _gate_step(config, gated, optimizer, float(l1))
    rng = np.random.default_rng(seed)
    bar = tqdm(range(steps), desc="duo gates", unit="step", disable=not progress)
    for i in bar:
        batch = passkey_batch(tokenizer, rng, batch_size, length)
        if batch["tokens"].max() >= config.vocab_size:
            raise ValueError(f"the tokenizer gave token id {batch['tokens'].max()}, outside the model's vocabulary of "
                             f"{config.vocab_size}")
        gates, opt_state, distill = step(gates, opt_state, params, batch)
        if (i + 1) % 25 == 0 or i + 1 == steps:
            mean_gate = float(np.mean([np.mean(g) for g in gates.values()]))
            bar.set_postfix(distill=f"{float(distill):.4g}", mean_gate=f"{mean_gate:.3f}")
            if log:
                log({"step": i + 1, "distill": float(distill), "mean_gate": mean_gate})
    return {i: np.asarray(g) for i, g in gates.items()}


def choose_retrieval_heads(gates: dict[int, np.ndarray], *, fraction: float | None = None,
                           threshold: float | None = None) -> dict[int, tuple[int, ...]]:
    """The KV heads kept as retrieval heads: the `fraction` of all heads with the highest gates (ties broken by
    layer, then head), or every head whose gate exceeds `threshold`."""
    if (fraction is None) == (threshold is None):
        raise ValueError("give exactly one of fraction and threshold")
    ranked = sorted(((float(g), layer, head) for layer, gate in gates.items() for head, g in enumerate(gate)),
                    key=lambda t: (-t[0], t[1], t[2]))
    if fraction is not None:
        if not 0 <= fraction <= 1:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        kept = ranked[:round(fraction * len(ranked))]
    else:
        kept = [t for t in ranked if t[0] > threshold]
    chosen = {layer: [] for layer in gates}
    for _, layer, head in kept:
        chosen[layer].append(head)
    return {layer: tuple(sorted(heads)) for layer, heads in chosen.items()}
