"""The `zoo` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


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
    from zoo import checkpoint
    from zoo.generate import Generator, Sampling
    from zoo.tokenizer import ByteTokenizer

    config, params = checkpoint.load(args.checkpoint)
    tokenizer = ByteTokenizer()
    generator = Generator(config, params, pad_id=tokenizer.pad_id)
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    out = generator([tokenizer.encode(args.prompt)], args.max_new_tokens, sampling, seed=args.seed)[0]
    print(args.prompt + tokenizer.decode(out))
    return 0


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

    presets = sub.add_parser("presets", help="list model presets with parameter counts")
    presets.add_argument("filter", nargs="?", help="only names containing this")
    presets.add_argument("--memory", action="store_true",
                         help="also print each preset's decode state size for a 32K context")
    presets.set_defaults(run=_presets)

    gen = sub.add_parser("generate", help="sample from a checkpoint (byte-level models)")
    gen.add_argument("checkpoint")
    gen.add_argument("--prompt", default="def ")
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=40)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(run=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
