"""With several processes each tokenises only its share of the blocks into a shared token cache (and, where the
cache folder is not shared, fills in the rest itself); every process ends with the same tokens as one process."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_run import ROOT, chat_records, tx_env, write_jsonl
from fixtures_tokenizer import make_chatml_tokenizer

from tx.tokenizer import load_tokenizer
from tx.train.data import read_records, tokenize

SCRIPT = Path(__file__).parent / "data_multihost_check.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(data, tok, caches, block_rows):
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, SCRIPT, str(i), str(port), data, tok, caches[i], str(block_rows)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=tx_env(),
            cwd=ROOT,
        )
        for i in (0, 1)
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


@pytest.mark.slow
def test_each_process_tokenises_its_share(tmp_path):
    tok_folder = make_chatml_tokenizer(tmp_path / "tok")
    data = write_jsonl(tmp_path / "d.jsonl", chat_records(20))  # 5 blocks of 4 rows
    want = tokenize(load_tokenizer(tok_folder), read_records(data))
    line = [f"{data}, line {n}" for n in (1, 5, 9, 13, 17)]  # each block's first row

    shared = two_processes(data, tok_folder, [tmp_path / "cache"] * 2, 4)
    assert shared[0]["blocks"] == [line[0], line[2], line[4]] and shared[1]["blocks"] == [line[1], line[3]]
    assert shared[0]["path"] == shared[1]["path"]

    apart = two_processes(data, tok_folder, [tmp_path / "c0", tmp_path / "c1"], 4)  # caches the others cannot see
    assert apart[0]["blocks"] == [line[0], line[2], line[4], line[1], line[3]]  # its share, then the rest
    assert apart[1]["blocks"] == [line[1], line[3], line[0], line[2], line[4]]

    again = two_processes(data, tok_folder, [tmp_path / "cache"] * 2, 4)
    assert again[0]["blocks"] == again[1]["blocks"] == []  # cached: nothing tokenised
    for r in shared + apart + again:
        assert r["ids"] == [ids.tolist() for ids, _ in want]
        assert r["labels"] == [lab.astype(int).tolist() for _, lab in want]
