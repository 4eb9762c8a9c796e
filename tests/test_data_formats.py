"""Data where people keep it: every file format gives the same batches as the records themselves, every schema's
loss mask is exactly its replies / completions (checked by decoding), the token cache, splits and hub ids.

The files are written by the `datasets` library (parquet, save_to_disk), pyarrow (Arrow IPC files) and the
standard library (JSONL, JSON, CSV), never by tx.
"""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from fixtures_tokenizer import make_chatml_tokenizer, make_llama_tokenizer

from tx.tokenizer import load_tokenizer
from tx.train.data import Dataset, Source, read_records, tokenize, tokens
from tx.train.readers import data_files

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
import pyarrow.ipc  # noqa: E402, F401

KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")
Q = ["What is the capital of France?", "Sort 3 1 2", "Say hello"]
A = ["Paris.", "1 2 3", "Hello ✓ — ça va"]


def schema_rows(schema: str) -> list[dict]:
    """Records of one schema, each with an extra column tx must ignore."""
    rows = []
    for i in range(12):
        q, a = Q[i % 3] + f" #{i}", A[i % 3] + f" {i}"
        row = {
            "text": {"text": f"{q} {a}"},
            "messages": {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
            "sharegpt": {
                "conversations": [
                    {"from": "system", "value": "Be brief."},
                    {"from": "human", "value": q},
                    {"from": "gpt", "value": a},
                ]
            },
            "alpaca": {"instruction": q, "input": "" if i % 2 else f"input {i}", "output": a},
            "prompt_completion": {"prompt": q + " Answer:", "completion": " " + a},
            "prompt_completion_chat": {
                "prompt": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": q},
                ],
                "completion": [{"role": "assistant", "content": a}],
            },
        }[schema]
        rows.append({**row, "id": i})
    return rows


SCHEMAS = ["text", "messages", "sharegpt", "alpaca", "prompt_completion", "prompt_completion_chat"]
FORMATS = ["jsonl", "json", "csv", "parquet", "arrow", "save_to_disk"]


def write(rows: list[dict], fmt: str, path) -> os.PathLike:
    """``rows`` in format ``fmt`` at ``path`` (+ extension); returns the file or folder."""
    if fmt == "jsonl":
        path = path.with_suffix(".jsonl")
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path = path.with_suffix(".json")
        path.write_text(json.dumps(rows, indent=1))
    elif fmt == "csv":
        path = path.with_suffix(".csv")
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            for r in rows:
                w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    elif fmt == "parquet":
        path = path.with_suffix(".parquet")
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif fmt == "arrow":
        path = path.with_suffix(".arrow")
        table = pa.Table.from_pylist(rows)
        with pa.ipc.new_file(str(path), table.schema) as w:
            w.write_table(table)
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def masked_runs(batch, tokenizer):
    runs = []
    for targets, mask in zip(batch["targets"], batch["loss_mask"]):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
        runs += [tokenizer.decode(targets[s:e], skip_special_tokens=False) for s, e in zip(edges[::2], edges[1::2])]
    return runs


def documents(batch, tokenizer):
    """Each segment of a pad-mode batch decoded whole (inputs plus its last target)."""
    out = []
    for ids, tgt, seg in zip(batch["input_ids"], batch["targets"], batch["segment_ids"]):
        n = int((seg > 0).sum())
        out.append(tokenizer.decode([*ids[:n].tolist(), int(tgt[n - 1])], skip_special_tokens=False))
    return out


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    return load_tokenizer(make_chatml_tokenizer(tmp_path_factory.mktemp("chatml")))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return load_tokenizer(make_llama_tokenizer(tmp_path_factory.mktemp("llama")))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TX_DATA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# -- the same records in every format ---------------------------------------------------------------------------


@pytest.mark.parametrize("schema", SCHEMAS)
def test_every_format_gives_the_batches_of_the_records(chatml, tmp_path, schema):
    rows = schema_rows(schema)
    options = dict(seq_len=48, batch_size=3, seed=1)
    reference = Dataset(rows, chatml, **options)
    expected = [reference.batch(step) for step in range(len(reference) + 2)]
    for fmt in FORMATS:
        path = write(rows, fmt, tmp_path / f"{schema}-{fmt}")
        ds = Dataset(path, chatml, **options)
        assert ds.num_documents == len(rows) and ds.num_rows == reference.num_rows, fmt
        for step, want in enumerate(expected):
            got = ds.batch(step)
            for key in KEYS:
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"{fmt} step {step} {key}")


# -- loss masks, decoded ----------------------------------------------------------------------------------------


def pad_batch(tokenizer, rows):
    ds = Dataset(rows, tokenizer, seq_len=128, batch_size=len(rows), mode="pad", shuffle=False)
    return ds.rows(range(len(rows)))


def test_sharegpt_mask_is_the_gpt_replies(chatml):
    rows = schema_rows("sharegpt")[:3]
    batch = pad_batch(chatml, rows)
    assert masked_runs(batch, chatml) == [f"{A[i]} {i}<|im_end|>" for i in range(3)]
    for i, doc in enumerate(documents(batch, chatml)):  # roles mapped: system / human / gpt -> chat template
        assert doc == (
            f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{Q[i]} #{i}<|im_end|>\n"
            f"<|im_start|>assistant\n{A[i]} {i}<|im_end|>\n"
        )


def test_alpaca_mask_is_the_output(chatml):
    rows = schema_rows("alpaca")[:2]
    batch = pad_batch(chatml, rows)
    assert masked_runs(batch, chatml) == [f"{A[0]} 0<|im_end|>", f"{A[1]} 1<|im_end|>"]
    docs = documents(batch, chatml)
    assert f"<|im_start|>user\n{Q[0]} #0\n\ninput 0<|im_end|>" in docs[0]  # instruction, blank line, input
    assert f"<|im_start|>user\n{Q[1]} #1<|im_end|>" in docs[1]  # no input: the instruction alone


@pytest.mark.parametrize("tok", ["chatml", "llama"])
def test_prompt_completion_mask_is_the_completion_and_eos(request, tok):
    tokenizer = request.getfixturevalue(tok)
    rows = schema_rows("prompt_completion")[:3]
    batch = pad_batch(tokenizer, rows)
    eos = tokenizer.eos_token
    assert masked_runs(batch, tokenizer) == [f" {A[i]} {i}{eos}" for i in range(3)]
    bos = tokenizer.bos_token if tokenizer.add_bos else ""
    assert documents(batch, tokenizer) == [f"{bos}{Q[i]} #{i} Answer: {A[i]} {i}{eos}" for i in range(3)]


def test_prompt_completion_messages_mask_only_the_completion(chatml):
    """An assistant turn inside the prompt is context: only the completion's reply is learnt."""
    rows = schema_rows("prompt_completion_chat")[:2]
    batch = pad_batch(chatml, rows)
    assert masked_runs(batch, chatml) == [f"{A[0]} 0<|im_end|>", f"{A[1]} 1<|im_end|>"]
    assert all("<|im_start|>assistant\nHello.<|im_end|>" in d for d in documents(batch, chatml))


def test_text_mask_is_every_token(chatml):
    batch = pad_batch(chatml, schema_rows("text")[:2])
    n = (batch["segment_ids"] > 0).sum(axis=1)
    assert batch["loss_mask"].sum(axis=1).tolist() == n.tolist()


def test_column_mapping(chatml, tmp_path):
    rows = [{"question": q, "answer": " " + a} for q, a in zip(Q, A)]
    path = write(rows, "parquet", tmp_path / "qa")
    ds = Dataset(Source(path, columns="prompt=question,completion=answer"), chatml, seq_len=64, batch_size=3,
                 mode="pad", shuffle=False)  # fmt: skip
    assert masked_runs(ds.rows(range(3)), chatml) == [f" {a}<|im_end|>" for a in A]
    chat = [{"q": [{"role": "user", "content": q}], "a": [{"role": "assistant", "content": a}]} for q, a in zip(Q, A)]
    ds = Dataset(Source(write(chat, "jsonl", tmp_path / "chat"), columns={"prompt": "q", "completion": "a"}), chatml,
                 seq_len=64, batch_size=3, mode="pad", shuffle=False)  # fmt: skip
    assert masked_runs(ds.rows(range(3)), chatml) == [f"{a}<|im_end|>" for a in A]


# -- folders, splits, hub ids -----------------------------------------------------------------------------------


def test_folder_of_files_and_splits(chatml, tmp_path):
    root = tmp_path / "repo"
    (root / "data").mkdir(parents=True)
    write(schema_rows("messages")[:8], "parquet", root / "data" / "train-00000-of-00002")
    write(schema_rows("sharegpt")[:4], "jsonl", root / "data" / "train-00001-of-00002")
    write(schema_rows("alpaca")[:3], "csv", root / "data" / "test-00000-of-00001")
    (root / "README.md").write_text("not data")
    assert [p.name for p in data_files(root)] == ["train-00000-of-00002.parquet", "train-00001-of-00002.jsonl"]
    assert len(read_records(root)) == 12 and len(read_records(root, split="test")) == 3
    # a DatasetDict saved to disk: one folder per split
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(schema_rows("text")), "validation": datasets.Dataset.from_list(Q_ROWS)}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [r["text"] for r in read_records(tmp_path / "dd", split="validation")] == Q
    assert len(read_records(tmp_path / "dd")) == 12


Q_ROWS = [{"text": q} for q in Q]


def fake_hub_cache(cache, repo_id: str, files: dict) -> None:
    """A Hugging Face hub cache entry as huggingface_hub lays it out (refs/main -> snapshots/<commit>/...)."""
    folder = cache / f"datasets--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    for name, (rows, fmt) in files.items():
        target = folder / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        write(rows, fmt, target)


HUB_CHECK = r"""
import json, sys
from tx.errors import DataError
from tx.train.data import read_records
out = {}
for name, split in json.loads(sys.argv[1]):
    try:
        out[name + ":" + split] = len(read_records(name, split=split))
    except DataError as exc:
        out[name + ":" + split] = str(exc)
print(json.dumps(out))
"""


def test_hub_dataset_ids_offline(tmp_path):
    cache = tmp_path / "hub"
    fake_hub_cache(
        cache,
        "someone/chats",
        {"data/train-00000-of-00001": (schema_rows("messages"), "parquet"), "data/test": (Q_ROWS, "jsonl")},
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": os.getcwd()}
    queries = [
        ["someone/chats", "train"],
        ["someone/chats", "test"],
        ["someone/chats", "dev"],
        ["someone/absent", "train"],
    ]
    proc = subprocess.run(
        [sys.executable, "-c", HUB_CHECK, json.dumps(queries)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["someone/chats:train"] == 12 and out["someone/chats:test"] == 3
    assert out["someone/chats:dev"].endswith("has no split 'dev'; its splits are test, train")
    assert out["someone/absent:train"] == (
        "'someone/absent' is not a local file or folder, and the hub dataset 'someone/absent' is not in "
        "the Hugging Face cache while offline; run once with network access or pass a local path"
    )


# -- the token cache --------------------------------------------------------------------------------------------


def test_cache_is_reused_memory_mapped_and_keyed(chatml, llama, tmp_path, cache):
    path = write(schema_rows("messages"), "parquet", tmp_path / "d")
    first = tokens(path, chatml)
    assert first.path is not None and first.path.parent == cache
    assert isinstance(first.ids, np.memmap)
    mtime = (first.path / "meta.json").stat().st_mtime_ns
    again = tokens(path, chatml)
    assert again.path == first.path and (again.path / "meta.json").stat().st_mtime_ns == mtime  # not rebuilt
    in_memory = tokenize(chatml, read_records(path))
    assert [again.document(i)[0].tolist() for i in range(12)] == [ids.tolist() for ids, _ in in_memory]
    assert [again.document(i)[1].tolist() for i in range(12)] == [lab.tolist() for _, lab in in_memory]
    # another tokenizer: another entry, with its own tokens
    other = tokens(path, llama)
    assert other.path != first.path
    assert [other.document(i)[0].tolist() for i in range(12)] == [
        i.tolist() for i, _ in tokenize(llama, read_records(path))
    ]
    # an edited file: another entry
    write(schema_rows("messages")[:5], "parquet", tmp_path / "d")
    assert tokens(path, chatml).num_documents == 5
    assert tokens(Source(path, cache_dir=False), chatml).path is None  # in memory


def test_cache_written_for_another_tokenizer_is_rebuilt(chatml, llama, tmp_path, cache):
    """An entry whose meta.json says it holds other tokens (here: llama's, copied under chatml's key) is rebuilt."""
    import shutil

    path = write(schema_rows("text"), "jsonl", tmp_path / "d")
    mine = tokens(path, chatml).path
    theirs = tokens(path, llama).path
    shutil.rmtree(mine)
    shutil.copytree(theirs, mine)
    store = tokens(path, chatml)
    assert store.path == mine
    want = tokenize(chatml, read_records(path))
    assert [store.document(i)[0].tolist() for i in range(12)] == [ids.tolist() for ids, _ in want]
    (mine / "ids.bin").write_bytes(b"\0" * 8)  # a truncated entry: rebuilt too
    assert tokens(path, chatml).document(0)[0].tolist() == want[0][0].tolist()


@pytest.mark.slow
def test_cache_built_by_worker_processes_in_blocks(chatml, tmp_path, monkeypatch):
    """Several blocks tokenised in two spawned processes: the same documents, in order, as in memory."""
    from tx.train import readers

    rows = schema_rows("messages") + schema_rows("prompt_completion") + schema_rows("text")
    path = write(rows, "jsonl", tmp_path / "d")
    monkeypatch.setattr(readers, "BLOCK_ROWS", 5)
    monkeypatch.setenv("TX_DATA_WORKERS", "2")
    store = tokens(path, chatml)
    want = tokenize(chatml, read_records(path))
    assert store.num_documents == len(rows) == len(want)
    for i, (ids, labels) in enumerate(want):
        got_ids, got_labels = store.document(i)
        assert got_ids.tolist() == ids.tolist() and got_labels.tolist() == labels.tolist()
    assert store.loss.tolist() == [int(lab[1:].sum()) for _, lab in want]
