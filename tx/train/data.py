"""JSONL text and chat -> tokens -> fixed-shape batches with loss masks. numpy only.

Data: one JSON object per line, either ``{"text": "..."}`` (loss on every token; bos when the tokenizer adds one,
eos appended) or ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}``
(rendered with the tokenizer's chat template; loss only on the assistant replies and their end-of-turn token).

Batch: a dict of numpy arrays, each ``[batch_size, seq_len]``:

- ``input_ids``   int32, the tokens fed to the model (pad id where unused).
- ``targets``     int32, the token that follows ``input_ids[b, t]`` in the same document.
- ``loss_mask``   float32, 1 where ``targets[b, t]`` counts in the loss, else 0 (prompt, padding).
- ``segment_ids`` int32, 1, 2, ... for the documents (pieces) packed into a row, 0 for padding. A token may
  attend only to earlier tokens of the same non-zero segment.
- ``positions``   int32, the position within its segment, restarting at 0 for each packed document; always
  below ``min(seq_len, max_positions)``.

A document of L tokens gives L - 1 (input, target) pairs, so no target ever crosses a document boundary. A
document with more pairs than ``min(seq_len, max_positions)`` is split into chunks of that size, each its own
segment with positions from 0 (in "pad" mode it is first truncated to ``seq_len``, and counted and warned about).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tx.errors import ConfigError, DataError, TxError

ROLES = ("system", "developer", "user", "assistant", "tool")
MODES = ("pack", "pad")
EXPECTED = (
    'one JSON object per line: {"text": "..."} or '
    '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
)


class Record(dict):
    """A validated record (a plain dict) that remembers where it came from, e.g. ``"train.jsonl, line 3"``."""

    __slots__ = ("where",)

    def __init__(self, data: Mapping[str, Any], where: str):
        super().__init__(data)
        self.where = where


# -- reading ----------------------------------------------------------------------------------------------------


def read_jsonl(path: str | os.PathLike) -> list[Record]:
    """Read and validate a JSONL file of text or chat records (blank lines are skipped).

    Raises:
        DataError: the file is missing or empty, or a line is not valid JSON, or not a valid record; the message
            names the file, the line number and what is expected.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; expected a JSONL file with {EXPECTED}")
    records = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}, line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); expected {EXPECTED}"
                ) from None
            records.append(validate_record(obj, where))
    if not records:
        raise DataError(f"{path} is empty (no records); expected {EXPECTED}")
    return records


def validate_record(obj: Any, where: str) -> Record:
    """Check one record's shape and return it as a :class:`Record`; ``where`` names it in errors."""

    def fail(problem: str):
        raise DataError(f"{where}: {problem}; expected {EXPECTED}")

    if not isinstance(obj, Mapping):
        fail(f"found a JSON {type(obj).__name__}, not an object")
    has_text, has_messages = "text" in obj, "messages" in obj
    if has_text == has_messages:
        fail("a record needs exactly one of the keys 'text' and 'messages'" + (f", found {sorted(obj)}"))
    if has_text:
        if not isinstance(obj["text"], str):
            fail(f"'text' should be a string, found {type(obj['text']).__name__}")
        if not obj["text"]:
            fail("'text' is empty")
        return Record(obj, where)
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        fail("'messages' should be a non-empty list of {'role': ..., 'content': ...} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            fail(f"messages[{i}] should be an object, found {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            fail(f"messages[{i}] has role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            found = type(message["content"]).__name__ if "content" in message else "nothing"
            fail(f"messages[{i}] 'content' should be a string, found {found}")
    if not any(m["role"] == "assistant" for m in messages):
        fail("the conversation has no assistant message, so nothing to learn from")
    return Record(obj, where)


def _validated(data: Sequence[Mapping[str, Any]]) -> list[Record]:
    if isinstance(data, (str, bytes, Mapping)):
        raise ConfigError("data should be a JSONL path or a list of records")
    records = [r if isinstance(r, Record) else validate_record(r, f"record {i}") for i, r in enumerate(data)]
    if not records:
        raise DataError(
            f"no records; expected a list of records, each {EXPECTED.removeprefix('one JSON object per line: ')}"
        )
    return records


def split_eval(
    records: Sequence[Mapping[str, Any]], size: float | int, seed: int = 0
) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """Split records into (train, eval), deterministically for a given seed; both keep the original order.

    ``size`` is a fraction in (0, 1) (at least one record) or a count >= 1 of eval records.
    """
    n = len(records)
    if isinstance(size, float):
        if not 0 < size < 1:
            raise ConfigError(f"eval fraction should be in (0, 1), got {size}")
        count = max(1, round(size * n))
    elif isinstance(size, (int, np.integer)) and not isinstance(size, bool) and size >= 1:
        count = int(size)
    else:
        raise ConfigError(f"eval size should be a fraction in (0, 1) or a count >= 1, got {size!r}")
    if count >= n:
        raise DataError(f"cannot hold out {count} eval records from {n}: no training records would be left")
    perm = np.random.default_rng([seed, 7]).permutation(n)
    eval_idx = set(perm[:count].tolist())
    train = [r for i, r in enumerate(records) if i not in eval_idx]
    held = [r for i, r in enumerate(records) if i in eval_idx]
    return train, held


# -- tokenizing -------------------------------------------------------------------------------------------------


def check_vocab(ids_max: int, vocab_size: int, tokenizer_size: int | None = None) -> None:
    """Raise :class:`DataError` if a token id does not fit the model's embedding table of ``vocab_size`` rows."""
    if ids_max >= vocab_size:
        has = f" (the tokenizer has {tokenizer_size} ids)" if tokenizer_size is not None else ""
        raise DataError(
            f"token id {ids_max} >= model vocab size {vocab_size}{has}: the tokenizer does not match the model; "
            "use the tokenizer of the same checkpoint"
        )


def tokenize_text(tokenizer, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Texts -> ``(ids int32 [L], labels bool [L])``: bos if the tokenizer adds one, eos appended, loss on all."""
    if tokenizer.eos_id is None:
        raise DataError("the tokenizer has no eos token, which ends each text document; set eos_token in its config")
    eos = tokenizer.eos_id
    out = []
    for enc in tokenizer.backend.encode_batch(list(texts), add_special_tokens=True):
        ids = enc.ids
        if not ids or ids[-1] != eos:
            ids = [*ids, eos]
        out.append((np.asarray(ids, np.int32), np.ones(len(ids), bool)))
    return out


def assistant_spans(tokenizer, messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and find the character span of each assistant reply plus its end-of-turn token.

    A turn starts where ``messages[:i]`` rendered with the generation prompt ends (so the role header is not
    in the span) and ends where ``messages[:i + 1]`` rendered ends, less trailing whitespace. Where a template
    renders history differently from the last turn (Qwen3's think blocks), the reply text is searched for and
    extended over an immediately following special token (``<|im_end|>``, ``</s>``, ...).
    """
    full = tokenizer.apply_chat_template(messages)
    specials = None
    spans: list[tuple[int, int]] = []
    prev = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        content = message["content"]
        start = end = None
        prefix = _render_or_none(tokenizer, messages[:i], True) if i else None
        if prefix is not None and full.startswith(prefix) and len(prefix) >= prev:
            start = len(prefix)
        upto = _render_or_none(tokenizer, messages[: i + 1], False)
        if upto is not None and full.startswith(upto) and len(upto) > (start if start is not None else prev):
            end = len(upto)
        if start is None or end is None:
            needle = content if content in full[prev:] else content.strip()
            found = full.find(needle, start if start is not None else prev)
            if found < 0 or not needle:
                raise DataError(
                    f"messages[{i}]: cannot find the assistant reply in the conversation rendered by the chat "
                    "template, so its loss mask is unknown"
                )
            if start is None:
                start = found
            if end is None:
                end = found + len(needle)
                if specials is None:
                    specials = _special_strings(tokenizer)
                for tok in specials:
                    if full.startswith(tok, end):
                        end += len(tok)
                        break
        while end > start and full[end - 1].isspace():
            end -= 1
        spans.append((start, end))
        prev = end
    return full, spans


def tokenize_chat(tokenizer, conversations: Sequence[Sequence[Mapping[str, Any]]], wheres: Sequence[str] | None = None):
    """Conversations -> ``(ids int32 [L], labels bool [L])`` with labels True only on assistant reply tokens."""
    if getattr(tokenizer, "chat_template", None) is None:
        where = f"{wheres[0]}: " if wheres else ""
        raise DataError(
            f"{where}chat records need a chat template, but the tokenizer has none (no 'chat_template' in "
            "tokenizer_config.json, no chat_template.jinja); use an instruct model's tokenizer or text records"
        )
    rendered = []
    for k, messages in enumerate(conversations):
        try:
            rendered.append(assistant_spans(tokenizer, messages))
        except TxError as exc:
            where = wheres[k] if wheres else f"conversation {k}"
            raise DataError(f"{where}: {exc}") from None
    out = []
    encodings = tokenizer.backend.encode_batch([text for text, _ in rendered], add_special_tokens=False)
    for (_, spans), enc in zip(rendered, encodings):
        offsets = np.asarray(enc.offsets, np.int64).reshape(-1, 2)
        labels = np.zeros(len(enc.ids), bool)
        for s, e in spans:  # a token counts if its characters overlap a reply span
            labels |= (offsets[:, 1] > s) & (offsets[:, 0] < e)
        out.append((np.asarray(enc.ids, np.int32), labels))
    return out


def tokenize(tokenizer, records: Sequence[Mapping[str, Any]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Validated records -> ``(ids, labels)`` per record, in order (text and chat may be mixed)."""
    records = _validated(records)
    docs: list[Any] = [None] * len(records)
    text_idx = [i for i, r in enumerate(records) if "text" in r]
    chat_idx = [i for i, r in enumerate(records) if "messages" in r]
    if text_idx:
        for i, doc in zip(text_idx, tokenize_text(tokenizer, [records[i]["text"] for i in text_idx])):
            docs[i] = doc
    if chat_idx:
        chats = tokenize_chat(
            tokenizer, [records[i]["messages"] for i in chat_idx], [records[i].where for i in chat_idx]
        )
        for i, doc in zip(chat_idx, chats):
            docs[i] = doc
    return docs


def _best_fit(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Online best-fit bin packing: the row index of each item, taken in order (rows numbered as opened)."""
    open_rows: list[list[int]] = [[] for _ in range(capacity + 1)]  # free space -> rows with that much free
    has = np.zeros(capacity + 1, bool)
    rows = np.empty(len(lengths), np.int64)
    opened = 0
    for i, n in enumerate(lengths.tolist()):
        free = n + int(has[n:].argmax())
        if not has[free]:  # nothing fits: open a new row
            row, free = opened, capacity
            opened += 1
        else:
            row = open_rows[free].pop()
            has[free] = bool(open_rows[free])
        rows[i] = row
        if free - n > 0:
            open_rows[free - n].append(row)
            has[free - n] = True
    return rows


def _render_or_none(tokenizer, messages, add_generation_prompt: bool) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except Exception:  # a template may refuse a partial conversation; the caller falls back to searching
        return None


def _special_strings(tokenizer) -> list[str]:
    decoder = tokenizer.backend.get_added_tokens_decoder()
    tokens = {t.content for t in decoder.values() if t.special and t.content}
    return sorted(tokens, key=len, reverse=True)


# -- batching ---------------------------------------------------------------------------------------------------


class Dataset:
    """Tokenized records laid out in rows of ``seq_len`` and served as batches; see the module docstring.

    ``batch(step)`` is a pure function of ``(seed, step)``: the rows form an endless stream, epoch ``e`` being
    all rows in the order of a permutation seeded by ``(seed, e)``, and step ``k`` takes stream rows
    ``[k * batch_size, (k + 1) * batch_size)``. So a run resumed at step k sees exactly the batches an
    uninterrupted run sees, no row is dropped, and a batch may span the end of one epoch and the start of the
    next.

    Args:
        data: a JSONL path or a list of records (``{"text": ...}`` / ``{"messages": [...]}``).
        tokenizer: a :class:`tx.tokenizer.Tokenizer`.
        seq_len: row length S.
        batch_size: rows per batch B.
        seed: fixes the document order in "pack" mode and each epoch's row order.
        mode: "pack" (documents, in an order shuffled by ``seed``, each go into the open row they fill best;
            never split across rows unless longer than a row) or "pad" (one document per row, truncated to
            ``seq_len``, padded).
        max_positions: the model's context length; segments never exceed it: longer documents are chunked
            (in "pad" mode each chunk takes its own row).
        vocab_size: the model's vocabulary size; a larger token id is a :class:`DataError`.
        shuffle: False keeps file order for packing and rows (for eval sets; ``eval_batches`` never shuffles).
    """

    def __init__(
        self,
        data: str | os.PathLike | Sequence[Mapping[str, Any]],
        tokenizer,
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        mode: str = "pack",
        max_positions: int | None = None,
        vocab_size: int | None = None,
        shuffle: bool = True,
    ):
        if mode not in MODES:
            raise ConfigError(f"mode should be one of {MODES}, got {mode!r}")
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("max_positions", max_positions)):
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
                raise ConfigError(f"{name} should be an integer >= 1, got {value!r}")
        self.seq_len, self.batch_size, self.seed, self.mode, self.shuffle = seq_len, batch_size, seed, mode, shuffle
        self.source = str(data) if isinstance(data, (str, os.PathLike)) else "records"
        records = read_jsonl(data) if isinstance(data, (str, os.PathLike)) else _validated(data)
        docs = tokenize(tokenizer, records)
        self.num_documents = len(docs)
        self.max_id = max((int(ids.max()) for ids, _ in docs if len(ids)), default=-1)
        if vocab_size is not None:
            check_vocab(self.max_id, vocab_size, getattr(tokenizer, "vocab_size", None))
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        chunk = min(seq_len, max_positions or seq_len)
        self._layout(docs, chunk)
        self._perms: dict[int, np.ndarray] = {}

    def _layout(self, docs: list[tuple[np.ndarray, np.ndarray]], chunk: int) -> None:
        order = np.random.default_rng([self.seed, 1]).permutation(len(docs)) if self.shuffle else range(len(docs))
        docs = [docs[i] for i in order]
        pairs = np.asarray([len(ids) - 1 for ids, _ in docs], np.int64).clip(0)
        if self.mode == "pad":
            self.num_truncated = int((pairs > self.seq_len).sum())
            if self.num_truncated:
                warnings.warn(
                    f"{self.num_truncated} of {len(docs)} documents in {self.source} are longer than "
                    f"seq_len={self.seq_len} and were truncated (mode='pad'; use mode='pack' to keep them whole)",
                    stacklevel=3,
                )
            pairs = np.minimum(pairs, self.seq_len)
        else:
            self.num_truncated = 0
        self.num_chunked = int((pairs > chunk).sum())
        if pairs.sum() == 0:
            raise DataError(f"{self.source}: no document has two or more tokens, so there is nothing to predict")
        self._inputs = np.concatenate([ids[:n] for (ids, _), n in zip(docs, pairs)])
        self._targets = np.concatenate([ids[1 : n + 1] for (ids, _), n in zip(docs, pairs)])
        self._labels = np.concatenate([lab[1 : n + 1] for (_, lab), n in zip(docs, pairs)])
        # pieces: each document cut into runs of at most `chunk` pairs
        counts = -(-pairs // chunk)
        first = np.repeat(np.cumsum(counts) - counts, counts)
        piece_doc = np.repeat(np.arange(len(docs)), counts)
        piece_len = np.minimum(chunk, pairs[piece_doc] - (np.arange(len(piece_doc)) - first) * chunk)
        piece_start = np.cumsum(piece_len) - piece_len
        self._positions = (np.arange(len(self._inputs)) - np.repeat(piece_start, piece_len)).astype(np.int32)
        if self.mode == "pad":
            self._row_start = np.append(piece_start, len(self._inputs))
            return
        # pack: put each piece into the row it fills best, then lay rows out contiguously
        row = _best_fit(piece_len, self.seq_len)
        order = np.argsort(row, kind="stable")
        new_len = piece_len[order]
        new_start = np.cumsum(new_len) - new_len
        gather = np.repeat(piece_start[order] - new_start, new_len) + np.arange(len(self._inputs))
        self._inputs, self._targets = self._inputs[gather], self._targets[gather]
        self._labels, self._positions = self._labels[gather], self._positions[gather]
        per_row = np.bincount(row, weights=piece_len, minlength=row.max() + 1).astype(np.int64)
        self._row_start = np.concatenate([[0], np.cumsum(per_row)])

    # -- sizes --

    @property
    def num_rows(self) -> int:
        return len(self._row_start) - 1

    @property
    def num_tokens(self) -> int:
        """Input positions holding a token (not padding)."""
        return len(self._inputs)

    @property
    def num_loss_tokens(self) -> int:
        """Targets that count in the loss."""
        return int(self._labels.sum())

    @property
    def fill(self) -> float:
        """Fraction of row positions holding a token."""
        return self.num_tokens / (self.num_rows * self.seq_len)

    def __len__(self) -> int:
        """Batches per epoch: ceil(num_rows / batch_size)."""
        return math.ceil(self.num_rows / self.batch_size)

    def __repr__(self) -> str:
        return (
            f"Dataset({self.source}, mode={self.mode}, documents={self.num_documents}, rows={self.num_rows}, "
            f"tokens={self.num_tokens}, loss_tokens={self.num_loss_tokens}, fill={self.fill:.0%}, "
            f"batches/epoch={len(self)})"
        )

    # -- access --

    def rows(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Rows by index (in layout order) as a batch dict ``[len(indices), seq_len]``; index -1 is an empty row."""
        idx = np.asarray(indices, np.int64)
        empty = idx < 0
        start = np.where(empty, 0, self._row_start[np.where(empty, 0, idx)])
        length = np.where(empty, 0, self._row_start[np.where(empty, 0, idx) + 1] - start)
        col = np.arange(self.seq_len)
        valid = col[None, :] < length[:, None]
        flat = np.where(valid, start[:, None] + col[None, :], 0)
        positions = np.where(valid, self._positions[flat], 0)
        seg_start = valid & (positions == 0)
        return {
            "input_ids": np.where(valid, self._inputs[flat], self.pad_id).astype(np.int32),
            "targets": np.where(valid, self._targets[flat], self.pad_id).astype(np.int32),
            "loss_mask": (valid & self._labels[flat]).astype(np.float32),
            "segment_ids": (np.cumsum(seg_start, axis=1) * valid).astype(np.int32),
            "positions": positions.astype(np.int32),
        }

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows)
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(next(iter(self._perms)))
            self._perms[epoch] = np.random.default_rng([self.seed, 2, epoch]).permutation(self.num_rows)
        return self._perms[epoch]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The training batch of ``step`` (0-based); a pure function of (seed, step)."""
        if step < 0:
            raise ValueError(f"step should be >= 0, got {step}")
        stream = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs, within = np.divmod(stream, self.num_rows)
        rows = np.empty_like(stream)
        for epoch in np.unique(epochs).tolist():
            sel = epochs == epoch
            rows[sel] = self._epoch_order(epoch)[within[sel]]
        return self.rows(rows)

    def epoch(self, step: int) -> float:
        """How many epochs the batches before ``step`` cover."""
        return step * self.batch_size / self.num_rows

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Training batches from step 0, endlessly; use :meth:`iterate` to resume from a step."""
        return self.iterate()

    def iterate(self, start_step: int = 0, steps: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Training batches ``batch(start_step), batch(start_step + 1), ...`` (endless if ``steps`` is None)."""
        step = start_step
        while steps is None or step < start_step + steps:
            yield self.batch(step)
            step += 1

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """Every row once, in layout order; the last batch is filled up with empty rows (loss_mask 0)."""
        for first in range(0, self.num_rows, self.batch_size):
            idx = np.arange(first, first + self.batch_size)
            yield self.rows(np.where(idx < self.num_rows, idx, -1))
