"""Zero-shot log-likelihood tasks in lm-evaluation-harness's formats: ARC-Easy/Challenge, PIQA, HellaSwag,
WinoGrande, BoolQ and LAMBADA (OpenAI).

Each task reads the published jsonl (the original release or the Hugging Face dataset's rows; both field
layouts are accepted where they differ) and builds exactly the prompts of the harness's task YAML:

| task | context | choices (each after a space) | metrics |
|---|---|---|---|
| arc_easy, arc_challenge | `Question: {question}\\nAnswer:` | the answer texts | acc, acc_norm |
| piqa | `Question: {goal}\\nAnswer:` | sol1, sol2 | acc, acc_norm |
| hellaswag | `{activity}: {ctx_a} {Ctx_b}`, cleaned | the four endings, cleaned | acc, acc_norm |
| winogrande | the sentence up to `_`, with each option | the rest of the sentence (one continuation) | acc |
| boolq | `{passage}\\nQuestion: {question}?\\nAnswer:` | no, yes | acc |
| lambada | the text but its last word | the last word | perplexity, acc |

acc counts the choice with the highest summed log-likelihood; acc_norm divides each by the choice's length in
characters (the harness's `completion_len`); LAMBADA's acc is greedy decoding reproducing the last word and
its perplexity is exp(-mean log-likelihood of that word). Standard errors are the harness's: the sample
standard deviation over examples / sqrt(n).

A line that is not JSON, lacks a field or has an out-of-range answer is reported with its line number and
skipped; the rest is scored.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from zoo.eval.loglikelihood import encode_pair, score_requests

TARGET_DELIMITER = " "


@dataclass(frozen=True)
class Question:
    line: int  # 1-based line of the source file (0 for hub rows)
    contexts: tuple[str, ...]  # one per choice
    continuations: tuple[str, ...]  # one per choice
    gold: int
    choices: tuple[str, ...]  # the harness's doc_to_choice: acc_norm divides by their lengths


def _same_context(context: str, choices: list[str], gold: int, line: int) -> Question:
    return Question(line, (context,) * len(choices), tuple(TARGET_DELIMITER + c for c in choices), gold,
                    tuple(choices))


def _gold_in(choices, gold) -> int:
    gold = int(gold)
    if not 0 <= gold < len(choices):
        raise ValueError(f"answer index {gold} is not one of the {len(choices)} choices")
    return gold


def arc(doc: dict, line: int) -> Question:
    question = doc["question"]
    if isinstance(question, dict):  # the AI2 release: {"question": {"stem", "choices": [{"text", "label"}]}}
        texts = [c["text"] for c in question["choices"]]
        labels = [c["label"] for c in question["choices"]]
        question = question["stem"]
    else:  # the Hugging Face rows: "choices": {"text": [...], "label": [...]}
        texts, labels = list(doc["choices"]["text"]), list(doc["choices"]["label"])
    if doc["answerKey"] not in labels:
        raise ValueError(f"answerKey {doc['answerKey']!r} is not one of the labels {labels}")
    return _same_context(f"Question: {question}\nAnswer:", texts, labels.index(doc["answerKey"]), line)


def piqa(doc: dict, line: int) -> Question:
    choices = [doc["sol1"], doc["sol2"]]
    return _same_context(f"Question: {doc['goal']}\nAnswer:", choices, _gold_in(choices, doc["label"]), line)


def _hellaswag_clean(text: str) -> str:
    """The harness's preprocess: WikiHow's bracketed artifacts out, double spaces single."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def hellaswag(doc: dict, line: int) -> Question:
    context = _hellaswag_clean(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
    choices = [_hellaswag_clean(e) for e in doc["endings"]]
    return _same_context(context, choices, _gold_in(choices, doc["label"]), line)


def winogrande(doc: dict, line: int) -> Question:
    """Partial evaluation (Trinh & Le 2018): the option goes into the context, the shared rest is scored."""
    sentence = doc["sentence"]
    if "_" not in sentence:
        raise ValueError("the sentence has no blank (_)")
    blank = sentence.index("_")
    contexts = tuple(sentence[:blank] + doc[k] for k in ("option1", "option2"))
    rest = TARGET_DELIMITER + sentence[blank + 1:].strip()
    answer = {"1": 0, "2": 1}.get(str(doc["answer"]))
    if answer is None:
        raise ValueError(f"answer {doc['answer']!r} is not 1 or 2")
    return Question(line, contexts, (rest, rest), answer, contexts)


def boolq(doc: dict, line: int) -> Question:
    # SuperGLUE rows carry "label" (0 = no, 1 = yes); the original release "answer" (true / false)
    answer = doc["label"] if "label" in doc else doc["answer"]
    if not isinstance(answer, (bool, int)) or int(answer) not in (0, 1):
        raise ValueError(f"answer {answer!r} is not a boolean")
    return _same_context(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], int(answer), line)


def lambada(doc: dict, line: int) -> Question:
    words = doc["text"].split(" ")
    if len(words) < 2:
        raise ValueError("the text needs at least two words")
    return Question(line, (" ".join(words[:-1]),), (TARGET_DELIMITER + words[-1],), 0, (words[-1],))


@dataclass(frozen=True)
class Task:
    name: str
    parse: Callable[[dict, int], Question]
    metrics: tuple[str, ...]
    hub: tuple[str, str | None, str]  # Hugging Face dataset (path, name, split) when no file is given


TASKS = {t.name: t for t in (
    Task("arc_easy", arc, ("acc", "acc_norm"), ("allenai/ai2_arc", "ARC-Easy", "test")),
    Task("arc_challenge", arc, ("acc", "acc_norm"), ("allenai/ai2_arc", "ARC-Challenge", "test")),
    Task("piqa", piqa, ("acc", "acc_norm"), ("ybisk/piqa", None, "validation")),
    Task("hellaswag", hellaswag, ("acc", "acc_norm"), ("Rowan/hellaswag", None, "validation")),
    Task("winogrande", winogrande, ("acc",), ("allenai/winogrande", "winogrande_xl", "validation")),
    Task("boolq", boolq, ("acc",), ("google/boolq", None, "validation")),
    Task("lambada", lambada, ("perplexity", "acc"), ("EleutherAI/lambada_openai", "default", "test")),
)}


@dataclass
class Parsed:
    questions: list[Question] = field(default_factory=list)
    malformed: list[dict] = field(default_factory=list)  # {"line", "error"}


def parse_lines(task: Task, lines, limit: int | None = None) -> Parsed:
    """Questions from jsonl lines (1-based numbers); malformed lines are recorded, not raised."""
    parsed = Parsed()
    for number, text in enumerate(lines, 1):
        if limit is not None and len(parsed.questions) >= limit:
            break
        if not text.strip():
            continue
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict):
                raise ValueError(f"a JSON {type(doc).__name__}, not an object")
            parsed.questions.append(task.parse(doc, number))
        except json.JSONDecodeError as e:
            parsed.malformed.append({"line": number, "error": f"not JSON: {e.msg} at column {e.colno}"})
        except KeyError as e:
            parsed.malformed.append({"line": number, "error": f"no field {e}"})
        except (ValueError, TypeError, AttributeError) as e:
            parsed.malformed.append({"line": number, "error": str(e)})
    return parsed


def load_task(name: str, path: str | None, limit: int | None = None) -> tuple[Parsed, str]:
    """(questions, source) from a local jsonl file, or from the Hugging Face hub when no path is given."""
    if name not in TASKS:
        raise ValueError(f"--mc: unknown task {name!r}; the tasks are {', '.join(TASKS)}")
    task = TASKS[name]
    if path:
        source = Path(path)
        if not source.is_file():
            raise FileNotFoundError(f"--mc {name}: no such file: {source}")
        with open(source, encoding="utf-8") as f:
            return parse_lines(task, f, limit), str(source)
    import datasets

    hub_path, hub_name, split = task.hub
    try:
        rows = datasets.load_dataset(hub_path, hub_name, split=split)
    except Exception as e:  # offline, gated or renamed: say which dataset and how to avoid the hub
        raise FileNotFoundError(f"--mc {name}: could not load {hub_path} ({hub_name or 'default'}, {split}) from the "
                                f"hub ({type(e).__name__}: {e}); give a local file as {name}=PATH.jsonl") from e
    return parse_lines(task, (json.dumps(r) for r in rows), limit), f"hf://{hub_path}/{hub_name or ''}:{split}"


def _stderr(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")


def evaluate(config, params, tokenizer, name: str, parsed: Parsed, *, mesh, source: str, batch_size: int = 8,
             truncate: bool = False, progress: bool = True) -> dict:
    """The task's metrics (with standard errors) over the parsed questions, plus what was skipped."""
    task = TASKS[name]
    if not parsed.questions:
        lines = ", ".join(f"line {m['line']}: {m['error']}" for m in parsed.malformed[:5])
        raise ValueError(f"{source}: no question to score" + (f" (malformed: {lines})" if lines else ""))
    requests, names, owners = [], [], []
    for q_index, q in enumerate(parsed.questions):
        for context, continuation in zip(q.contexts, q.continuations, strict=True):
            requests.append(encode_pair(tokenizer, context, continuation))
            names.append(f"{source} line {q.line}")
            owners.append(q_index)
    scores = score_requests(config, params, requests, mesh=mesh, batch_size=batch_size, truncate=truncate,
                            progress=progress, desc=name, names=names)
    per_question: list[list] = [[] for _ in parsed.questions]
    for owner, s in zip(owners, scores, strict=True):
        per_question[owner].append(s)
    values: dict[str, list[float]] = {m: [] for m in task.metrics}
    for q, s in zip(parsed.questions, per_question, strict=True):
        lls = np.array([x.logprob for x in s])
        if "perplexity" in task.metrics:  # LAMBADA: one continuation, the target word
            values["perplexity"].append(-lls[0])
            values["acc"].append(float(s[0].is_greedy))
            continue
        values["acc"].append(float(np.argmax(lls) == q.gold))
        if "acc_norm" in task.metrics:
            lengths = np.array([float(len(c)) for c in q.choices])
            values["acc_norm"].append(float(np.argmax(lls / lengths) == q.gold))
    result = {"task": name, "source": source, "examples": len(parsed.questions)}
    for metric, v in values.items():
        v = np.asarray(v, np.float64)
        if metric == "perplexity":
            result["perplexity"] = math.exp(float(np.mean(v)))
        else:
            result[metric], result[f"{metric}_stderr"] = float(np.mean(v)), _stderr(v)
    result["truncated"] = sum(any(x.truncated for x in s) for s in per_question)
    result["malformed"] = parsed.malformed
    return result
