"""`zoo eval`: run the chosen tasks on one or more checkpoints and write each task's result files next to each
checkpoint (eval/report.py says where and how). Arguments are checked before any model is loaded."""

from __future__ import annotations

import argparse
from pathlib import Path

from zoo.eval.report import default_results_dir, markdown_table, write_result

TASKS = ("ppl", "mc", "mqar", "passkey", "speed")


def add_arguments(ev: argparse.ArgumentParser) -> None:
    ev.add_argument("checkpoints", nargs="+", metavar="checkpoint",
                    help="zoo run, checkpoints or step directory, or Hugging Face directory (several: speed compares them)")
    ev.add_argument("--tasks", default="ppl", help=f"comma-separated: {', '.join(TASKS)}")
    ev.add_argument("--data", help="ppl: text files to score, comma-separated (each is one document)")
    ev.add_argument("--context", type=int, help="ppl: tokens per window (default: the model's max_seq_len)")
    ev.add_argument("--stride", type=int, help="ppl: tokens between window starts (default: half the context)")
    ev.add_argument("--mc", help="mc: NAME[=FILE.jsonl],... of arc_easy, arc_challenge, piqa, hellaswag, winogrande, "
                                 "boolq, lambada (no file: the Hugging Face hub)")
    ev.add_argument("--limit", type=int, help="mc: score only the first N questions of each task")
    ev.add_argument("--truncate", action="store_true",
                    help="mc: drop the oldest context tokens of a too-long question instead of stopping")
    ev.add_argument("--mqar-pairs", default="4,8,16,32", help="mqar: key-value pair counts (at most half the visible tokens)")
    ev.add_argument("--mqar-examples", type=int, default=256, help="mqar: sequences per pair count")
    ev.add_argument("--passkey-lengths", help="passkey: prompt lengths in tokens (default: 256 up to max_seq_len)")
    ev.add_argument("--passkey-trials", type=int, default=4, help="passkey: keys per length and depth")
    ev.add_argument("--speed-lengths", help="speed: context lengths (default: 128 up to max_seq_len / 2)")
    ev.add_argument("--speed-batch", type=int, default=1, help="speed: prompts decoded together")
    ev.add_argument("--decode-tokens", type=int, default=32, help="speed: tokens decoded after each prefill")
    ev.add_argument("--seed", type=int, default=0, help="mqar, passkey: the examples' seed (same seed, same examples)")
    ev.add_argument("--batch-size", type=int, default=8, help="rows per batch, split over data x fsdp")
    ev.add_argument("--mesh", help="device mesh, e.g. data=4,tensor=2 (default: all devices on data)")
    ev.add_argument("--out", help="results folder (default: RUN/eval/STEP, or HF_DIR/eval); with several "
                                  "checkpoints, one subfolder each")
    ev.add_argument("--overwrite", action="store_true", help="replace earlier results instead of numbering new ones")


def _ints(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag}: expected positive integers, got {text!r}")
    return values


def _doublings(start: int, stop: int) -> list[int]:
    values = [start]
    while values[-1] * 2 <= stop:
        values.append(values[-1] * 2)
    return values


def _mc_specs(text: str | None) -> list[tuple[str, str | None]]:
    from zoo.eval.multiple_choice import TASKS as MC

    if not text:
        raise ValueError("--tasks mc needs --mc: NAME[=FILE.jsonl],... of " + ", ".join(MC))
    specs = []
    for item in text.split(","):
        name, _, path = item.partition("=")
        if name not in MC:
            raise ValueError(f"--mc: unknown task {name!r}; the tasks are {', '.join(MC)}")
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"--mc {name}: no such file: {path}")
        specs.append((name, path or None))
    return specs


def run(args) -> int:
    import jax

    from zoo.train.checkpoint import load_model
    from zoo.train.mesh import make_mesh, parse_mesh

    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        raise ValueError(f"--tasks: {', '.join(unknown) or 'none given'}; the tasks are {', '.join(TASKS)}")
    files = [Path(f) for f in (args.data or "").split(",") if f]
    if "ppl" in tasks and not files:
        raise ValueError("--tasks ppl needs --data: the text files to score")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"--data: no such file: {f}")
    mc_specs = _mc_specs(args.mc) if "mc" in tasks else []
    pairs = _ints(args.mqar_pairs, "--mqar-pairs")
    passkey_lengths = _ints(args.passkey_lengths, "--passkey-lengths")
    speed_lengths = _ints(args.speed_lengths, "--speed-lengths")
    checkpoints = [Path(c) for c in args.checkpoints]
    for c in checkpoints:
        if not c.exists():
            raise FileNotFoundError(f"{c}: no such checkpoint directory")
    mesh = make_mesh(parse_mesh(args.mesh))
    writer = jax.process_index() == 0

    speeds: dict[str, list[dict]] = {}
    plots = []
    for index, checkpoint in enumerate(checkpoints):
        model = load_model(checkpoint, mesh)
        if args.out:
            out = Path(args.out) / (f"{index}-{checkpoint.name}" if len(checkpoints) > 1 else "")
        else:
            out = default_results_dir(checkpoint)
        head = {"checkpoint": str(checkpoint), "step": model.step, "mesh": dict(mesh.shape)}
        title = f"{checkpoint} (step {model.step})"
        for task in tasks:
            if task == "ppl":
                record, summary = _ppl(model, files, args, mesh, title)
            elif task == "mc":
                record, summary = _mc(model, mc_specs, args, mesh, title)
            elif task == "mqar":
                record, summary = _mqar(model, pairs, args, mesh, title)
            elif task == "passkey":
                record, summary = _passkey(model, passkey_lengths, args, mesh, title)
            else:
                record, summary = _speed(model, speed_lengths, args, title)
                speeds[_label(checkpoint, model)] = record["results"]
            if not writer:  # every process scores (the batches are sharded), one writes
                continue
            written = write_result(out, task, {"task": task, **head, **record}, summary, overwrite=args.overwrite)
            print(summary + f"\nwritten: {written[0]} and {written[1].name}\n")
            if task == "speed":
                plots.append(written[0].with_suffix(".png"))
    if plots:
        from zoo.eval.speed import plot

        for path in plots:  # every model's folder gets the plot of all the models measured together
            plot(speeds, path, title="generation speed and decode state vs context")
            print(f"plot: {path}")
    return 0


def _label(checkpoint: Path, model) -> str:
    """The checkpoint's name and its layers in zoo distill's letters (AM, GGGS, ...) when they fit."""
    from zoo.recurrent_init import LETTERS

    letter_of = {mixer: letter for letter, mixer in LETTERS.items()}
    letter_of["duo_attention"] = "D"
    kinds = "".join("S" if layer.mixer == "attention" and getattr(layer.mixer_config, "window", None)
                    else letter_of.get(layer.mixer, "?") for layer in model.config.layers)
    return f"{checkpoint.name} ({kinds})" if len(kinds) <= 16 else checkpoint.name


def _ppl(model, files, args, mesh, title):
    from zoo.eval.perplexity import perplexity

    rows = [perplexity(model.config, model.params, model.tokenizer, f.read_text(encoding="utf-8"), mesh=mesh,
                       source=str(f), context=args.context, stride=args.stride, batch_size=args.batch_size).to_dict()
            for f in files]
    columns = [("source", "text", "s"), ("tokens", "tokens", ",d"), ("context", "context", "d"),
               ("stride", "stride", "d"), ("perplexity", "perplexity", ".4f"), ("bits_per_byte", "bits/byte", ".4f")]
    return {"results": rows}, f"# Perplexity of {title}\n\n" + markdown_table(rows, columns)


def _mc(model, specs, args, mesh, title):
    from zoo.eval.multiple_choice import evaluate, load_task

    rows, notes = [], []
    for name, path in specs:
        parsed, source = load_task(name, path, args.limit)
        for bad in parsed.malformed:
            print(f"warning: {source} line {bad['line']}: {bad['error']} (skipped)")
        row = evaluate(model.config, model.params, model.tokenizer, name, parsed, mesh=mesh, source=source,
                       batch_size=args.batch_size, truncate=args.truncate)
        rows.append(row)
        if row["malformed"]:
            notes.append(f"- {name}: {len(row['malformed'])} malformed line(s) skipped: "
                         + ", ".join(str(m["line"]) for m in row["malformed"][:20]))
        if row["truncated"]:
            notes.append(f"- {name}: {row['truncated']} question(s) truncated to the model's context")
    table = [{"task": r["task"], "n": r["examples"], "acc": _metric(r, "acc"), "acc_norm": _metric(r, "acc_norm"),
              "ppl": f"{r['perplexity']:.3f}" if "perplexity" in r else ""} for r in rows]
    columns = [("task", "task", "s"), ("n", "questions", ",d"), ("acc", "acc", "s"), ("acc_norm", "acc_norm", "s"),
               ("ppl", "perplexity", "s")]
    summary = f"# Zero-shot tasks of {title}\n\n" + markdown_table(table, columns)
    return {"results": rows}, summary + ("\n" + "\n".join(notes) + "\n" if notes else "")


def _metric(row: dict, name: str) -> str:
    return f"{row[name]:.4f} ± {row[name + '_stderr']:.4f}" if name in row else ""


def _mqar(model, pairs, args, mesh, title):
    from zoo.eval.recall import mqar

    rows = mqar(model.config, model.params, model.tokenizer, mesh=mesh, pair_counts=pairs,
                examples=args.mqar_examples, seed=args.seed, batch_size=args.batch_size)
    columns = [("pairs", "key-value pairs", "d"), ("tokens", "tokens", "d"), ("examples", "sequences", "d"),
               ("accuracy", "accuracy", ".4f"), ("all_right", "sequences all right", ".4f")]
    return {"seed": args.seed, "results": rows}, f"# MQAR recall of {title}\n\n" + markdown_table(rows, columns)


def _passkey(model, lengths, args, mesh, title):
    from zoo.eval.recall import passkey

    lengths = lengths or _doublings(256, model.config.max_seq_len)
    rows = passkey(model.config, model.params, model.tokenizer, mesh=mesh, lengths=lengths,
                   depths=[0.0, 0.25, 0.5, 0.75, 1.0], trials=args.passkey_trials, seed=args.seed,
                   batch_size=args.batch_size)
    columns = [("length", "length", "d"), ("tokens", "mean tokens", "d"), ("depth", "depth", ".2f"),
               ("trials", "keys", "d"), ("accuracy", "retrieved", ".3f"), ("key_logprob", "log p(key)", ".2f")]
    return {"seed": args.seed, "results": rows}, f"# Passkey retrieval of {title}\n\n" + markdown_table(rows, columns)


def _speed(model, lengths, args, title):
    import jax

    from zoo.eval.speed import measure

    lengths = lengths or _doublings(128, model.config.max_seq_len // 2)
    rows = measure(model.config, model.params, lengths=lengths, batch=args.speed_batch,
                   decode_tokens=args.decode_tokens)
    table = [{**r, "cache_mib": r["cache_bytes"] / 2**20} for r in rows]
    columns = [("context", "context", "d"), ("batch", "batch", "d"), ("prefill_tokens_per_s", "prefill tok/s", ",.0f"),
               ("decode_tokens_per_s", "decode tok/s", ",.1f"), ("cache_mib", "decode state MiB", ",.2f")]
    device = jax.devices()[0].device_kind
    return ({"device": device, "dtype": model.config.dtype, "results": rows},
            f"# Generation speed of {title}\n\nDevice: {device}, medians of 5 calls.\n\n" + markdown_table(table, columns))
