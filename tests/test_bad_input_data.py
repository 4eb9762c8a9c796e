"""Bad training data end to end, through Trainer.fit and `tx finetune`: a DataError that names the file, the line
and the problem, raised before anything is compiled or written; long documents are chunked to the model's context."""

import json
import re
import warnings

import numpy as np
import pytest
from fixtures_run import chat_records, model_folder, run_tx_batch, write_jsonl
from fixtures_tokenizer import make_chatml_tokenizer

import tx
from tx.errors import ConfigError, DataError
from tx.train.trainer import TrainConfig, Trainer

CHAT = chat_records(1)[0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return model_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def tok(folder):
    return tx.load_tokenizer(folder)


_MODELS = {}


def trainer(folder, **config):
    """A Trainer of a LoRA model of ``folder``; the model is shared (only the last test here trains it)."""
    if folder not in _MODELS:
        _MODELS[folder] = tx.attach(tx.load_model(folder), lora=tx.LoRAConfig(rank=2, alpha=4))
    model = _MODELS[folder]
    return Trainer(model, TrainConfig(**{"steps": 2, "batch_size": 2, "seq_len": 32, "progress": False, **config}))


def recording(tr):
    """Replace the compiled step by a recorder: fit runs its data path without compiling anything."""
    seen = []

    def step(batch):
        seen.append(batch)
        tr.step_count += 1
        return {"loss": 1.0, "grad_norm": 0.0, "tokens": float(np.sum(batch["loss_mask"])), "lr": 0.0}

    tr.step = step
    return seen


@pytest.mark.parametrize(
    "content, match",
    [
        ("", r"train.jsonl is empty \(no records\); tx reads rows with the columns of messages \(messages\)"),
        ("\n  \n\n", r"train.jsonl is empty \(no records\)"),
        (json.dumps(CHAT) + "\n{'text': 'single quotes'}\n", r"train.jsonl, line 2: invalid JSON"),
        (json.dumps(CHAT) + '\n{"text": "cut off', r"train.jsonl, line 2: invalid JSON \(Unterminated string"),
        ('["a", "list"]\n', r"line 1: found a JSON list, not an object"),
        ('"just a string"\n', r"line 1: found a JSON str, not an object"),
        ('{"question": "hi", "answer": "there"}\n', r"line 1: no known schema in the columns \['answer', 'question'\]"),
        ('{"text": "a", "messages": []}\n', r"line 1: 'messages' should be a non-empty list"),  # messages wins
        ('{"text": 42}\n', r"line 1: column 'text' should be a string, found int"),
        ('{"text": ""}\n', r"line 1: 'text' is empty"),
        ('{"messages": "hello"}\n', r"line 1: column 'messages' should be a list, found str"),
        ('{"messages": [{"role": "human", "content": "hi"}]}\n', r"messages\[0\] has role 'human'; roles are"),
        ('{"messages": [{"role": "user", "content": ["hi"]}]}\n', r"messages\[0\] 'content' should be a string"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', r"no assistant message, so nothing to learn"),
        (b'{"text": "caf\xe9"}\n', r"line 1: not UTF-8 text"),
    ],
)
def test_fit_rejects_bad_jsonl(folder, tok, tmp_path, content, match):
    path = tmp_path / "train.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    tr = trainer(folder, out=str(tmp_path / "run"))
    with pytest.raises(DataError, match=match):
        tr.fit(path, tokenizer=tok)
    assert not (tmp_path / "run").exists()  # nothing written before the data is known to be good


@pytest.fixture
def files(tmp_path, monkeypatch):
    """Bad data in the formats tx reads, written by pyarrow / datasets / the csv module."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    monkeypatch.setenv("TX_DATA_CACHE", str(tmp_path / "cache"))
    pq.write_table(pa.table({"question": ["a"], "answer": ["b"]}), tmp_path / "qa.parquet")
    pq.write_table(pa.table({"text": ["fine", "also fine", None, "x"]}), tmp_path / "nulls.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    (tmp_path / "header.csv").write_text("instruction,input,output\n")
    (tmp_path / "chat.csv").write_text('messages\n"[{""role"": ""assistant"", ""content"": ""ok""}]"\n"[{oops"\n')
    (tmp_path / "splits").mkdir()
    for name in ("train.jsonl", "test.jsonl"):
        write_jsonl(tmp_path / "splits" / name, chat_records(2))
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "notes.txt").write_text("no data here")
    return tmp_path


KNOWN_SCHEMAS = (
    "tx knows messages (messages); sharegpt (conversations); prompt/completion (prompt, completion); "
    "alpaca (instruction, output); text (text) (map other names with --columns)"
)


@pytest.mark.parametrize(
    "data, match",
    [
        (
            "qa.parquet",
            r"qa.parquet, row 0: no known schema in the columns \[.answer., .question.\]; " + re.escape(KNOWN_SCHEMAS),
        ),
        ("nulls.parquet", r"nulls.parquet, row 2: column 'text' should be a string, found NoneType"),
        ("ints.parquet", r"ints.parquet, row 0: column 'text' should be a string, found int"),
        ("chat.csv", r"chat.csv, row 1: column 'messages' holds text that is not a JSON list"),
        ("empty.parquet", r"empty.parquet is empty \(no records\)"),
        ("header.csv", r"header.csv is empty \(no records\)"),
        ("nothing", r"nothing holds no data files \(.jsonl, .json, .csv, .parquet, .arrow\)"),
        (("splits", "validation"), r"splits has no split 'validation'; its splits are test, train"),
        (("qa.parquet", "test"), r"qa.parquet is one file, so it has only the split 'train', not 'test'"),
        (("qa.parquet", "train", "prompt=q"), r"qa.parquet, row 0: no column 'q' \(mapped by columns=...\); found"),
    ],
)
def test_fit_rejects_bad_files(folder, tok, files, data, match):
    from tx.train.data import Source

    path, *rest = data if isinstance(data, tuple) else (data,)
    source = Source(files / path, *rest)
    tr = trainer(folder, out=str(files / "run"))
    with pytest.raises(DataError, match=match):
        tr.fit(source, tokenizer=tok)
    assert not (files / "run").exists()


def test_bad_column_mapping(folder, tok, files):
    from tx.train.data import Source

    for spec, match in [
        ("prompt:question", "columns should be NAME=COLUMN pairs"),
        ("answer=completion", "'answer' is not a column tx knows; map onto one of messages, conversations"),
        ({"prompt": ""}, "prompt= needs a column name"),
    ]:
        with pytest.raises(ConfigError, match=match):
            trainer(folder).fit(Source(files / "qa.parquet", columns=spec), tokenizer=tok)


def test_missing_pyarrow_names_the_extra(folder, tok, files, monkeypatch):
    import sys

    for name in ("pyarrow", "pyarrow.ipc", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)  # import pyarrow now raises ImportError
    with pytest.raises(DataError, match=r"parquet and Arrow files needs pyarrow: pip install 'tx-adapters\[data\]'"):
        trainer(folder).fit(files / "qa.parquet", tokenizer=tok)
    from tx.train.data import Dataset

    Dataset(files / "splits" / "train.jsonl", tok, seq_len=32, batch_size=2)  # JSONL needs no pyarrow


def test_fit_rejects_bad_eval_data(folder, tok, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", chat_records(8))
    bad = tmp_path / "eval.jsonl"
    bad.write_text(json.dumps(CHAT) + "\n" + json.dumps(CHAT)[:-3] + "\n")
    with pytest.raises(DataError, match=r"eval.jsonl, line 2: invalid JSON"):
        trainer(folder).fit(train, eval_data=bad, tokenizer=tok)
    with pytest.raises(DataError, match=r"no such file"):
        trainer(folder).fit(train, eval_data=tmp_path / "missing.jsonl", tokenizer=tok)


def test_eval_fraction_leaving_no_training_data(folder, tok, tmp_path):
    one = write_jsonl(tmp_path / "one.jsonl", chat_records(1))
    with pytest.raises(DataError, match=r"cannot hold out 1 eval records from 1: no training records would be left"):
        trainer(folder, eval_fraction=0.5).fit(one, tokenizer=tok)


def test_path_without_tokenizer(folder, tmp_path):
    with pytest.raises(ConfigError, match="pass tokenizer= to fit"):
        trainer(folder).fit(write_jsonl(tmp_path / "t.jsonl", chat_records(2)))


def test_chat_data_with_a_base_tokenizer(folder, tmp_path):
    base_tok = tx.load_tokenizer(make_chatml_tokenizer(tmp_path / "tok", template=None))
    data = write_jsonl(tmp_path / "t.jsonl", chat_records(2))
    with pytest.raises(DataError, match=r"t.jsonl, line 1: chat records need a chat template, but the tokenizer has"):
        trainer(folder).fit(data, tokenizer=base_tok)


def test_tokenizer_ids_beyond_the_model_vocab(tmp_path_factory, tok, tmp_path):
    small = model_folder(tmp_path_factory, vocab_size=101)  # the model has 101 rows, the tokenizer 400 ids
    data = write_jsonl(tmp_path / "t.jsonl", chat_records(4))
    with pytest.raises(DataError) as info:
        trainer(small).fit(data, tokenizer=tok)
    message = str(info.value)
    assert ">= model vocab size 101 (the tokenizer has 400 ids)" in message
    assert "the tokenizer does not match the model" in message


@pytest.mark.parametrize("mode", ["pack", "pad"])
def test_documents_longer_than_the_context_are_chunked(tmp_path_factory, mode, tmp_path):
    short = model_folder(tmp_path_factory, max_position_embeddings=16)
    tok = tx.load_tokenizer(short)
    long_text = " ".join(["the red cat and the blue dog sat under the green tree"] * 6)
    assert len(tok.encode(long_text).ids) > 3 * 16
    data = write_jsonl(tmp_path / "long.jsonl", [{"text": long_text}] * 3 + chat_records(6))
    tr = trainer(short, steps=6, batch_size=4, seq_len=40, pack=mode)
    seen = recording(tr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pad mode warns that it truncates documents longer than seq_len
        tr.fit(data, tokenizer=tok)
    assert len(seen) == 6
    for batch in seen:
        assert batch["positions"].max() < 16  # never beyond the model's context
        seg, pos = batch["segment_ids"], batch["positions"]
        # within a row, each segment's positions run 0, 1, 2, ... (a new chunk restarts at 0)
        for row_seg, row_pos in zip(seg, pos):
            for s in np.unique(row_seg[row_seg > 0]):
                np.testing.assert_array_equal(row_pos[row_seg == s], np.arange((row_seg == s).sum()))
    if mode == "pack":  # rows hold several chunks, longer together than the context
        assert max(int((b["segment_ids"] > 0).sum(axis=1).max()) for b in seen) > 16


def test_chunked_long_documents_train(tmp_path_factory, tmp_path):
    """One real step on rows longer than the model's context: finite loss, positions below the context."""
    short = model_folder(tmp_path_factory, max_position_embeddings=16)
    tok = tx.load_tokenizer(short)
    data = write_jsonl(tmp_path / "long.jsonl", [{"text": " ".join(["a red cat and a blue dog"] * 10)}] * 4)
    tr = trainer(short, steps=1, batch_size=2, seq_len=40)
    real, positions = tr.step, []

    def step(batch):
        positions.append(int(batch["positions"].max()))
        return real(batch)

    tr.step = step
    result = tr.fit(data, tokenizer=tok)
    assert positions == [15]
    assert np.isfinite(result["history"][-1]["loss"])


@pytest.fixture(scope="module")
def cli(folder, tmp_path_factory):
    """`tx finetune` on an empty file, a malformed file, and with a tokenizer whose ids the model lacks."""
    root = tmp_path_factory.mktemp("cli")
    (root / "empty.jsonl").write_text("")
    (root / "bad.jsonl").write_text('{"text": "ok"}\n{"text": "ok"\n')
    small = model_folder(tmp_path_factory, vocab_size=101)
    data = write_jsonl(root / "t.jsonl", chat_records(4))

    def finetune(model, data):
        return ["finetune", "--model", model, "--data", data, "--out", root / "run"]

    return run_tx_batch(
        {
            "empty": finetune(folder, root / "empty.jsonl"),
            "malformed": finetune(folder, root / "bad.jsonl"),
            "vocab": finetune(small, data),
            "no schema": finetune(folder, write_jsonl(root / "qa.jsonl", [{"question": "a", "answer": "b"}])),
            "missing split": finetune(folder, data) + ["--eval-split", "test"],
            "split and fraction": finetune(folder, data) + ["--eval-split", "test", "--eval-fraction", "0.1"],
            "bad columns": finetune(folder, data) + ["--columns", "prompt"],
        },
        root,
    )


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "empty.jsonl is empty (no records)"),
        ("malformed", "bad.jsonl, line 2: invalid JSON"),
        ("vocab", ">= model vocab size 101 (the tokenizer has 400 ids): the tokenizer does not match the model"),
        ("no schema", "qa.jsonl, line 1: no known schema in the columns ['answer', 'question']; tx knows messages"),
        ("missing split", "t.jsonl is one file, so it has only the split 'train', not 'test'"),
        ("split and fraction", "--eval-split and --eval-fraction conflict: give one of them"),
        ("bad columns", "columns should be NAME=COLUMN pairs such as prompt=question,completion=answer"),
    ],
)
def test_cli_bad_data(cli, case, message):
    proc = cli[case]
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("tx finetune: error: ") and message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
