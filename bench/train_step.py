"""Train-step throughput and MFU of zoo presets on one GPU, with a PyTorch peer in the same run.

    python bench/train_step.py --presets gqa-125m,gqa-350m,mamba2-hybrid-125m,mamba2-hybrid-350m \
        --seq-len 2048 --batch 16 --out results.jsonl

What is timed: one full optimizer step of zoo's jitted train step (forward, backward, global-norm
clip, AdamW), bf16 compute with float32 master parameters, activation rematerialisation as
`--remat` says (default "dots": attention scores and scan internals recomputed in the backward,
which model FLOPs do not count), on a random-token batch of
batch x seq_len tokens, single device. `--steps` timed steps after two untimed ones (compilation);
each step is synchronised, and the median step time is reported.

Model FLOPs per token (the numerator of MFU), forward pass; a training step counts 3x (the backward
pass is twice the forward), recomputation never counted:
  weights     2 x (every parameter with >= 2 dimensions, except the embedding table and normalisation
              weights): each is one multiply-add per token (projections, MLP, depthwise convolutions)
  LM head     2 x d_model x vocab
  attention   2 x 2 x heads x head_dim x c, per layer, c = the mean number of keys a query attends
              (causal: (T + 1) / 2; a window W: the mean of min(t + 1, W))
  Mamba-2     chunked SSD per layer, chunk Q, state N, head dim P, H heads, G groups, q = (Q + 1) / 2:
              2 N q G (C B^T inside the chunk) + 2 P q H (scores x X) + 4 N P H (chunk state in / out)
  Gated DeltaNet  chunked WY form per layer and head, key dim K, value dim V, chunk Q, q = (Q + 1) / 2:
              q (4 K + 4 V) (K K^T, Q K^T, T (beta K), T (beta V) and scores x U) + 6 K V (W S, Q S,
              state update) + Q^2 / 3 (the triangular solve)
Other mixers have no stated count and are refused.
MFU = model FLOPs per second / the chip's dense bf16 peak (H100 SXM and H200: 989 TFLOP/s).

Peer (`--peer`, attention presets): Hugging Face transformers' LlamaForCausalLM with the same
shape (d_model, layers, heads, KV heads, MLP width, vocab, tied embeddings), SDPA attention,
torch.compile, bf16 autocast over float32 parameters, fused AdamW, same batch: its tokens/s in
the same run. The hybrids have no same-run training peer: flash-linear-attention's gated kernels
refuse their backward pass on this Triton (fla issue 640).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device_kind: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in device_kind), None)


def mean_context(length: int, window: int | None) -> float:
    if window is None or window >= length:
        return (length + 1) / 2
    # Queries t < window see t + 1 keys, the rest see window.
    return (window * (window + 1) / 2 + (length - window) * window) / length


def flops_per_token(config, seq_len: int) -> float:
    """Forward model FLOPs per token, as the module docstring states."""
    import flax.linen as nn
    import jax

    from zoo.train.step import boxed_abstract_params

    params = nn.unbox(boxed_abstract_params(config))
    weights = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [str(getattr(p, "key", p)) for p in path]
        if leaf.ndim >= 2 and names != ["embed"] and not any("norm" in n for n in names):
            weights += math.prod(leaf.shape)
    flops = 2 * weights + 2 * config.d_model * config.vocab_size * (1 if config.tie_embeddings else 0)
    for layer in config.layers:
        c = layer.mixer_config
        if layer.mixer == "attention":
            flops += 4 * c.num_heads * c.head_dim * mean_context(seq_len, c.window)
        elif layer.mixer == "mamba2":
            q = (c.chunk_size + 1) / 2
            flops += 2 * c.state_dim * q * c.num_groups + 2 * c.head_dim * q * c.num_heads
            flops += 4 * c.state_dim * c.head_dim * c.num_heads
        elif layer.mixer == "gated_deltanet":
            k, v, q = c.head_dim, c.head_dim * c.expand_v, (c.chunk_size + 1) / 2
            flops += c.num_heads * (q * (4 * k + 4 * v) + 6 * k * v + c.chunk_size**2 / 3)
        else:
            raise NotImplementedError(f"no stated FLOP count for mixer {layer.mixer!r}")
    return flops


def run_zoo(preset: str, batch: int, seq_len: int, steps: int, remat: str) -> dict:
    import flax.linen as nn
    import jax
    import numpy as np

    from zoo.model import count_params
    from zoo.presets import get_preset
    from zoo.train.data import rows_to_batch
    from zoo.train.mesh import make_mesh
    from zoo.train.optim import OptimConfig, make_optimizer
    from zoo.train.step import boxed_abstract_params, init_state, make_train_step, put_batch, state_shardings

    config = get_preset(preset).replace(dtype="bfloat16", param_dtype="float32",
                                        max_seq_len=max(seq_len, get_preset(preset).max_seq_len))
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    optimizer = make_optimizer(OptimConfig(), 1000, nn.unbox(boxed_abstract_params(config)))
    shardings = state_shardings(config, optimizer, mesh)
    state = init_state(config, optimizer, mesh, jax.random.key(0), shardings)
    step = make_train_step(config, optimizer, mesh, shardings, remat=remat)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (batch, seq_len + 1)).astype(np.int32)
    data = put_batch(rows_to_batch(tokens, np.ones_like(tokens)), mesh)
    start = time.perf_counter()
    state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    return {"framework": f"zoo (JAX/XLA, remat={remat})", "preset": preset, "params": count_params(config),
            "device": device.device_kind, "median_step_s": statistics.median(times), "compile_s": compile_s,
            "loss": float(metrics["loss"]), "flops_per_token": 3 * flops_per_token(config, seq_len),
            "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30}


def run_torch_llama(preset: str, batch: int, seq_len: int, steps: int, remat: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from zoo.presets import get_preset

    config = get_preset(preset)
    attention = config.layers[0].mixer_config
    if any(layer.mixer != "attention" for layer in config.layers):
        raise ValueError(f"{preset}: the Llama peer exists for attention presets only")
    hf = LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.mlp_hidden,
                     num_hidden_layers=config.n_layers, num_attention_heads=attention.num_heads,
                     num_key_value_heads=attention.num_kv_heads, head_dim=attention.head_dim,
                     max_position_embeddings=max(seq_len, config.max_seq_len), rms_norm_eps=config.norm_eps,
                     rope_theta=attention.rope_base, tie_word_embeddings=config.tie_embeddings,
                     attn_implementation="sdpa")
    model = LlamaForCausalLM(hf).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    tokens = torch.randint(0, config.vocab_size, (batch, seq_len + 1), device="cuda")
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def train_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    mode = "torch.compile"
    try:
        step = torch.compile(train_step)
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
    except Exception as e:  # a compile failure falls back to eager, and the record says so
        print(f"torch.compile failed ({type(e).__name__}: {e}); timing eager", file=sys.stderr)
        mode, step = "eager", train_step
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
    compile_s = time.perf_counter() - start
    step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    from zoo.model import count_params

    return {"framework": f"transformers Llama ({mode}, SDPA)", "preset": preset, "params": count_params(config),
            "device": torch.cuda.get_device_name(), "median_step_s": statistics.median(times), "compile_s": compile_s,
            "loss": float(loss), "flops_per_token": 3 * flops_per_token(config, seq_len),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="gqa-125m,gqa-350m,mamba2-hybrid-125m,mamba2-hybrid-350m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--remat", default="dots", help="zoo's remat policy: none, dots or full")
    parser.add_argument("--peer", action="store_true", help="also time the transformers Llama peer")
    parser.add_argument("--out", default="train_step.jsonl")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # "zoo:PRESET" or "torch:PRESET": a child run
    args = parser.parse_args()

    if args.one:
        kind, preset = args.one.split(":", 1)
        runner = run_zoo if kind == "zoo" else run_torch_llama
        result = runner(preset, args.batch, args.seq_len, args.steps, args.remat)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    # Each measurement in its own process: JAX and PyTorch each take the GPU's memory for themselves.
    jobs = []
    for preset in args.presets.split(","):
        jobs.append(("zoo", preset))
        if args.peer and preset.startswith(("gqa", "mqa", "mha")):
            jobs.append(("torch", preset))
    for kind, preset in jobs:
        command = [sys.executable, __file__, "--one", f"{kind}:{preset}", "--batch", str(args.batch),
                   "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--remat", args.remat]
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ)
        lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
        if done.returncode or not lines:
            record = {"framework": kind, "preset": preset, "error": done.stderr.strip().splitlines()[-5:]}
        else:
            record = json.loads(lines[-1][len("RESULT "):])
            tokens = args.batch * args.seq_len
            record.update(batch=args.batch, seq_len=args.seq_len, steps=args.steps,
                          tokens_per_s=tokens / record["median_step_s"])
            record["model_tflops"] = record["tokens_per_s"] * record["flops_per_token"] / 1e12
            peak = peak_flops(record["device"])
            record["mfu"] = None if peak is None else record["model_tflops"] * 1e12 / peak
        print(json.dumps(record), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
