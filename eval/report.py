"""Eval results on disk: one JSON file (the numbers) and one Markdown file (a table) per task run, next to the
checkpoint: `RUN/eval/STEP/` for a zoo checkpoint (whichever of its run, checkpoints or step directories was
given), `DIR/eval/` for a Hugging Face directory. An earlier result is never replaced silently: a new run of the same task gets the
next free number (`ppl.json`, `ppl.1.json`, ...) unless overwriting was asked for. Files are written whole
(to a temporary name, then renamed), so an interrupted run leaves no half-written result."""

from __future__ import annotations

import json
import os
from pathlib import Path


def default_results_dir(checkpoint: str | Path) -> Path:
    from zoo.convert import is_hf_checkpoint
    from zoo.train.checkpoint import locate

    if is_hf_checkpoint(checkpoint):
        return Path(checkpoint) / "eval"
    root, step = locate(checkpoint)
    run = root.parent if root.name == "checkpoints" else root
    return run / "eval" / str(step)


def result_stem(directory: Path, task: str, overwrite: bool) -> Path:
    """`directory/task`, or `directory/task.N` with the first N whose files do not exist yet."""
    stem, n = directory / task, 0
    while not overwrite and (stem.with_name(stem.name + ".json").exists() or stem.with_name(stem.name + ".md").exists()):
        n += 1
        stem = directory / f"{task}.{n}"
    return stem


def _write_whole(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def write_result(directory: str | Path, task: str, result: dict, markdown: str, *, overwrite: bool = False
                 ) -> tuple[Path, Path]:
    """(json path, markdown path) of the written result."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = result_stem(directory, task, overwrite)
    paths = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".md")
    _write_whole(paths[0], json.dumps(result, indent=2) + "\n")
    _write_whole(paths[1], markdown)
    return paths


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """rows as a Markdown table; columns are (key, header, format spec)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(format(row[k], f) for k, _, f in columns) + " |")
    return "\n".join(lines) + "\n"
