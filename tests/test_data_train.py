"""Every format and schema trains: a folder holding one file of each (JSONL messages, JSON ShareGPT, CSV Alpaca,
parquet prompt/completion, Arrow chat prompt/completion, a save_to_disk folder of text) through Trainer.fit from
Python, and through `tx finetune` (that folder; a hub dataset id with --columns and --eval-split) and `tx eval`."""

import json
import subprocess
import sys

import numpy as np
import pytest
from fixtures_run import ROOT, model_folder, tx_env
from test_data_formats import fake_hub_cache, schema_rows, write

import tx
from tx.train.data import Dataset
from tx.train.trainer import TrainConfig, Trainer

pytest.importorskip("datasets")

FILES = {  # schema -> format, in one folder (no file names a split, so all are 'train')
    "messages": "jsonl",
    "sharegpt": "json",
    "alpaca": "csv",
    "prompt_completion": "parquet",
    "prompt_completion_chat": "arrow",
    "text": "save_to_disk",
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return model_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    for schema, fmt in FILES.items():
        write(schema_rows(schema), fmt, root / schema)
    return root


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TX_DATA_CACHE", str(tmp_path / "cache"))


@pytest.mark.slow
def test_every_format_and_schema_trains_from_python(folder, mixed):
    tok = tx.load_tokenizer(folder)
    options = dict(seq_len=64, batch_size=4)
    model = tx.attach(tx.load_model(folder), lora=tx.LoRAConfig(rank=2, alpha=4))
    ds = Dataset(mixed, tok, **options, max_positions=model.config.max_positions)
    assert ds.num_documents == 12 * len(FILES)
    steps = len(ds)  # one epoch: every row, so every file, is trained on
    tr = Trainer(model, TrainConfig(steps=steps, progress=False, lr=1e-2, **options))
    real, seen = tr.step, []

    def step(batch):
        seen.append(batch)
        return real(batch)

    tr.step = step
    result = tr.fit(mixed, tokenizer=tok)
    losses = [h["loss"] for h in result["history"]]
    assert len(losses) == steps and all(np.isfinite(losses))
    trained = {row.tobytes() for b in seen for row in b["input_ids"]}  # the last batch may reach into epoch 2
    assert trained == {row.tobytes() for row in ds.rows(range(ds.num_rows))["input_ids"]}
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_every_format_and_schema_trains_from_the_cli(folder, mixed, tmp_path):
    hub = tmp_path / "hub"
    qa = [{"question": f"Sort {i} 1 2", "answer": " 1 2", "score": i} for i in range(12)]
    fake_hub_cache(hub, "someone/qa", {"data/train": (qa, "parquet"), "data/test": (qa[:4], "jsonl")})
    common = ["--steps", "3", "--batch-size", "4", "--seq-len", "64", "--lora-rank", "2", "--expansion-rate", "1"]
    cases = [
        ["finetune", "--model", folder, "--data", mixed, "--out", tmp_path / "run1", "--eval-fraction", "0.1", *common],
        [
            "finetune",
            "--model",
            folder,
            "--data",
            "someone/qa",
            "--columns",
            "prompt=question,completion=answer",
            "--eval-split",
            "test",
            "--out",
            tmp_path / "run2",
            "--data-cache",
            tmp_path / "cli-cache",
            *common,
        ],  # fmt: skip
        ["eval", "--model", folder, "--data", mixed / "prompt_completion.parquet", "--seq-len", "64"],
    ]
    results = tmp_path / "results.json"
    env = {**tx_env(tmp_path / "xla"), "HF_HUB_CACHE": str(hub), "TX_DATA_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "cli_batch.py"), str(results)],
        input=json.dumps([[str(a) for a in c] for c in cases]),
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run1, run2, ev = json.loads(results.read_text())
    for r in (run1, run2):
        assert r["returncode"] == 0, r["stderr"][-2000:]
        assert "final train loss" in r["stdout"] and "eval loss" in r["stdout"]
    assert ev["returncode"] == 0, ev["stderr"]
    out = json.loads(ev["stdout"].strip().splitlines()[-1])
    assert np.isfinite(out["eval_loss"]) and out["tokens"] > 0
    assert list((tmp_path / "cli-cache").iterdir())  # --data-cache is where the tokens went
    for run in ("run1", "run2"):
        history = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert [h["step"] for h in history if "loss" in h] == [1, 2, 3]
