"""Training data -> tokens -> fixed-shape batches with loss masks. numpy only (pyarrow for parquet / Arrow).

Data: anything :mod:`tx.train.readers` reads (JSONL, JSON, CSV, parquet, Arrow, ``save_to_disk`` folders, a
folder of files, a hub dataset id) in any schema :mod:`tx.train.schemas` knows (text, messages, ShareGPT,
Alpaca, prompt/completion), or a list of records. Text documents get bos when the tokenizer adds one and eos
appended, loss on every token; chats are rendered with the tokenizer's chat template, loss only on the
assistant replies and their end-of-turn token; prompt/completion pairs put the loss on the completion (and eos)
only. Paths are tokenised once into an on-disk, memory-mapped cache (:mod:`tx.train.token_cache`).

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

import functools
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tx.errors import ConfigError, DataError, TxError
from tx.train import readers
from tx.train.schemas import KNOWN, Record, parse_columns, to_record
from tx.train.token_cache import TokenStore, default_cache_dir, open_cached

MODES = ("pack", "pad")

__all__ = ["Dataset", "Record", "Source", "TokenStore", "read_records", "split_eval", "tokenize"]


@dataclass(frozen=True)
class Source:
    """Where data is and how to read it: ``path`` (file, folder or hub dataset id), the ``split``, a column
    mapping ``{tx name: column}`` (or ``"prompt=question,completion=answer"``) and the token cache folder
    (None: the default; False: tokenise in memory)."""

    path: str | os.PathLike
    split: str = "train"
    columns: Mapping[str, str] | str | None = field(default=None, hash=False)
    cache_dir: str | os.PathLike | bool | None = None

    def files(self):
        return readers.data_files(self.path, self.split)

    @property
    def mapping(self) -> dict[str, str]:
        return parse_columns(self.columns)

    def __str__(self) -> str:
        return str(self.path) + (f" [{self.split}]" if self.split != "train" else "")


def as_source(data) -> Source:
    return data if isinstance(data, Source) else Source(data)


# -- reading ----------------------------------------------------------------------------------------------------


def block_records(rows: list[tuple[str, Any]], columns: Mapping[str, str] | None = None) -> list[Record]:
    """Raw ``(where, row)`` pairs of one block -> validated records."""
    return [to_record(row, where, columns, text_cells=isinstance(row, readers.TextCells)) for where, row in rows]


def read_records(
    data: str | os.PathLike | Source, split: str | None = None, columns: Mapping[str, str] | str | None = None
) -> list[Record]:
    """Every record of a data source, read into memory and validated (see :mod:`tx.train.readers`).

    Raises:
        DataError: missing or empty data, a bad row (the message names the file, the line or row and the
            column), an unknown schema (it lists the columns found and the schemas tx knows).
    """
    source = as_source(data)
    if split is not None or columns is not None:
        columns = columns if columns is not None else source.columns
        source = Source(source.path, split or source.split, columns, source.cache_dir)
    mapping = source.mapping
    records = [r for b in readers.blocks(source.files()) for r in block_records(b.load(), mapping)]
    if not records:
        raise DataError(f"{source} is empty (no records); tx reads rows with the columns of {KNOWN}")
    return records


def _validated(data: Sequence[Mapping[str, Any]]) -> list[Record]:
    if isinstance(data, (str, bytes, Mapping)):
        raise ConfigError("data should be a path, a tx.train.data.Source or a list of records")
    records = [r if isinstance(r, Record) else to_record(r, f"record {i}") for i, r in enumerate(data)]
    if not records:
        raise DataError(f"no records; expected a list of records with the columns of {KNOWN}")
    return records


def split_indices(n: int, size: float | int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Document indices ``(train, eval)`` of a deterministic split, both in the original order.

    ``size`` is a fraction in (0, 1) (at least one record) or a count >= 1 of eval records.
    """
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
    held = np.zeros(n, bool)
    held[np.random.default_rng([seed, 7]).permutation(n)[:count]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def split_eval(
    records: Sequence[Mapping[str, Any]], size: float | int, seed: int = 0
) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """Split records into (train, eval) as :func:`split_indices` does."""
    train, held = split_indices(len(records), size, seed)
    return [records[i] for i in train], [records[i] for i in held]


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


def assistant_spans(
    tokenizer, messages: Sequence[Mapping[str, Any]], first: int = 0
) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and find the character span of each assistant reply plus its end-of-turn token
    (of the replies from ``messages[first]`` on: a prompt's own assistant turns are context, not targets).

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
        if i >= first:
            spans.append((start, end))
        prev = end
    return full, spans


def tokenize_chat(
    tokenizer,
    conversations: Sequence[Sequence[Mapping[str, Any]]],
    wheres: Sequence[str] | None = None,
    firsts: Sequence[int] | None = None,
):
    """Conversations -> ``(ids int32 [L], labels bool [L])`` with labels True only on assistant reply tokens
    (from message ``firsts[k]`` on, where given)."""
    if getattr(tokenizer, "chat_template", None) is None:
        where = f"{wheres[0]}: " if wheres else ""
        raise DataError(
            f"{where}chat records need a chat template, but the tokenizer has none (no 'chat_template' in "
            "tokenizer_config.json, no chat_template.jinja); use an instruct model's tokenizer or text records"
        )
    rendered = []
    for k, messages in enumerate(conversations):
        try:
            rendered.append(assistant_spans(tokenizer, messages, firsts[k] if firsts else 0))
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


def tokenize_pairs(tokenizer, prompts: Sequence[str], completions: Sequence[str]):
    """Prompt/completion strings -> ``(ids, labels)``: bos if the tokenizer adds one, the prompt, the completion,
    eos; loss on the completion and eos only."""
    if tokenizer.eos_id is None:
        raise DataError("the tokenizer has no eos token, which ends each completion; set eos_token in its config")
    eos = tokenizer.eos_id
    heads = tokenizer.backend.encode_batch(list(prompts), add_special_tokens=True)
    tails = tokenizer.backend.encode_batch(list(completions), add_special_tokens=False)
    out = []
    for head, tail in zip(heads, tails):
        p = head.ids[:-1] if head.ids and head.ids[-1] == eos else head.ids
        c = tail.ids if tail.ids and tail.ids[-1] == eos else [*tail.ids, eos]
        labels = np.zeros(len(p) + len(c), bool)
        labels[len(p) :] = True
        out.append((np.asarray([*p, *c], np.int32), labels))
    return out


def tokenize(tokenizer, records: Sequence[Mapping[str, Any]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Validated records -> ``(ids, labels)`` per record, in order (the kinds may be mixed)."""
    records = _validated(records)
    docs: list[Any] = [None] * len(records)
    text_idx = [i for i, r in enumerate(records) if "text" in r]
    chat_idx = [i for i, r in enumerate(records) if "messages" in r]
    pair_idx = [i for i, r in enumerate(records) if "prompt" in r]
    if text_idx:
        for i, doc in zip(text_idx, tokenize_text(tokenizer, [records[i]["text"] for i in text_idx])):
            docs[i] = doc
    if chat_idx:
        chats = tokenize_chat(
            tokenizer,
            [records[i]["messages"] for i in chat_idx],
            [records[i].where for i in chat_idx],
            [records[i].get("completion_from", 0) for i in chat_idx],
        )
        for i, doc in zip(chat_idx, chats):
            docs[i] = doc
    if pair_idx:
        pairs = tokenize_pairs(
            tokenizer, [records[i]["prompt"] for i in pair_idx], [records[i]["completion"] for i in pair_idx]
        )
        for i, doc in zip(pair_idx, pairs):
            docs[i] = doc
    return docs


def tokenize_rows(tokenizer, columns: Mapping[str, str], rows: list[tuple[str, Any]]):
    """Raw ``(where, row)`` pairs of one block -> ``(ids, labels)`` per row."""
    return tokenize(tokenizer, block_records(rows, columns)) if rows else []


def tokens(
    data,
    tokenizer,
    *,
    cache_dir: str | os.PathLike | bool | None = None,
) -> TokenStore:
    """Tokenised documents of ``data`` (a path, a :class:`Source` or a list of records).

    Paths go through the on-disk cache in ``cache_dir`` (default :func:`tx.train.token_cache.default_cache_dir`;
    ``False`` tokenises in memory); lists of records are tokenised in memory.
    """
    if isinstance(data, TokenStore):
        return data
    if not isinstance(data, (str, os.PathLike, Source)):
        return TokenStore.from_docs(tokenize(tokenizer, _validated(data)), "records")
    source = as_source(data)
    files, mapping = source.files(), source.mapping
    if cache_dir is None:
        cache_dir = source.cache_dir

    tokenize_block = functools.partial(tokenize_rows, tokenizer, mapping)
    if cache_dir is False:
        docs = [d for b in readers.blocks(files) for d in tokenize_block(b.load())]
        store = TokenStore.from_docs(docs, str(source))
    else:
        cache = default_cache_dir() if cache_dir in (None, True) else cache_dir
        store = open_cached(files, tokenizer, mapping, tokenize_block, cache, str(source))
    if store.num_documents == 0:
        raise DataError(f"{source} is empty (no records); tx reads rows with the columns of {KNOWN}")
    return store


# -- batching ---------------------------------------------------------------------------------------------------


class Dataset:
    """Tokenized documents laid out in rows of ``seq_len`` and served as batches; see the module docstring.

    ``batch(step)`` is a pure function of ``(seed, step)``: the rows form an endless stream, epoch ``e`` being
    all rows in the order of a permutation seeded by ``(seed, e)``, and step ``k`` takes stream rows
    ``[k * batch_size, (k + 1) * batch_size)``. So a run resumed at step k sees exactly the batches an
    uninterrupted run sees, no row is dropped, and a batch may span the end of one epoch and the start of the
    next.

    The tokens stay where they are (a memory-mapped cache for paths): the layout is a table of pieces (where a
    run of a document's tokens starts, how long it is, which row holds it), a few integers per document, and a
    batch gathers its tokens from the store.

    Args:
        data: a path (file, folder, save_to_disk folder, hub dataset id), a :class:`Source` (path, split,
            column mapping), a list of records, or a :class:`TokenStore`.
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
        documents: indices of the documents to use (default all), e.g. one side of :func:`split_indices`.
        cache_dir: the token cache folder for paths (default ``$TX_DATA_CACHE`` or ``~/.cache/tx/tokens``);
            False tokenises in memory.
    """

    def __init__(
        self,
        data,
        tokenizer,
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        mode: str = "pack",
        max_positions: int | None = None,
        vocab_size: int | None = None,
        shuffle: bool = True,
        documents: Sequence[int] | np.ndarray | None = None,
        cache_dir: str | os.PathLike | bool | None = None,
    ):
        if mode not in MODES:
            raise ConfigError(f"mode should be one of {MODES}, got {mode!r}")
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("max_positions", max_positions)):
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
                raise ConfigError(f"{name} should be an integer >= 1, got {value!r}")
        self.seq_len, self.batch_size, self.seed, self.mode, self.shuffle = seq_len, batch_size, seed, mode, shuffle
        store = tokens(data, tokenizer, cache_dir=cache_dir)
        self.store, self.source = store, store.source
        docs = np.arange(store.num_documents) if documents is None else np.asarray(documents, np.int64)
        self.num_documents = len(docs)
        self.max_id = store.max_id
        if vocab_size is not None:
            check_vocab(self.max_id, vocab_size, getattr(tokenizer, "vocab_size", None))
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self._layout(docs, min(seq_len, max_positions or seq_len))
        self._perms: dict[int, np.ndarray] = {}

    def _layout(self, docs: np.ndarray, chunk: int) -> None:
        store = self.store
        if self.shuffle:
            docs = docs[np.random.default_rng([self.seed, 1]).permutation(len(docs))]
        starts = np.asarray(store.offsets[docs], np.int64)
        pairs = (np.asarray(store.offsets[docs + 1], np.int64) - starts - 1).clip(0)
        loss = np.asarray(store.loss[docs], np.int64)
        if self.mode == "pad":
            long = pairs > self.seq_len
            self.num_truncated = int(long.sum())
            if self.num_truncated:
                warnings.warn(
                    f"{self.num_truncated} of {len(docs)} documents in {self.source} are longer than "
                    f"seq_len={self.seq_len} and were truncated (mode='pad'; use mode='pack' to keep them whole)",
                    stacklevel=3,
                )
                for i in np.flatnonzero(long).tolist():  # the loss targets that remain
                    s = int(starts[i])
                    loss[i] = int(np.asarray(store.labels[s + 1 : s + 1 + self.seq_len]).sum())
            pairs = np.minimum(pairs, self.seq_len)
        else:
            self.num_truncated = 0
        self.num_chunked = int((pairs > chunk).sum())
        if pairs.sum() == 0:
            raise DataError(f"{self.source}: no document has two or more tokens, so there is nothing to predict")
        self.num_loss_tokens = int(loss.sum())
        # pieces: each document cut into runs of at most `chunk` pairs
        counts = -(-pairs // chunk)
        first = np.repeat(np.cumsum(counts) - counts, counts)
        piece_doc = np.repeat(np.arange(len(docs)), counts)
        k = np.arange(len(piece_doc)) - first
        piece_len = np.minimum(chunk, pairs[piece_doc] - k * chunk)
        piece_src = starts[piece_doc] + k * chunk  # store index of the piece's first input token
        if self.mode == "pad":
            self._piece_src, self._piece_len = piece_src, piece_len
            self._row_piece = np.arange(len(piece_len) + 1)
            return
        # pack: put each piece into the row it fills best; rows keep their pieces in order of arrival
        row = _best_fit(piece_len, self.seq_len)
        order = np.argsort(row, kind="stable")
        self._piece_src, self._piece_len = piece_src[order], piece_len[order]
        self._row_piece = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=row.max() + 1))])

    # -- sizes --

    @property
    def num_rows(self) -> int:
        return len(self._row_piece) - 1

    @property
    def num_tokens(self) -> int:
        """Input positions holding a token (not padding)."""
        return int(self._piece_len.sum())

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
        safe = np.where(idx < 0, 0, idx)
        p0 = self._row_piece[safe]
        n_pieces = np.where(idx < 0, 0, self._row_piece[safe + 1] - p0)
        # the pieces of the rows, row by row
        before = np.cumsum(n_pieces) - n_pieces
        pieces = np.repeat(p0 - before, n_pieces) + np.arange(int(n_pieces.sum()))
        piece_row = np.repeat(np.arange(len(idx)), n_pieces)
        seg = np.arange(len(pieces)) - np.repeat(before, n_pieces) + 1  # 1, 2, ... within each row
        lens = self._piece_len[pieces]
        excl = np.cumsum(lens) - lens
        col0 = excl - excl[np.repeat(before, n_pieces)] if len(pieces) else excl  # first column in its row
        # the tokens of the pieces
        within = np.arange(int(lens.sum())) - np.repeat(excl, lens)
        src = np.repeat(self._piece_src[pieces], lens) + within
        r, c = np.repeat(piece_row, lens), np.repeat(col0, lens) + within
        shape = (len(idx), self.seq_len)
        batch = {
            "input_ids": np.full(shape, self.pad_id, np.int32),
            "targets": np.full(shape, self.pad_id, np.int32),
            "loss_mask": np.zeros(shape, np.float32),
            "segment_ids": np.zeros(shape, np.int32),
            "positions": np.zeros(shape, np.int32),
        }
        if len(src):
            batch["input_ids"][r, c] = np.asarray(self.store.ids[src])
            batch["targets"][r, c] = np.asarray(self.store.ids[src + 1])
            batch["loss_mask"][r, c] = np.asarray(self.store.labels[src + 1])
            batch["segment_ids"][r, c] = np.repeat(seg, lens)
            batch["positions"][r, c] = within
        return batch

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


def datasets_for_fit(train_data, eval_data, tokenizer, *, eval_fraction: float = 0.0, **common):
    """What :meth:`tx.train.trainer.Trainer.fit` trains and evaluates on: Datasets from paths, Sources or
    records (Datasets pass through); ``eval_fraction`` holds documents of the training data out for eval."""
    needs = [d for d in (train_data, eval_data) if d is not None and not isinstance(d, Dataset)]
    if needs and tokenizer is None:
        raise ConfigError("pass tokenizer= to fit() when train_data or eval_data is a path or records")
    if not isinstance(train_data, Dataset):
        store = tokens(train_data, tokenizer)
        if eval_data is None and eval_fraction > 0:
            keep, held = split_indices(store.num_documents, eval_fraction, seed=common.get("seed", 0))
            eval_data = Dataset(store, tokenizer, documents=held, **{**common, "shuffle": False})
            train_data = Dataset(store, tokenizer, documents=keep, **common)
        else:
            train_data = Dataset(store, tokenizer, **common)
    if eval_data is not None and not isinstance(eval_data, Dataset):
        eval_data = Dataset(eval_data, tokenizer, **{**common, "shuffle": False})
    return train_data, eval_data
