"""tx.train.data: reading JSONL, loss masks, packing, deterministic batches, eval split (tiny real tokenizers)."""

import json

import numpy as np
import pytest
from fixtures_tokenizer import QWEN3_TEMPLATE, corpus, make_chatml_tokenizer, make_llama_tokenizer

from tx.errors import ConfigError, DataError
from tx.tokenizer import load_tokenizer
from tx.train.data import Dataset, check_vocab, read_records, split_eval, tokenize

KEYS = {
    "input_ids": np.int32,
    "targets": np.int32,
    "loss_mask": np.float32,
    "segment_ids": np.int32,
    "positions": np.int32,
}
CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And how are you?"},
    {"role": "assistant", "content": "Ça va — très bien ✓"},
]


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    return load_tokenizer(make_chatml_tokenizer(tmp_path_factory.mktemp("chatml")))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return load_tokenizer(make_llama_tokenizer(tmp_path_factory.mktemp("llama")))


def texts(n, seed=0):
    return [{"text": line} for line in corpus(n, seed=seed)]


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def masked_runs(batch, tokenizer):
    """Decode each run of consecutive loss-masked targets in a batch, row by row."""
    runs = []
    for targets, mask in zip(batch["targets"], batch["loss_mask"]):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
        runs += [tokenizer.decode(targets[s:e], skip_special_tokens=False) for s, e in zip(edges[::2], edges[1::2])]
    return runs


def segments(batch):
    """Yield (row, segment id, token ids of the segment's document slice = inputs + last target)."""
    for r, (ids, tgt, seg) in enumerate(zip(batch["input_ids"], batch["targets"], batch["segment_ids"])):
        for s in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == s)
            yield r, s, [*ids[idx].tolist(), int(tgt[idx[-1]])]


# -- reading --------------------------------------------------------------------------------------------------

GOOD = json.dumps({"text": "fine"})
BAD_LINES = {
    "bad json": ('{"text": "unterminated', "invalid JSON"),
    "no schema": ('{"prompt": "x"}', r"no known schema in the columns \['prompt'\]; tx knows messages \(messages\)"),
    "both keys": ('{"text": "x", "messages": []}', "'messages' should be a non-empty list"),  # messages wins
    "array": ('["text"]', "found a JSON list, not an object"),
    "text not str": ('{"text": 3}', "column 'text' should be a string, found int"),
    "empty text": ('{"text": ""}', "'text' is empty"),
    "messages not list": ('{"messages": "hi"}', "column 'messages' should be a list, found str"),
    "empty messages": ('{"messages": []}', "'messages' should be a non-empty list"),
    "message not object": ('{"messages": ["hi"]}', r"messages\[0\] should be an object"),
    "unknown role": (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
        r"messages\[1\] has role 'bot'; roles are system, developer, user, assistant, tool",
    ),
    "content not str": ('{"messages": [{"role": "assistant", "content": ["b"]}]}', "'content' should be a string"),
    "no content": ('{"messages": [{"role": "assistant"}]}', "'content' should be a string, found nothing"),
    "no assistant": ('{"messages": [{"role": "user", "content": "a"}]}', "no assistant message"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_malformed_line_names_file_line_and_expectation(tmp_path, case):
    bad, problem = BAD_LINES[case]
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, "", bad, GOOD])  # the blank line still counts
    with pytest.raises(DataError, match=problem) as err:
        read_records(path)
    assert str(err.value).startswith(f"{path}, line 3: ")


def test_non_utf8_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(GOOD.encode() + b'\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=rf"^{path}, line 2: not UTF-8"):
        read_records(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=rf"^{path} is empty \(no records\); tx reads rows with the columns of"):
        read_records(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file or folder"):
        read_records(tmp_path / "nope.jsonl")


def test_records_keep_their_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "", json.dumps({"messages": CHAT})])
    records = read_records(path)
    assert records == [{"text": "fine"}, {"messages": CHAT}]
    assert [r.where for r in records] == [f"{path}, line 1", f"{path}, line 3"]


def test_list_records_are_validated(chatml):
    with pytest.raises(DataError, match=r"^record 1: .*'text' should be a string"):
        Dataset([{"text": "ok"}, {"text": None}], chatml, seq_len=8, batch_size=1)
    with pytest.raises(DataError, match="no records"):
        Dataset([], chatml, seq_len=8, batch_size=1)


# -- tokenizing and masks ---------------------------------------------------------------------------------------


def test_chat_loss_mask_is_exactly_the_assistant_replies(chatml):
    ds = Dataset([{"messages": CHAT}], chatml, seq_len=256, batch_size=1, mode="pad")
    batch = ds.batch(0)
    assert masked_runs(batch, chatml) == ["Paris.<|im_end|>", "Ça va — très bien ✓<|im_end|>"]
    # nothing of the conversation is lost: the row decodes to the rendered chat
    (_, _, ids), *rest = list(segments(batch))
    assert not rest
    assert chatml.decode(ids, skip_special_tokens=False) == chatml.apply_chat_template(CHAT)
    assert ds.num_loss_tokens == int(batch["loss_mask"].sum()) > 0


def test_chat_loss_mask_llama_template_bos_and_eos(llama):
    chat = [CHAT[1], CHAT[2], {"role": "user", "content": "Sort 3 1 2"}, {"role": "assistant", "content": "1 2 3"}]
    (ids, labels), *_ = tokenize(llama, [{"messages": chat}])
    assert ids[0] == llama.bos_id and ids[-1] == llama.eos_id
    runs = masked_runs({"targets": ids[None, 1:], "loss_mask": labels[None, 1:].astype(np.float32)}, llama)
    assert runs == [" Paris.</s>", " 1 2 3</s>"]  # the reply's leading space is in its first token


def test_chat_loss_mask_when_history_renders_differently(tmp_path):
    tok = load_tokenizer(make_chatml_tokenizer(tmp_path / "q3", template=QWEN3_TEMPLATE))
    (ids, labels), *_ = tokenize(tok, [{"messages": CHAT}])
    runs = masked_runs({"targets": ids[None, 1:], "loss_mask": labels[None, 1:].astype(np.float32)}, tok)
    assert runs == ["Paris.<|im_end|>", "<think>\n\n</think>\n\nÇa va — très bien ✓<|im_end|>"]


def test_text_documents_bos_eos_and_full_loss(chatml, llama):
    for tok, bos in ((chatml, []), (llama, [llama.bos_id])):
        (ids, labels), *_ = tokenize(tok, [{"text": "Hello world"}])
        assert ids.tolist() == bos + tok.encode("Hello world", add_special_tokens=False).ids + [tok.eos_id]
        assert labels.all()


def test_chat_data_without_chat_template_is_a_data_error(tmp_path):
    tok = load_tokenizer(make_chatml_tokenizer(tmp_path / "base", template=None))
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, json.dumps({"messages": CHAT})])
    with pytest.raises(DataError, match=rf"^{path}, line 2: chat records need a chat template"):
        Dataset(path, tok, seq_len=64, batch_size=1)
    Dataset(write_jsonl(tmp_path / "text.jsonl", [GOOD]), tok, seq_len=64, batch_size=1)  # text is fine


def test_template_rejection_names_the_line(llama, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, json.dumps({"messages": [CHAT[2]]})])  # assistant first
    with pytest.raises(DataError, match=rf"^{path}, line 2: .*roles must alternate"):
        Dataset(path, llama, seq_len=64, batch_size=1)


def test_check_vocab(chatml):
    check_vocab(9, 10)
    with pytest.raises(DataError, match="token id 10 >= model vocab size 10"):
        check_vocab(10, 10)
    ds = Dataset(texts(5), chatml, seq_len=32, batch_size=1)
    Dataset(texts(5), chatml, seq_len=32, batch_size=1, vocab_size=ds.max_id + 1)
    with pytest.raises(DataError, match=f"token id {ds.max_id} >= model vocab size {ds.max_id}"):
        Dataset(texts(5), chatml, seq_len=32, batch_size=1, vocab_size=ds.max_id)


# -- layout -----------------------------------------------------------------------------------------------------


def check_row_invariants(batch, seq_len, max_positions=None):
    assert {k: v.dtype for k, v in batch.items()} == KEYS
    assert all(v.shape == batch["input_ids"].shape and v.shape[1] == seq_len for v in batch.values())
    seg, pos, mask = batch["segment_ids"], batch["positions"], batch["loss_mask"]
    for r in range(len(seg)):
        used = seg[r] > 0
        n = int(used.sum())
        assert used[:n].all() and not used[n:].any()  # padding only at the end
        assert not mask[r, n:].any() and not pos[r, n:].any()
        if n:
            assert seg[r, 0] == 1 and set(np.diff(seg[r, :n]).tolist()) <= {0, 1}  # 1, 2, ... in order
            starts = np.flatnonzero(np.diff(np.concatenate([[0], seg[r, :n]])))
            expected = np.arange(n) - np.repeat(starts, np.diff(np.append(starts, n)))
            assert (pos[r, :n] == expected).all()  # restart at 0 in each segment
    assert pos.max() < (max_positions or seq_len)


def test_pack_rows_hold_whole_documents_and_nothing_crosses(chatml):
    records = texts(60)
    docs = tokenize(chatml, records)
    ds = Dataset(records, chatml, seq_len=48, batch_size=4, shuffle=False)
    assert max(len(ids) for ids, _ in docs) <= 48 and ds.num_chunked == 0
    batch = ds.rows(range(ds.num_rows))
    check_row_invariants(batch, 48)
    # each segment is exactly one whole document (targets never run into the next one), each document once
    assert sorted(ids for _, _, ids in segments(batch)) == sorted(ids.tolist() for ids, _ in docs)
    # eos ends every text document, so it is never an input, and a target of eos closes its segment
    assert not (batch["input_ids"][batch["segment_ids"] > 0] == chatml.eos_id).any()
    seg = batch["segment_ids"]
    last = np.concatenate([seg[:, :-1] != seg[:, 1:], np.ones((len(seg), 1), bool)], axis=1) & (seg > 0)
    assert ((batch["targets"] == chatml.eos_id) == last).all()
    assert batch["loss_mask"].sum() == ds.num_loss_tokens == sum(len(ids) - 1 for ids, _ in docs)
    assert (seg.max(axis=1) >= 2).mean() > 0.8  # rows really are packed
    assert ds.fill > 0.9


def test_long_documents_are_chunked(chatml):
    long = {"text": " ".join(corpus(30, seed=1))}
    (ids, _), *_ = tokenize(chatml, [long])
    ds = Dataset([long, *texts(10)], chatml, seq_len=32, batch_size=2, shuffle=False)
    assert len(ids) - 1 > 3 * 32 and ds.num_chunked == 1
    batch = ds.rows(range(ds.num_rows))
    check_row_invariants(batch, 32)
    chunks = [seg_ids for _, _, seg_ids in segments(batch)][: -(-(len(ids) - 1) // 32)]
    assert all(len(c) == 33 for c in chunks[:-1])  # full rows: 32 inputs + the last target
    rebuilt = [t for c in chunks for t in c[:-1]] + [chunks[-1][-1]]
    assert rebuilt == ids.tolist()  # every token predicted exactly once, in order


def test_max_positions_bounds_positions(chatml):
    long = {"text": " ".join(corpus(30, seed=1))}
    ds = Dataset([long, *texts(20)], chatml, seq_len=64, batch_size=2, max_positions=16)
    batch = ds.rows(range(ds.num_rows))
    check_row_invariants(batch, 64, max_positions=16)
    assert batch["positions"].max() == 15
    assert (batch["segment_ids"].max(axis=1) >= 4).any()  # several chunks of one document share a row


def test_pad_mode_one_document_per_row(chatml):
    records = texts(12) + [{"text": " ".join(corpus(8, seed=2))}]
    docs = tokenize(chatml, records)
    with pytest.warns(UserWarning, match="1 of 13 documents .* longer than seq_len=24 and were truncated"):
        ds = Dataset(records, chatml, seq_len=24, batch_size=4, mode="pad", shuffle=False)
    assert ds.num_rows == 13 and ds.num_truncated == 1
    batch = ds.rows(range(ds.num_rows))
    check_row_invariants(batch, 24)
    assert batch["segment_ids"].max(axis=1).tolist() == [1] * 13
    for (ids, _), (_, _, row_ids) in zip(docs, segments(batch)):
        assert row_ids == ids[:25].tolist()  # whole, or its first 24 (input, target) pairs
    pad = batch["segment_ids"] == 0
    assert pad.any() and (batch["input_ids"][pad] == chatml.pad_id).all()


# -- batches ----------------------------------------------------------------------------------------------------


def row_keys(batch):
    return [row.tobytes() for row in batch["input_ids"]]


def test_same_seed_same_batches_other_seed_other_batches(chatml):
    records = texts(80)
    a = Dataset(records, chatml, seq_len=32, batch_size=4, seed=3)
    b = Dataset(records, chatml, seq_len=32, batch_size=4, seed=3)
    c = Dataset(records, chatml, seq_len=32, batch_size=4, seed=4)
    for step in (0, 1, len(a), 3 * len(a) + 1):
        for key in KEYS:
            np.testing.assert_array_equal(a.batch(step)[key], b.batch(step)[key])
    assert row_keys(a.batch(0)) != row_keys(c.batch(0))
    check_row_invariants(a.batch(0), 32)


def test_random_access_equals_sequential_iteration_and_epochs_cover_every_row(chatml):
    records = texts(50)
    seq = Dataset(records, chatml, seq_len=32, batch_size=3, seed=1)
    steps = 2 * len(seq) + 2
    sequential = [b for b, _ in zip(seq, range(steps))]
    fresh = Dataset(records, chatml, seq_len=32, batch_size=3, seed=1)
    for step in np.random.default_rng(0).permutation(steps).tolist():  # a resumed run, in any order
        for key in KEYS:
            np.testing.assert_array_equal(fresh.batch(step)[key], sequential[step][key])
    assert [row_keys(b) for b in fresh.iterate(5, 3)] == [row_keys(b) for b in sequential[5:8]]
    # the stream of rows: each epoch is a permutation of all rows, and epochs are shuffled differently
    stream = [k for b in sequential for k in row_keys(b)]
    every = sorted(row_keys(seq.rows(range(seq.num_rows))))
    rows = seq.num_rows
    assert sorted(stream[:rows]) == every and sorted(stream[rows : 2 * rows]) == every
    assert stream[:rows] != stream[rows : 2 * rows]
    assert len(seq) == -(-rows // 3)


def test_fewer_rows_than_batch_size(chatml):
    ds = Dataset(texts(2), chatml, seq_len=64, batch_size=4)
    assert ds.num_rows == 1 and len(ds) == 1
    batch = ds.batch(0)
    assert len(set(row_keys(batch))) == 1 and batch["loss_mask"].sum() == 4 * ds.num_loss_tokens


def test_eval_split_is_deterministic_and_a_partition():
    records = texts(40)
    train, held = split_eval(records, 0.25, seed=5)
    assert len(held) == 10 and len(train) == 30
    assert split_eval(records, 0.25, seed=5) == (train, held)
    assert split_eval(records, 0.25, seed=6)[1] != held
    assert sorted(map(json.dumps, train + held)) == sorted(map(json.dumps, records))
    assert [records.index(r) for r in held] == sorted(records.index(r) for r in held)  # original order kept
    assert len(split_eval(records, 3)[1]) == 3
    with pytest.raises(DataError, match="no training records would be left"):
        split_eval(records, 40)
    for bad in (0, 1.0, -0.5, "10%", True):
        with pytest.raises(ConfigError):
            split_eval(records, bad)


def test_eval_batches_cover_every_row_once_in_order(chatml):
    ds = Dataset(texts(30), chatml, seq_len=32, batch_size=4, shuffle=False)
    assert ds.num_rows % 4 != 0
    batches = list(ds.eval_batches())
    assert len(batches) == -(-ds.num_rows // 4)
    every = ds.rows(range(ds.num_rows))
    got = {k: np.concatenate([b[k] for b in batches]) for k in KEYS}
    for key in KEYS:
        np.testing.assert_array_equal(got[key][: ds.num_rows], every[key])
    tail = slice(ds.num_rows, None)
    assert not got["loss_mask"][tail].any() and not got["segment_ids"][tail].any()
    assert got["loss_mask"].sum() == ds.num_loss_tokens
    assert [row_keys(b) for b in ds.eval_batches()] == [row_keys(b) for b in batches]


def test_jsonl_path_and_bad_options(chatml, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in texts(10)] + [json.dumps({"messages": CHAT})])
    ds = Dataset(path, chatml, seq_len=64, batch_size=2)
    assert ds.num_documents == 11 and str(path) in repr(ds)
    for kwargs in ({"mode": "stream"}, {"seq_len": 0}, {"batch_size": -1}, {"max_positions": 0}):
        with pytest.raises(ConfigError):
            Dataset(path, chatml, **{"seq_len": 64, "batch_size": 2, **kwargs})
