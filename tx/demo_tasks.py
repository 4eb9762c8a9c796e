"""Seeded synthetic chat tasks for the offline demo: small instructions the demo base model cannot do before.

Each record is one user turn and one assistant turn, the chat layout :mod:`tx.train.data` reads::

    >>> make_task_records(1, seed=0, task="reverse")[0]["messages"][0]["role"]
    'user'
    >>> rec = make_task_records(1, seed=2, task="sort")[0]
    >>> rec["messages"][0]["content"], rec["messages"][1]["content"]
    ('sort: 3 0 7 8', '0 3 7 8')

Tasks:
    ``sort`` (:data:`DEMO_TASK`): "sort: 7 2 9 4" -> "2 4 7 9" (3-6 distinct digits, ascending).
    ``reverse``: "reverse: queue token result file" -> "file result token queue" (3-6 distinct :data:`WORDS`).
    ``mix``: each record draws one of the two.

On the demo base (``tx/assets/demo-base``) ``sort`` is the one to show: a LoRA fine-tune of a few hundred
steps (batch 8 x 64 tokens) takes the answer loss from about 3.6 to a few hundredths and the greedy answers
become exact. ``reverse`` needs copying by position, which a model pretrained for minutes has not learned; the
same budget only halves its loss (answers have the right words, partly in the right order).

Everything is a pure function of ``seed``: the same arguments give the same records on every machine.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from pathlib import Path

TASKS = ("reverse", "sort", "mix")
DEMO_TASK = "sort"  # the task the demo base learns clearly in a minute or two of CPU

# Distinct plain words that the demo tokenizer keeps whole after a space (and in at most two pieces at the start
# of a reply), so an answer is a short sequence of tokens to reorder, not to spell. The tests check this.
WORDS: tuple[str, ...] = tuple(
    """
    block change chunk client count data date entry event field file flag frame group header index
    item line link list lock loop message method mode name node number order output parent part
    path pattern queue range result root server size source state stream system tag text thread time
    token user value version
    """.split()
)
MAX_NUMBER = 9  # sort draws distinct digits: the demo tokenizer splits numbers into single digits


def _items(rng: random.Random, task: str, min_items: int, max_items: int) -> list[str]:
    k = rng.randint(min_items, max_items)
    if task == "reverse":
        return rng.sample(WORDS, k)
    return [str(n) for n in rng.sample(range(MAX_NUMBER + 1), k)]


def answer(task: str, items: list[str]) -> str:
    """The assistant's reply for ``task`` ("reverse" or "sort") over ``items``."""
    if task == "reverse":
        return " ".join(reversed(items))
    if task == "sort":
        return " ".join(str(n) for n in sorted(int(i) for i in items))
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS[:-1])}")


def make_record(task: str, items: list[str]) -> dict:
    """One chat record ``{"messages": [user, assistant]}`` for ``task`` over ``items``."""
    return {
        "messages": [
            {"role": "user", "content": f"{task}: {' '.join(items)}"},
            {"role": "assistant", "content": answer(task, items)},
        ]
    }


def make_task_records(
    n: int, seed: int = 0, task: str = DEMO_TASK, *, min_items: int = 3, max_items: int = 6, exclude=()
) -> list[dict]:
    """``n`` chat records of ``task`` ("reverse", "sort" or "mix"), deterministic given ``seed``.

    ``exclude``: records (or their user prompts) that must not appear, e.g. the training set when drawing an
    eval set; see :func:`make_task_split`.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if not 1 <= min_items <= max_items:
        raise ValueError(f"need 1 <= min_items <= max_items, got {min_items} and {max_items}")
    limit = len(WORDS) if task == "reverse" else MAX_NUMBER + 1
    if max_items > limit:
        raise ValueError(f"max_items {max_items} exceeds the {limit} distinct items task {task!r} draws from")
    banned = {r if isinstance(r, str) else r["messages"][0]["content"] for r in exclude}
    rng = random.Random(f"tx-demo-{task}-{seed}")
    records = []
    attempts = 0
    while len(records) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct-enough {task!r} records with these settings")
        kind = rng.choice(TASKS[:-1]) if task == "mix" else task
        record = make_record(kind, _items(rng, kind, min_items, max_items))
        if record["messages"][0]["content"] in banned:
            continue
        records.append(record)
    return records


def make_task_split(
    n_train: int, n_eval: int, seed: int = 0, task: str = DEMO_TASK, **kwargs
) -> tuple[list[dict], list[dict]]:
    """Train and eval records of ``task`` whose prompts do not overlap (eval draws with seed + 1)."""
    train = make_task_records(n_train, seed, task, **kwargs)
    evals = make_task_records(n_eval, seed + 1, task, exclude=train, **kwargs)
    return train, evals


def write_jsonl(records: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write one JSON object per line (UTF-8) and return the path; parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
