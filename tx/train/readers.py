"""Where training data lives -> its data files -> blocks of raw rows. numpy and the standard library; pyarrow
(the ``tx[data]`` extra) only for parquet and Arrow files.

A data source is a file, a folder of files, a folder written by ``datasets.Dataset.save_to_disk`` (or
``DatasetDict.save_to_disk``), or a Hugging Face hub dataset id (``org/name``; only its data files are
fetched, with ``huggingface_hub.snapshot_download(repo_type="dataset")``). Formats, by extension:

- ``.jsonl`` one JSON object per line; ``.json`` a JSON array of objects, or JSON lines as ``datasets`` reads
  them.
- ``.csv`` with a header row (cells of list-valued columns such as ``messages`` may hold JSON text).
- ``.parquet``; ``.arrow`` (Arrow IPC file or stream, as ``save_to_disk`` writes).

Splits: a folder's files are assigned to splits by name as the hub does (``train``/``training``,
``validation``/``valid``/``val``/``dev``, ``test``/``testing``/``eval``/``evaluation`` as a word of a file or
folder name: ``data/train-00000-of-00002.parquet``, ``test.jsonl``); files that name no split are all
``train``. A ``DatasetDict.save_to_disk`` folder has one sub-folder per split.

Rows come in blocks of at most :data:`BLOCK_ROWS` rows, in a fixed order, so a block is a unit of work (and of
the token cache) that several processes can share out; a block's rows are parsed only when it is loaded.
Where a row came from is ``"train.jsonl, line 3"`` (lines count from 1, as editors do) or
``"train.parquet, row 2"`` (rows count from 0, as ``dataset[i]`` does).
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tx.errors import DataError

BLOCK_ROWS = 2048
EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet", ".arrow")
METADATA_FILES = {"dataset_info.json", "state.json", "dataset_dict.json", "dataset_infos.json"}
SPLIT_WORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}
EXTRA = "pip install 'tx-adapters[data]' (or pip install pyarrow)"


class TextCells(dict):
    """A CSV row: every cell is text (list-valued columns may hold JSON text)."""


@dataclass(frozen=True)
class Block:
    """Rows ``[first, first + size)`` of ``path``; ``load()`` parses them into ``[(where, row dict), ...]``."""

    path: Path
    first: int
    size: int
    load: Callable[[], list[tuple[str, Any]]]


# -- sources and splits -----------------------------------------------------------------------------------------


def data_files(source: str | os.PathLike, split: str = "train") -> list[Path]:
    """The data files of ``split`` in ``source`` (a file, a folder, a save_to_disk folder or a hub dataset id).

    Raises:
        DataError: no such file or folder (or an uncached hub id offline), no data files, or no such split.
    """
    path = Path(source).expanduser()
    if not path.exists():
        path = _hub_snapshot(str(source))
    if path.is_file():
        if split != "train":
            raise DataError(f"{path} is one file, so it has only the split 'train', not {split!r}")
        _check_extension(path)
        return [path]
    if (path / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk: one folder per split
        splits = _read_json_list(path / "dataset_dict.json", "splits")
        if split not in splits:
            raise DataError(f"{path} has no split {split!r}; its splits are {', '.join(splits)}")
        return data_files(path / split)
    if (path / "state.json").is_file():  # Dataset.save_to_disk
        files = [path / entry["filename"] for entry in _read_json_list(path / "state.json", "_data_files")]
        if split != "train":
            raise DataError(f"{path} is one saved dataset, so it has only the split 'train', not {split!r}")
        return files
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.name.endswith(EXTENSIONS)
        and p.name not in METADATA_FILES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise DataError(f"{path} holds no data files ({', '.join(EXTENSIONS)})")
    by_split: dict[str, list[Path]] = {}
    for f in files:
        by_split.setdefault(split_of(f.relative_to(path)) or "train", []).append(f)
    if split not in by_split:
        raise DataError(f"{path} has no split {split!r}; its splits are {', '.join(sorted(by_split))}")
    return by_split[split]


def split_of(relative: Path) -> str | None:
    """The split a file's name or folder names, or None."""
    words = set(re.split(r"[-_./\s]+", str(relative.with_suffix("")).lower()))
    for split, names in SPLIT_WORDS.items():
        if words.intersection(names):
            return split
    return None


def looks_like_hub_id(name: str) -> bool:
    return (
        bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", name))
        and not name.endswith(EXTENSIONS)
        and not name.startswith((".", "~"))
    )


def _hub_snapshot(name: str) -> Path:
    if not looks_like_hub_id(name):
        raise DataError(f"{name}: no such file or folder; pass a data file, a folder of them or a hub dataset id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = [f"*{ext}" for ext in EXTENSIONS]
    try:
        return Path(snapshot_download(name, repo_type="dataset", allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise DataError(
            f"{name!r} is not a local file or folder, and the hub dataset {name!r} is not in the Hugging Face "
            "cache while offline; run once with network access or pass a local path"
        ) from None
    except Exception as exc:  # the hub client raises many types; the user needs one sentence
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise DataError(
            f"{name!r} is not a local file or folder and could not be fetched as a hub dataset "
            f"({type(exc).__name__}: {detail}); check the id and your network, or pass a local path"
        ) from None


def _read_json_list(path: Path, key: str) -> list:
    try:
        value = json.loads(path.read_text())[key]
        assert isinstance(value, list)
        return value
    except Exception:
        raise DataError(f"{path}: not a datasets save_to_disk file (no list {key!r})") from None


def _check_extension(path: Path) -> None:
    if not path.name.endswith(EXTENSIONS):
        raise DataError(f"{path}: unknown data format; tx reads {', '.join(EXTENSIONS)} files")


# -- blocks of rows ---------------------------------------------------------------------------------------------


def blocks(files: list[Path], block_rows: int | None = None) -> Iterator[Block]:
    """Every file's rows in blocks of at most ``block_rows`` (default :data:`BLOCK_ROWS`), files in order."""
    block_rows = block_rows or BLOCK_ROWS
    for path in files:
        _check_extension(path)
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        name = path.name
        if name.endswith(".jsonl") or (name.endswith(".json") and not _is_json_array(path)):
            yield from _jsonl_blocks(path, block_rows)
        elif name.endswith(".json"):
            yield from _list_blocks(path, _json_array(path), block_rows)
        elif name.endswith(".csv"):
            yield from _csv_blocks(path, block_rows)
        else:
            yield from _arrow_blocks(path, block_rows)


def _jsonl_blocks(path: Path, block_rows: int) -> Iterator[Block]:
    with path.open("rb") as f:
        lines: list[tuple[int, bytes]] = []
        first = 0
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            lines.append((lineno, raw))
            if len(lines) == block_rows:
                yield Block(path, first, len(lines), _jsonl_loader(path, lines))
                first, lines = first + len(lines), []
        if lines:
            yield Block(path, first, len(lines), _jsonl_loader(path, lines))


def _jsonl_loader(path: Path, lines: list[tuple[int, bytes]]):
    def load():
        out = []
        for lineno, raw in lines:
            where = f"{path}, line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            try:
                out.append((where, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        return out

    return load


def _is_json_array(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _json_array(path: Path) -> list:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    return data


def _list_blocks(path: Path, rows: list, block_rows: int) -> Iterator[Block]:
    for first in range(0, len(rows), block_rows):
        part = rows[first : first + block_rows]
        yield Block(path, first, len(part), lambda part=part, first=first: _numbered(path, first, part))


def _numbered(path: Path, first: int, rows) -> list[tuple[str, Any]]:
    return [(f"{path}, row {first + i}", row) for i, row in enumerate(rows)]


def _csv_blocks(path: Path, block_rows: int) -> Iterator[Block]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows, first = [], 0
            for row in reader:
                if None in row:
                    raise DataError(f"{path}, row {first + len(rows)}: more cells than the header has columns")
                rows.append(TextCells(row))
                if len(rows) == block_rows:
                    yield Block(path, first, len(rows), lambda r=rows, s=first: _numbered(path, s, r))
                    first, rows = first + len(rows), []
            if rows:
                yield Block(path, first, len(rows), lambda r=rows, s=first: _numbered(path, s, r))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise DataError(f"{path}: not a valid CSV file ({exc})") from None


def pyarrow():
    """The pyarrow module, or a DataError naming the extra to install."""
    try:
        import pyarrow as pa
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError(f"reading parquet and Arrow files needs pyarrow: {EXTRA}") from None
    return pa


def _arrow_blocks(path: Path, block_rows: int) -> Iterator[Block]:
    pa = pyarrow()
    try:
        if path.name.endswith(".parquet"):
            batches = pa.parquet.ParquetFile(path).iter_batches(batch_size=block_rows)
        else:
            source = pa.memory_map(str(path))
            try:
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            except pa.ArrowInvalid:
                source.seek(0)
                batches = iter(pa.ipc.open_stream(source))
        first = 0
        for batch in batches:
            for start in range(0, batch.num_rows, block_rows):
                part = batch.slice(start, block_rows)
                yield Block(path, first, part.num_rows, lambda p=part, s=first: _numbered(path, s, p.to_pylist()))
                first += part.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot read it as {path.suffix[1:]} ({exc})") from None
