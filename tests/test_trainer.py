"""The trainer: loss falls on a learnable task, only adapters move, resume equals an uninterrupted run."""

import json

import numpy as np
import pytest
from fixtures_models import make_checkpoint
from fixtures_tokenizer import make_chatml_tokenizer

import tx
from tx.train.data import Dataset
from tx.train.trainer import TrainConfig, Trainer, TrainingDiverged


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    make_chatml_tokenizer(folder)
    return tx.load_tokenizer(folder)


def records(n=64, seed=0):
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]
    out = []
    for _ in range(n):
        w = list(rng.choice(words, size=3))
        out.append(
            {
                "messages": [
                    {"role": "user", "content": "reverse: " + " ".join(w)},
                    {"role": "assistant", "content": " ".join(w[::-1])},
                ]
            }
        )
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tok):
    """A Qwen3 checkpoint whose vocabulary fits the test tokenizer."""
    folder = tmp_path_factory.mktemp("qwen3v")
    return {"qwen3": make_checkpoint("qwen3", folder, vocab_size=tok.vocab_size)}


def fresh(checkpoints, rank=4, n=2):
    folder, _ = checkpoints["qwen3"]
    model = tx.load_model(folder)
    tx.attach(model, lora=tx.LoRAConfig(rank=rank, alpha=8), connector=tx.ConnectorConfig(expansion_rate=n))
    return model


def dataset(tok, model, **kw):
    return Dataset(records(), tok, seq_len=48, batch_size=4, seed=0, vocab_size=tok.vocab_size, **kw)


def test_loss_falls_and_only_adapters_move(checkpoints, tok):
    model = fresh(checkpoints)
    base_before = np.asarray(model.layers.attn.q_proj.base.weight[...]).copy()
    data = dataset(tok, model)
    trainer = Trainer(
        model, TrainConfig(steps=30, lr=1e-2, schedule="constant", batch_size=4, seq_len=48, progress=False)
    )
    losses = [float(trainer.step(data.batch(i))["loss"]) for i in range(30)]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    np.testing.assert_array_equal(np.asarray(model.layers.attn.q_proj.base.weight[...]), base_before)
    assert np.abs(np.asarray(model.layers.attn.q_proj.lora_b[...])).max() > 0


def test_grad_accum_equals_big_batch(checkpoints, tok):
    data = dataset(tok, None)
    batch = data.batch(0)
    outs = []
    for accum in (1, 2):
        model = fresh(checkpoints)
        tr = Trainer(model, TrainConfig(steps=2, lr=1e-3, batch_size=4, seq_len=48, grad_accum=accum, progress=False))
        m = tr.step(batch)
        outs.append((float(m["loss"]), np.asarray(model.layers.attn.q_proj.lora_b[...])))
    # equal up to fp32 summation order; the micro-batches split the same tokens
    assert abs(outs[0][0] - outs[1][0]) < 1e-5
    np.testing.assert_allclose(outs[0][1], outs[1][1], atol=1e-6)


def test_resume_matches_uninterrupted(checkpoints, tok, tmp_path):
    data = dataset(tok, None)
    cfg = dict(
        steps=8, lr=2e-3, batch_size=4, seq_len=48, save_every=4, progress=False, schedule="cosine", warmup_steps=2
    )
    full_model = fresh(checkpoints)
    full = Trainer(full_model, TrainConfig(**cfg, out=str(tmp_path / "full"))).fit(data)
    # interrupted run: dies during step 5, after step 4's checkpoint; then a fresh trainer resumes it
    part = Trainer(fresh(checkpoints), TrainConfig(**cfg, out=str(tmp_path / "part")))
    real = part.step

    def dying(batch):
        if part.step_count == 4:
            raise KeyboardInterrupt
        return real(batch)

    part.step = dying
    with pytest.raises(KeyboardInterrupt):
        part.fit(data)
    resumed_model = fresh(checkpoints)
    res = Trainer(resumed_model, TrainConfig(**cfg, out=str(tmp_path / "part"), resume=True)).fit(data)
    a = [h["loss"] for h in full["history"] if "loss" in h][4:]
    b = [h["loss"] for h in res["history"] if "loss" in h]
    assert len(a) == len(b) == 4
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(full_model.layers.attn.q_proj.lora_b[...]),
        np.asarray(resumed_model.layers.attn.q_proj.lora_b[...]),
        atol=1e-6,
    )
    lines = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 9))


def test_nan_loss_stops_and_keeps_last_checkpoint(checkpoints, tok, tmp_path):
    model = fresh(checkpoints)
    data = dataset(tok, None)
    cfg = TrainConfig(steps=6, lr=1e-3, batch_size=4, seq_len=48, save_every=2, progress=False, out=str(tmp_path))
    trainer = Trainer(model, cfg)
    real = trainer.step

    def poisoned(batch):
        if trainer.step_count == 3:  # corrupt the adapters as a diverged update would
            trainer.states["lora"] = __import__("jax").tree.map(lambda x: x * np.nan, trainer.states["lora"])
        return real(batch)

    trainer.step = poisoned
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 4.*last good checkpoint \(step 2\)"):
        trainer.fit(data)
    assert (tmp_path / "checkpoints" / "step_0000002" / "COMPLETE").exists()
    assert not (tmp_path / "checkpoints" / "step_0000004").exists()


def test_output_folder_guard(checkpoints, tok, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    model = fresh(checkpoints)
    with pytest.raises(tx.errors.ConfigError, match="exists and is not a tx run"):
        Trainer(model, TrainConfig(steps=1, batch_size=4, seq_len=48, out=str(tmp_path), progress=False)).fit(
            dataset(tok, None)
        )


@pytest.mark.parametrize("bad", [dict(steps=0), dict(lr=-1.0), dict(schedule="linear"), dict(grad_clip=0.0)])
def test_config_validation(bad):
    with pytest.raises(tx.errors.ConfigError, match=list(bad)[0]):
        TrainConfig(**bad)


def test_lora_dropout_trains_and_advances_its_keys(checkpoints, tok):
    """LoRA dropout inside the compiled step: the keys advance each step and differ from a dropout-free run."""
    folder, _ = checkpoints["qwen3"]
    data = dataset(tok, None)
    batch = data.batch(0)
    lb = {}
    for p in (0.0, 0.5):
        model = tx.load_model(folder)
        tx.attach(model, lora=tx.LoRAConfig(rank=4, alpha=8, dropout=p, seed=3))
        tr = Trainer(model, TrainConfig(steps=3, lr=1e-2, batch_size=4, seq_len=48, progress=False))
        keys = []
        for _ in range(3):
            tr.step(batch)
            if p:
                keys.append(np.asarray(model.layers.attn.q_proj.dropout_key[...]).copy())
        lb[p] = np.asarray(model.layers.attn.q_proj.lora_b[...])
        if p:
            assert not np.array_equal(keys[0], keys[1]) and not np.array_equal(keys[1], keys[2])
    assert np.abs(lb[0.5]).max() > 0
    assert np.abs(lb[0.5] - lb[0.0]).max() > 1e-4  # dropout changed what the adapters learned


def test_checkpoint_from_before_new_adapter_fields_still_resumes(checkpoints):
    """A checkpoint written before LoRA's target_parameters / rank_pattern and the connector's fracs / layers
    existed holds no such keys: they are at their defaults, so the run resumes; a real difference still refuses."""
    trainer = Trainer(fresh(checkpoints), TrainConfig(steps=1, batch_size=4, seq_len=48, progress=False))
    old = trainer.adapter_setup()
    for key in ("target_parameters", "rank_pattern", "alpha_pattern"):
        del old["lora"][key]
    for key in ("fracs", "layers"):
        del old["connector"][key]
    trainer._check_resumable("ckpt", {"adapters": old})
    old["connector"]["expansion_rate"] = 4
    with pytest.raises(tx.errors.CheckpointError, match="connector.expansion_rate: checkpoint 4, model 2"):
        trainer._check_resumable("ckpt", {"adapters": old})
