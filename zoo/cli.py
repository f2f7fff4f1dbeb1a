"""The `zoo` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from zoo.eval import command as eval_command  # light: its tasks import their modules when run


def _demo(args) -> int:
    from zoo.demo import DemoSettings, run_demo

    out = Path(args.out) if args.out else Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} is not empty; pick another --out", file=sys.stderr)
        return 2
    settings = DemoSettings(preset=args.preset, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                            seed=args.seed, prompt=args.prompt)
    run_demo(settings, out)
    return 0


def _train(args) -> int:
    from zoo.train.mesh import initialize_distributed

    initialize_distributed(force=args.distributed)  # before anything touches the devices
    import json

    from zoo.train.config import TrainConfig
    from zoo.train.trainer import CONFIG_FILE, train

    assignments = list(args.set or [])
    for flag, key in (("preset", "preset"), ("data", "data.source"), ("eval_data", "data.eval_source"),
                      ("tokenizer", "data.tokenizer"), ("mesh", "mesh"), ("steps", "steps"),
                      ("batch_size", "batch_size"), ("seq_len", "data.seq_len")):
        if getattr(args, flag) is not None:
            assignments.insert(0, f"{key}={getattr(args, flag)}")
    if args.resume and args.out:
        raise ValueError("give --resume RUN or --out DIR, not both")
    if args.resume:
        out = Path(args.resume)
        if not (out / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{out} is not a zoo run directory (no {CONFIG_FILE})")
        base = TrainConfig.from_dict(json.loads((out / CONFIG_FILE).read_text()))
    else:
        preset = args.preset or TrainConfig.preset
        out = Path(args.out) if args.out else Path("runs") / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        base = TrainConfig()
    result = train(base.with_overrides(assignments), out)
    return 3 if result.stopped_early else 0


def _presets(args) -> int:
    from zoo.model import count_params, decode_state_bytes
    from zoo.presets import PRESETS, get_preset

    context = 32768
    header = f"{'preset':<22}{'params':>14}  {'layers':>6}  "
    if args.memory:
        header += f"{'cache@32K':>11}  {'bytes/token':>11}  {'attention':>10}  {'recurrent':>10}  "
    print(header + "mixers")
    for name in sorted(PRESETS):
        if args.filter and args.filter not in name:
            continue
        config = get_preset(name)
        mixers = ",".join(sorted({l.mixer for l in config.layers}))
        row = f"{name:<22}{count_params(config):>14,}  {config.n_layers:>6}  "
        if args.memory:
            split = decode_state_bytes(config, context)
            total = split["attention"] + split["recurrent"]
            row += (f"{_mib(total):>11}  {total / context:>11,.0f}  {_mib(split['attention']):>10}  "
                    f"{_mib(split['recurrent']):>10}  ")
        print(row + mixers)
    if args.memory:
        print(f"\ncache@32K: one sequence's decode state for a {context:,}-token context (attention KV in bfloat16, "
              "recurrent state in float32); bytes/token = cache@32K / 32768.")
    return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _generate(args) -> int:
    from zoo.generate import Generator, Sampling
    from zoo.train.checkpoint import load_model

    config, params, tokenizer = load_model(args.checkpoint)[:3]
    generator = Generator(config, params, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    out = generator([tokenizer.encode(args.prompt)], args.max_new_tokens, sampling, seed=args.seed)[0]
    print(args.prompt + tokenizer.decode(out))
    return 0


def _convert(args) -> int:
    from zoo.convert import HFOrigin, export_hf, import_hf, is_hf_checkpoint
    from zoo.model import count_params
    from zoo.train.checkpoint import Checkpoints, load_model

    source, out = Path(args.source), Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; pick another --out")
    to_mla, to_duo = args.mla_rank is not None, args.duo
    if to_mla and to_duo:
        raise ValueError("--mla-rank and --duo are two different conversions; pick one")
    if not (is_hf_checkpoint(source) or to_mla or to_duo):  # zoo -> Hugging Face
        loaded = load_model(source)
        origin = HFOrigin.from_dict(loaded.origin) if loaded.origin else None
        export_hf(loaded.config, loaded.params, out, tokenizer=loaded.tokenizer, origin=origin, dtype=args.dtype,
                  max_shard_bytes=parse_size(args.max_shard_size))
        print(f"{source} (step {loaded.step}) -> Hugging Face checkpoint {out}")
        return 0
    from zoo.train.mesh import make_mesh, parse_mesh

    mesh = make_mesh(parse_mesh(args.mesh)) if args.mesh else None
    if is_hf_checkpoint(source):
        config, params, tokenizer, origin = import_hf(source, mesh, param_dtype=args.param_dtype)
        origin = origin.to_dict()
    else:
        config, params, tokenizer, _, origin = load_model(source, mesh)
    reports = None
    if to_mla:
        from zoo.mla_conversion import MLAConversion, convert_model

        conversion = MLAConversion(rank=args.mla_rank or None, rope_pairs=args.rope_pairs, keep=args.rope_keep,
                                   tp=args.tpla)
        config, params, reports = convert_model(config, params, conversion)
        origin = None  # an MLA model has no Hugging Face form to export back to
    if to_duo:
        config, duo_report = _duo_conversion(args, config, params, tokenizer)
        origin = None  # DuoAttention layers have no Hugging Face form
    checkpoints = Checkpoints(out / "checkpoints")
    checkpoints.save_model(0, params, config, tokenizer, {"converted_from": str(source.absolute())}, origin=origin)
    checkpoints.wait()
    checkpoints.close()
    print(f"{source} -> zoo checkpoint {out} ({count_params(config):,} parameters, {config.n_layers} layers)")
    if to_duo:
        import json

        (out / "duo_heads.json").write_text(json.dumps(duo_report, indent=2) + "\n")
        print(f"DuoAttention: {duo_report['retrieval_kv_heads']} of {duo_report['kv_heads']} KV heads keep the whole "
              f"context; the rest keep {duo_report['sink_tokens']} sinks + {duo_report['window']} recent tokens "
              f"(gates and choice in {out / 'duo_heads.json'})")
    if reports:
        import json

        (out / "mla_conversion.json").write_text(json.dumps(reports, indent=2) + "\n")
        first = reports[0]
        print(f"MLA: {len(reports)} layers at rank {first['rank']} (of {first['full_rank']}), cache per token and layer "
              f"{first['cache_per_token']} values (was {first['source_cache_per_token']}); K/V energy kept "
              f"{min(r['kv_energy_kept'] for r in reports):.4f}-{max(r['kv_energy_kept'] for r in reports):.4f}")
    return 0


def _duo_conversion(args, config, params, tokenizer):
    """DuoAttention gates trained on passkey sequences (zoo.train.duo), then the retrieval heads chosen."""
    from zoo.train.duo import choose_retrieval_heads, duo_config, identify_retrieval_heads

    history = []
    gates = identify_retrieval_heads(config, params, tokenizer, window=args.duo_window, sink_tokens=args.duo_sinks,
                                     steps=args.duo_steps, batch_size=args.duo_batch, length=args.duo_length,
                                     learning_rate=args.duo_lr, l1=args.duo_l1, log=history.append)
    chosen = choose_retrieval_heads(gates, fraction=None if args.duo_threshold is not None else args.duo_retrieval,
                                    threshold=args.duo_threshold)
    report = {"window": args.duo_window, "sink_tokens": args.duo_sinks, "steps": args.duo_steps,
              "length": args.duo_length, "l1": args.duo_l1, "learning_rate": args.duo_lr,
              "kv_heads": sum(len(g) for g in gates.values()),
              "retrieval_kv_heads": sum(len(h) for h in chosen.values()),
              "gates": {str(i): [round(float(x), 4) for x in g] for i, g in gates.items()},
              "retrieval_heads": {str(i): list(h) for i, h in chosen.items()}, "history": history}
    return duo_config(config, window=args.duo_window, sink_tokens=args.duo_sinks, retrieval_heads=chosen), report


def _distill(args) -> int:
    from zoo.train.data import DataConfig
    from zoo.train.distill import DistillConfig, distill
    from zoo.train.optim import OptimConfig

    def numbers(text):
        return tuple(int(x) for x in text.split(",")) if text else ()

    data = DataConfig(source=args.data, eval_source=args.eval_data or "", seq_len=args.seq_len)
    config = DistillConfig(
        teacher=args.teacher, student_pattern=args.student_pattern or "", window=args.window, mla_rank=args.mla_rank,
        rope_pairs=args.rope_pairs, stages=tuple(args.stages.split(",")), stage_steps=numbers(args.stage_steps),
        temperature=args.temperature, top_k=args.top_k, ce_weight=args.ce_weight, kl_trainable=args.kl_trainable,
        batch_size=args.batch_size, seed=args.seed, mesh=args.mesh or "", kernel_impl=args.kernel_impl,
        log_every=args.log_every, eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, data=data,
        optim=OptimConfig(learning_rate=args.lr, warmup_steps=args.warmup_steps))
    out = Path(args.out) if args.out else Path("runs") / f"distill-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.incremental:
        from zoo.train.incremental import IncrementalConfig, distill_incrementally

        if args.student_pattern or args.mla_rank is not None:
            raise ValueError("--incremental chooses the layers itself; leave out --student-pattern and --mla-rank")
        distill_incrementally(config, IncrementalConfig(target_ratio=args.target_ratio, per_round=args.per_round,
                                                        letter=args.replace_with), out)
    else:
        distill(config, out)
    return 0


def parse_size(text: str) -> int:
    """"5GB" -> 5 * 10**9, "2GiB" -> 2 * 2**30, "40KB", "123" (bytes), as Hugging Face's max_shard_size."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    upper = text.strip().upper()
    unit = next((u for u in units if upper.endswith(u)), "")
    number, factor = upper.removesuffix(unit), units.get(unit, 1)
    try:
        size = int(float(number) * factor)
    except ValueError:
        raise ValueError(f"--max-shard-size: {text!r} is not a size such as 5GB, 500MB or 2GiB") from None
    if size <= 0:
        raise ValueError(f"--max-shard-size must be positive, got {text!r}")
    return size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoo", description="hybrid-zoo: attention / SSM hybrid language models in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a tiny model on the embedded corpus (CPU, a few minutes)")
    demo.add_argument("--preset", default="gqa-tiny")
    demo.add_argument("--steps", type=int, default=600)
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--seq-len", type=int, default=128)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--prompt", default="def ")
    demo.add_argument("--out", help="run directory (default runs/demo-TIMESTAMP); must be new or empty")
    demo.set_defaults(run=_demo)

    tr = sub.add_parser(
        "train", help="train a preset on a dataset over a device mesh (resumes a run directory with checkpoints)",
        description="Train a model. Every setting is a TrainConfig field, changed with --set key=value "
                    "(e.g. --set optim.learning_rate=1e-3 --set data.seq_len=1024 --set model.vocab_size=32768); "
                    "the flags below are shortcuts. Re-running with the same --out, or --resume RUN, continues "
                    "from the latest checkpoint.")
    tr.add_argument("--preset", help="model preset (see `zoo presets`); default gqa-tiny")
    tr.add_argument("--data", help="'stdlib' (default, offline), a .txt/.jsonl/.parquet file, directory or glob, "
                                   "or a Hugging Face Hub dataset name")
    tr.add_argument("--eval-data", help="held-out data (default: the source's validation split or its tail)")
    tr.add_argument("--tokenizer", help="'byte' (default) or a tokenizer.json (or a directory with one)")
    tr.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=2,tensor=2 (default: all devices on data)")
    tr.add_argument("--steps", type=int)
    tr.add_argument("--batch-size", type=int, help="global batch in sequences")
    tr.add_argument("--seq-len", type=int)
    tr.add_argument("--set", action="append", metavar="KEY=VALUE", help="any setting; repeatable")
    tr.add_argument("--out", help="run directory (default runs/PRESET-TIMESTAMP)")
    tr.add_argument("--resume", metavar="RUN", help="continue RUN with its saved settings (--set may change steps, "
                                                    "cadences and the mesh)")
    tr.add_argument("--distributed", action="store_true",
                    help="call jax.distributed.initialize() even if the launcher is not recognised")
    tr.set_defaults(run=_train)

    presets = sub.add_parser("presets", help="list model presets with parameter counts")
    presets.add_argument("filter", nargs="?", help="only names containing this")
    presets.add_argument("--memory", action="store_true",
                         help="also print each preset's decode state size for a 32K context")
    presets.set_defaults(run=_presets)

    gen = sub.add_parser("generate", help="sample from a checkpoint (a run directory or one of its steps)")
    gen.add_argument("checkpoint")
    gen.add_argument("--prompt", default="def ")
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=40)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(run=_generate)

    conv = sub.add_parser(
        "convert", help="a Hugging Face Llama / Qwen2 / Mistral checkpoint to a zoo checkpoint, or a zoo checkpoint back",
        description="The direction follows SOURCE: a Hugging Face directory (config.json + safetensors + "
                    "tokenizer.json) becomes a zoo checkpoint directory; a zoo run, checkpoints or step directory "
                    "becomes a Hugging Face directory (uniform attention transformers only). With --mla-rank, "
                    "either source becomes a zoo checkpoint whose attention layers are MLA (MHA2MLA-style); with --duo, "
                    "one whose full-attention layers are DuoAttention (retrieval heads chosen by trained gates).")
    conv.add_argument("source")
    conv.add_argument("--out", required=True, help="new or empty output directory")
    conv.add_argument("--mesh", help="import: place the params on this mesh as they are read, e.g. fsdp=8")
    conv.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"),
                      help="import: the dtype zoo keeps the weights in (default float32 master weights)")
    conv.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                      help="export: the stored dtype (default: the original checkpoint's, else float32)")
    conv.add_argument("--max-shard-size", default="5GB", help="export: largest safetensors file (default 5GB)")
    conv.add_argument("--mla-rank", type=int, metavar="RANK",
                      help="convert the attention layers to MLA with this latent rank (0: full rank, exact apart "
                           "from the RoPE pairs dropped); the output is a zoo checkpoint")
    conv.add_argument("--rope-pairs", type=int, default=4, help="MLA: RoPE pairs kept per KV head (default 4)")
    conv.add_argument("--rope-keep", default="high", choices=("high", "norm"),
                      help="MLA: keep the highest-frequency pairs, or those with the largest q/k weight norms")
    conv.add_argument("--tpla", type=int, metavar="TP", help="MLA: make the layers TPLA with TP latent shards")
    conv.add_argument("--duo", action="store_true",
                      help="convert the full-attention layers to DuoAttention: gates per KV head trained on passkey "
                           "sequences pick the retrieval heads (whole context); the others stream (sinks + window)")
    conv.add_argument("--duo-window", type=int, default=256, help="DuoAttention: streaming heads' window (256)")
    conv.add_argument("--duo-sinks", type=int, default=4, help="DuoAttention: streaming heads' sink tokens (4)")
    conv.add_argument("--duo-retrieval", type=float, default=0.5,
                      help="DuoAttention: fraction of KV heads kept as retrieval heads, highest gates first (0.5)")
    conv.add_argument("--duo-threshold", type=float, help="DuoAttention: instead, every head whose gate exceeds this")
    conv.add_argument("--duo-steps", type=int, default=200, help="DuoAttention: gate-training steps (200)")
    conv.add_argument("--duo-batch", type=int, default=4, help="DuoAttention: passkey sequences per step (4)")
    conv.add_argument("--duo-length", type=int, default=1024, help="DuoAttention: tokens per passkey sequence (1024)")
    conv.add_argument("--duo-lr", type=float, default=0.02, help="DuoAttention: gate learning rate (0.02, Adam)")
    conv.add_argument("--duo-l1", type=float, default=0.05, help="DuoAttention: L1 weight on the gates (0.05)")
    conv.set_defaults(run=_convert)

    dis = sub.add_parser(
        "distill", help="distill a transformer checkpoint into a hybrid or an MLA model, in stages",
        description="Stages (MOHAWK): mixer = each replaced layer's mixer against the teacher's on the teacher's "
                    "inputs; block = each replaced block likewise; kl = the whole student against the teacher's "
                    "logits. Re-running with the same --out resumes from the latest checkpoint.")
    dis.add_argument("--teacher", required=True, help="zoo checkpoint (run / step directory) or Hugging Face directory")
    dis.add_argument("--student-pattern", help="a letter per layer, repeated to the depth: A keep attention, S sliding "
                                               "window (--window), M Mamba-2, G Gated DeltaNet, R RetNet, X mLSTM; e.g. GGGS")
    dis.add_argument("--window", type=int, help="the window of S layers")
    dis.add_argument("--mla-rank", type=int, help="instead of a pattern: every attention layer to MLA (0: full rank)")
    dis.add_argument("--rope-pairs", type=int, default=4, help="MLA: RoPE pairs kept per KV head")
    dis.add_argument("--stages", default="mixer,block,kl")
    dis.add_argument("--stage-steps", default="100,100,400", help="steps of each stage, comma-separated")
    dis.add_argument("--temperature", type=float, default=1.0)
    dis.add_argument("--top-k", type=int, help="kl stage: only the teacher's top-k logits")
    dis.add_argument("--ce-weight", type=float, default=0.0, help="kl stage: weight of the data's cross-entropy")
    dis.add_argument("--kl-trainable", default="all", choices=("all", "replaced"))
    dis.add_argument("--data", default="stdlib", help="as zoo train --data")
    dis.add_argument("--eval-data", help="held-out data (default: the source's validation split or its tail)")
    dis.add_argument("--seq-len", type=int, default=256)
    dis.add_argument("--batch-size", type=int, default=16)
    dis.add_argument("--lr", type=float, default=1e-3)
    dis.add_argument("--warmup-steps", type=int, default=20)
    dis.add_argument("--mesh", help="device mesh, e.g. fsdp=8 (teacher and student share it)")
    dis.add_argument("--kernel-impl", default="auto", choices=("auto", "xla", "pallas", "interpret"),
                     help="every layer's kernels (auto: Pallas on GPU/TPU)")
    dis.add_argument("--seed", type=int, default=0)
    dis.add_argument("--log-every", type=int, default=10)
    dis.add_argument("--eval-every", type=int, default=100)
    dis.add_argument("--checkpoint-every", type=int, default=200)
    dis.add_argument("--out", help="run directory (default runs/distill-TIMESTAMP)")
    dis.add_argument("--incremental", action="store_true",
                     help="replace attention layers in rounds, least important first (held-out loss increase when "
                          "replaced), distilling after each round, until --target-ratio is replaced")
    dis.add_argument("--target-ratio", type=float, default=0.5, help="incremental: fraction of attention layers to "
                                                                      "replace (0.5)")
    dis.add_argument("--per-round", type=int, default=1, help="incremental: layers replaced per round (1)")
    dis.add_argument("--replace-with", default="M", help="incremental: what replaced layers become, a letter of "
                                                         "--student-pattern other than A and S (M)")
    dis.set_defaults(run=_distill)

    ev = sub.add_parser("eval", help="evaluate checkpoints (zoo run, step or Hugging Face directory) on any mesh")
    eval_command.add_arguments(ev)
    ev.set_defaults(run=eval_command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # training diverged; the message names the last good checkpoint
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
