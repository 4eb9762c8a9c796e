"""The common record schemas, recognised by their columns, turned into tx's three kinds of record.

====================  ===========================================  =========================================
schema                columns                                      loss on
====================  ===========================================  =========================================
messages              ``messages``: [{role, content}, ...]         the assistant replies
sharegpt              ``conversations``: [{from, value}, ...]      the ``gpt`` replies (roles human/gpt/system)
prompt/completion     ``prompt``, ``completion``                   the completion (and eos)
alpaca                ``instruction``, ``output`` (+ ``input``)    the output
text                  ``text``                                     every token
====================  ===========================================  =========================================

A row may have other columns too (ids, scores); they are ignored. Where a row matches several schemas the one
higher in the table wins (Alpaca data often carries a ready-formatted ``text`` column as well).
``prompt``/``completion`` strings are joined as plain text; message lists are rendered with the chat template.
Alpaca rows become a user turn (instruction, a blank line, input) and an assistant turn (output).
Other column names map onto these with ``columns={"prompt": "question", "completion": "answer"}``
(``--columns prompt=question,completion=answer``).

The kinds of record: ``{"text": str}``, ``{"messages": [...]}`` (optionally ``"completion_from": k``: only
assistant messages from index k count) and ``{"prompt": str, "completion": str}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from tx.errors import ConfigError, DataError

ROLES = ("system", "developer", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
SCHEMAS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt/completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
COLUMNS = ("messages", "conversations", "prompt", "completion", "instruction", "input", "output", "text")
KNOWN = "; ".join(f"{name} ({', '.join(cols)})" for name, cols in SCHEMAS.items())


class Record(dict):
    """A validated record (a plain dict) that remembers where it came from, e.g. ``"train.jsonl, line 3"``."""

    __slots__ = ("where",)

    def __init__(self, data: Mapping[str, Any], where: str):
        super().__init__(data)
        self.where = where


def parse_columns(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"prompt=question,completion=answer"`` (or a dict) -> ``{"prompt": "question", ...}`` (tx name -> file's)."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        pairs = [p.strip() for p in spec.split(",") if p.strip()]
        if not all(p.count("=") == 1 for p in pairs):
            raise ConfigError(
                f"columns should be NAME=COLUMN pairs such as prompt=question,completion=answer; got {spec!r}"
            )
        spec = dict(tuple(s.strip() for s in p.split("=")) for p in pairs)
    if not isinstance(spec, Mapping):
        raise ConfigError(f"columns should be a dict {{tx name: column}} or 'name=column,...', got {spec!r}")
    for name, column in spec.items():
        if name not in COLUMNS:
            raise ConfigError(f"columns: {name!r} is not a column tx knows; map onto one of {', '.join(COLUMNS)}")
        if not isinstance(column, str) or not column:
            raise ConfigError(f"columns: {name}= needs a column name, got {column!r}")
    return dict(spec)


def schema_of(keys) -> str | None:
    """The schema a row with these column names follows (the first match in :data:`SCHEMAS`), or None."""
    keys = set(keys)
    for name, cols in SCHEMAS.items():
        if keys.issuperset(cols):
            return name
    return None


def to_record(row: Any, where: str, columns: Mapping[str, str] | None = None, *, text_cells: bool = False) -> Record:
    """One raw row -> a validated :class:`Record`; ``where`` names it in errors.

    ``columns`` renames the file's columns to tx's; ``text_cells`` (CSV) lets list-valued columns hold JSON text.
    """

    def fail(problem: str):
        raise DataError(f"{where}: {problem}")

    if not isinstance(row, Mapping):
        fail(f"found a JSON {type(row).__name__}, not an object with named columns; tx knows the schemas {KNOWN}")
    if columns:
        missing = [c for c in columns.values() if c not in row]
        if missing:
            fail(f"no column {', '.join(map(repr, missing))} (mapped by columns=...); found {sorted(row)}")
        row = {**{k: v for k, v in row.items() if k not in columns.values()}, **{n: row[c] for n, c in columns.items()}}
    schema = schema_of(row)
    if schema is None:
        fail(f"no known schema in the columns {sorted(row)}; tx knows {KNOWN} (map other names with --columns)")

    def column(name: str, kinds: tuple[type, ...], optional: bool = False):
        value = row.get(name)
        if value is None and optional:
            return None
        if text_cells and list in kinds and isinstance(value, str) and value.lstrip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                fail(f"column {name!r} holds text that is not a JSON list ({exc.msg})")
        if not isinstance(value, kinds):
            want = " or ".join("a string" if k is str else "a list" for k in kinds)
            fail(f"column {name!r} should be {want}, found {type(value).__name__}")
        return value

    if schema == "text":
        text = column("text", (str,))
        if not text:
            fail("'text' is empty")
        return Record({"text": text}, where)
    if schema == "messages":
        messages = column("messages", (list,))
        return Record({"messages": _messages(messages, "messages", fail)}, where)
    if schema == "sharegpt":
        turns = column("conversations", (list,))
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
                fail(f"conversations[{i}] should be an object with a string 'value', found {_show(turn)}")
            if turn.get("from") not in SHAREGPT_ROLES:
                fail(f"conversations[{i}] has 'from' {turn.get('from')!r}; ShareGPT roles are human, gpt, system")
            messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
        return Record({"messages": _messages(messages, "conversations", fail)}, where)
    if schema == "alpaca":
        instruction, output = column("instruction", (str,)), column("output", (str,))
        extra = column("input", (str,), optional=True)
        if not output:
            fail("'output' is empty, so nothing to learn from")
        user = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return Record({"messages": messages, "completion_from": 1}, where)
    prompt, completion = column("prompt", (str, list)), column("completion", (str, list))
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion:
            fail("'completion' is empty, so nothing to learn from")
        return Record({"prompt": prompt, "completion": completion}, where)
    if isinstance(prompt, str) or isinstance(completion, str):
        fail("'prompt' and 'completion' should both be strings or both be message lists")
    prompt = _messages(prompt, "prompt", fail, need_assistant=False)
    completion = _messages(completion, "completion", fail)
    return Record({"messages": prompt + completion, "completion_from": len(prompt)}, where)


def _messages(messages: list, name: str, fail, need_assistant: bool = True) -> list[dict]:
    if not messages:
        fail(f"{name!r} should be a non-empty list of {{'role': ..., 'content': ...}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            fail(f"{name}[{i}] should be an object, found {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            fail(f"{name}[{i}] has role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            found = type(message["content"]).__name__ if "content" in message else "nothing"
            fail(f"{name}[{i}] 'content' should be a string, found {found}")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        fail(f"{name!r} has no assistant message, so nothing to learn from")
    return [dict(m) for m in messages]


def _show(value: Any) -> str:
    return type(value).__name__ if not isinstance(value, Mapping) else f"keys {sorted(value)}"
