"""What a run reports as it goes: each record's throughput is its own steps' tokens over their own time (the last
record too), and without a terminal the progress is one plain line per record."""

import itertools
import json

import numpy as np
import pytest
from fixtures_run import model_folder

import tx
from tx.train.data import Dataset
from tx.train.trainer import TrainConfig, Trainer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return model_folder(tmp_path_factory)


def test_throughput_per_record_with_a_deterministic_clock(folder, tmp_path, capsys):
    tok = tx.load_tokenizer(folder)
    model = tx.attach(tx.load_model(folder), lora=tx.LoRAConfig(rank=2, alpha=4))
    records = [{"text": " ".join(["red"] * (1 + i % 5))} for i in range(24)]
    # padded rows: every batch has its own count of real tokens, so a record that took another step's would show
    data = Dataset(records, tok, seq_len=24, batch_size=2, seed=0, mode="pad", vocab_size=tok.vocab_size)
    cfg = TrainConfig(steps=5, batch_size=2, seq_len=24, log_every=2, out=str(tmp_path / "run"), progress=True)
    trainer = Trainer(model, cfg)
    ticks = itertools.count(0.0, 10.0)  # every reading of the clock is 10 s after the one before
    trainer.clock = lambda: next(ticks)
    history = trainer.fit(data)["history"]
    real = [int(np.count_nonzero(data.batch(s)["segment_ids"])) for s in range(5)]
    assert len(set(real)) > 1, real
    want = {2: (real[0] + real[1]) / 10, 4: (real[2] + real[3]) / 10, 5: real[4] / 10}  # steps 1-2, 3-4, 5
    got = {r["step"]: r["tokens_per_s"] for r in history if "loss" in r}
    assert got == pytest.approx(want, rel=1e-12), (got, want)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"]: r["tokens_per_s"] for r in lines if "loss" in r} == got
    # pytest's captured stderr is no terminal: plain lines, one per record, no carriage-return frames
    err = capsys.readouterr().err
    assert "\r" not in err, err[-500:]
    shown = [x for x in err.splitlines() if x.startswith("train step ")]
    assert [x.split()[2] for x in shown] == ["2/5", "4/5", "5/5"], err[-1000:]
    assert shown[-1].endswith(f"tok/s {want[5]:.0f}"), shown
