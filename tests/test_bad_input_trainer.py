"""Bad trainer input: conflicting or mistyped TrainConfig values, malformed batches, run folders that are not
what they should be, and resuming a checkpoint written for another adapter setup or other data settings.

Nothing here compiles a train step: checkpoints are written by ``Trainer.fit`` with the step replaced by a stub.
"""

import json
import shutil

import jax
import numpy as np
import pytest
from fixtures_run import chat_records, model_folder, stub_steps, write_jsonl

import tx
from tx.errors import CheckpointError, ConfigError, DataError
from tx.train.checkpoint import latest_checkpoint
from tx.train.trainer import TrainConfig, Trainer

BASE = dict(steps=4, batch_size=2, seq_len=32, progress=False)


@pytest.mark.parametrize(
    "values, match",
    [
        (dict(resume=True, overwrite=True, out="run"), r"resume and overwrite conflict"),
        (dict(resume=True), r"resume=True needs out"),
        (dict(overwrite=True), r"overwrite=True needs out"),
        (dict(save_every=10), r"save_every=10 needs out"),
        (dict(batch_size=6, grad_accum=4), r"batch_size \(6\) must be a multiple of grad_accum \(4\)"),
        (dict(steps=10, warmup_steps=10), r"warmup_steps \(10\) must be < steps \(10\)"),
        (dict(steps=0), r"steps must be an integer >= 1, got 0"),
        (dict(steps=2.5), r"steps must be an integer >= 1, got 2.5"),
        (dict(steps="100"), r"steps must be an integer >= 1, got '100'"),
        (dict(steps=True), r"steps must be an integer >= 1, got True"),
        (dict(batch_size=-8), r"batch_size must be an integer >= 1, got -8"),
        (dict(seed=-1), r"seed must be an integer >= 0, got -1"),
        (dict(seed=False), r"seed must be an integer >= 0, got False"),
        (dict(save_every=1.5, out="run"), r"save_every must be an integer >= 0, got 1.5"),
        (dict(lr=float("nan")), r"lr must be a finite number >= 0, got nan"),
        (dict(lr=float("inf")), r"lr must be a finite number >= 0, got inf"),
        (dict(lr="2e-4"), r"lr must be a finite number >= 0, got '2e-4'"),
        (dict(lr=-1e-3), r"lr must be a finite number >= 0, got -0.001"),
        (dict(connector_lr=True), r"connector_lr must be a finite number >= 0, got True"),
        (dict(weight_decay=-0.1), r"weight_decay must be a finite number >= 0, got -0.1"),
        (dict(weight_decay=None), r"weight_decay must be a finite number >= 0, got None"),
        (dict(grad_clip=0.0), r"grad_clip must be a number > 0 or None, got 0.0"),
        (dict(grad_clip="1.0"), r"grad_clip must be a number > 0 or None, got '1.0'"),
        (dict(eval_fraction=1.0), r"eval_fraction must be a number in \[0, 1\), got 1.0"),
        (dict(eval_fraction="0.1"), r"eval_fraction must be a number in \[0, 1\), got '0.1'"),
        (dict(eval_fraction=float("nan")), r"eval_fraction must be a number in \[0, 1\), got nan"),
        (dict(eval_batches=0), r"eval_batches must be an integer >= 1 or None, got 0"),
        (dict(schedule="linear"), r"schedule must be 'cosine' or 'constant', got 'linear'"),
        (dict(pack="packed"), r"pack must be 'pack' or 'pad', got 'packed'"),
        (dict(keep_checkpoints=0), r"keep_checkpoints must be an integer >= 1, got 0"),
        (dict(resume="yes", out="run"), r"resume must be True or False, got 'yes'"),
        (dict(remat=1), r"remat must be True or False, got 1"),
        (dict(out=42), r"out must be a folder path or None, got 42"),
    ],
)
def test_config_values(values, match):
    with pytest.raises(ConfigError, match=r"TrainConfig\." + match):
        TrainConfig(**values)


def test_unknown_and_positional_config():
    with pytest.raises(TypeError, match="learning_rate"):
        TrainConfig(learning_rate=1e-3)
    with pytest.raises(TypeError):
        TrainConfig(100)


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return model_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def tok(folder):
    return tx.load_tokenizer(folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", chat_records(16))


def model_with(folder, lora=2, connector=None, targets="all-linear"):
    model = tx.load_model(folder)
    tx.attach(
        model,
        lora=tx.LoRAConfig(rank=lora, alpha=4, targets=targets) if lora else None,
        connector=tx.ConnectorConfig(expansion_rate=connector) if connector else None,
    )
    return model


def make_run(folder, tok, data, out, **setup):
    """A finished run folder (marker, metrics, checkpoints at steps 2 and 4, adapter) of the given adapter setup."""
    trainer = stub_steps(Trainer(model_with(folder, **setup), TrainConfig(**BASE, save_every=2, out=str(out))))
    trainer.fit(data, tokenizer=tok)
    assert latest_checkpoint(out / "checkpoints").name == "step_0000004"
    return out


@pytest.fixture(scope="module")
def run(folder, tok, data, tmp_path_factory):
    """A run written with LoRA rank 2 on all linears and an mHC connector with 2 streams."""
    return make_run(folder, tok, data, tmp_path_factory.mktemp("run") / "run", lora=2, connector=2)


def resume(folder, tok, data, out, config=None, **setup):
    model = model_with(folder, **setup)
    trainer = stub_steps(Trainer(model, TrainConfig(**{**BASE, **(config or {})}, out=str(out), resume=True)))
    before = [np.asarray(x).copy() for x in jax.tree.leaves(trainer.states)]
    try:
        trainer.fit(data, tokenizer=tok)
    finally:  # a refused resume changes nothing in the model
        after = [np.asarray(x) for x in jax.tree.leaves(trainer.states)]
        resume.unchanged = all(np.array_equal(a, b) for a, b in zip(before, after))
    return trainer


# ------------------------------------------------------------------------------------------ resume conflicts


@pytest.mark.parametrize(
    "setup, lines",
    [
        (dict(lora=4, connector=2), ["lora.rank: checkpoint 2, model 4"]),
        (dict(lora=2, connector=2, targets=["q_proj", "v_proj"]), ["lora.targets: checkpoint 'all-linear', model"]),
        (dict(lora=2, connector=3), ["connector.expansion_rate: checkpoint 2, model 3"]),
        (dict(lora=2, connector=None), ["connector: checkpoint {", ", model none"]),
        (dict(lora=None, connector=2), ["lora: checkpoint {", ", model none"]),
    ],
)
def test_resume_with_another_adapter_setup(folder, tok, data, run, tmp_path, setup, lines):
    out = shutil.copytree(run, tmp_path / "run")
    with pytest.raises(CheckpointError) as info:
        resume(folder, tok, data, out, **setup)
    message = str(info.value)
    assert "step_0000004 was written for a different adapter setup than the model's" in message
    assert "resume with the same LoRA and connector options, or start a new run" in message
    assert all(line in message for line in lines), message
    assert resume.unchanged


@pytest.mark.parametrize(
    "setup, lines",
    [
        (
            dict(lora=4, connector=2),
            ["'lora:segments/0/blocks/0/attn/q_proj/lora_a' has shape (2, 2, 40), the model expects (2, 4"],
        ),
        (dict(lora=2, connector=None), ["unexpected 'connector:"]),
        (dict(lora=2, connector=3), ["'connector:segments/0/blocks/0/attn_residual/", "has shape"]),
    ],
)
def test_resume_old_checkpoint_without_setup_info(folder, tok, data, run, tmp_path, setup, lines):
    """Checkpoints that do not record their adapter setup are checked tensor by tensor, before anything changes."""
    out = shutil.copytree(run, tmp_path / "run")
    for state in (out / "checkpoints").glob("step_*/state.json"):
        info = json.loads(state.read_text())
        del info["adapters"]
        state.write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="was written for a different adapter setup") as info:
        resume(folder, tok, data, out, **setup)
    assert all(line in str(info.value) for line in lines), str(info.value)
    assert resume.unchanged


@pytest.mark.filterwarnings("ignore:.*were truncated")
@pytest.mark.parametrize(
    "change, match",
    [
        (dict(batch_size=4), r"batch_size=2 \(now 4\), which decide the batch of every step"),
        (dict(seq_len=48, seed=3), r"seq_len=32 \(now 48\), seed=0 \(now 3\)"),
        (dict(pack="pad"), r"pack='pack' \(now 'pad'\)"),
    ],
)
def test_resume_with_other_data_settings(folder, tok, data, run, tmp_path, change, match):
    out = shutil.copytree(run, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"cannot resume .*step_0000004 exactly: the run used " + match):
        resume(folder, tok, data, out, config=change, lora=2, connector=2)


def test_resume_with_other_schedule_warns(folder, tok, data, run, tmp_path):
    out = shutil.copytree(run, tmp_path / "run")
    with pytest.warns(UserWarning, match=r"resuming .* with changed settings: steps 4 -> 6, lr 0.0002 -> 0.001"):
        trainer = resume(folder, tok, data, out, config=dict(steps=6, lr=1e-3), lora=2, connector=2)
    assert trainer.step_count == 6


def test_resume_finished_run_rewrites_only_the_adapter(folder, tok, data, run, tmp_path):
    out = shutil.copytree(run, tmp_path / "run")
    state = out / "checkpoints" / "step_0000004" / "train_state.safetensors"
    stamp = state.stat().st_mtime_ns
    shutil.rmtree(out / "adapter")  # killed after the last checkpoint, before the adapter was written
    resume(folder, tok, data, out, lora=2, connector=2)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert state.stat().st_mtime_ns == stamp  # the last checkpoint was not rewritten (no window without it)


@pytest.mark.parametrize("damage", ["state_json", "state_json_list", "weights"])
def test_resume_damaged_checkpoint(folder, tok, data, run, tmp_path, damage):
    out = shutil.copytree(run, tmp_path / "run")
    last = out / "checkpoints" / "step_0000004"
    if damage == "state_json":
        (last / "state.json").write_text('{"format": 1, "step": ')
        match = r"state.json: cannot read the checkpoint's state .*; delete .*step_0000004 to resume from an earlier"
    elif damage == "state_json_list":
        (last / "state.json").write_text("[4]")
        match = r"state.json: malformed checkpoint state"
    else:
        path = last / "train_state.safetensors"
        path.write_bytes(path.read_bytes()[:200])
        match = r"train_state.safetensors: (truncated|corrupt or truncated)"
    with pytest.raises(CheckpointError, match=match):
        resume(folder, tok, data, out, lora=2, connector=2)


# --------------------------------------------------------------------------------------------- run folders


def test_out_is_a_file(folder, tok, data, tmp_path):
    (tmp_path / "out").write_text("not a folder")
    trainer = Trainer(model_with(folder), TrainConfig(**BASE, out=str(tmp_path / "out")))
    with pytest.raises(ConfigError, match=r"output folder .*out is a file"):
        trainer.fit(data, tokenizer=tok)


def test_existing_run_needs_resume_or_overwrite(folder, tok, data, run, tmp_path):
    out = shutil.copytree(run, tmp_path / "run")
    trainer = Trainer(model_with(folder, lora=2, connector=2), TrainConfig(**BASE, out=str(out)))
    with pytest.raises(ConfigError, match=r"already holds a tx run; pass --resume to continue it or --overwrite"):
        trainer.fit(data, tokenizer=tok)
    # --overwrite replaces the run even with another adapter setup
    trainer = stub_steps(Trainer(model_with(folder, lora=4), TrainConfig(**BASE, out=str(out), overwrite=True)))
    trainer.fit(data, tokenizer=tok)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert not (out / "adapter" / "tx_connector_config.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the old checkpoints are gone entirely


def test_interrupted_marker_write_is_still_a_tx_run(folder, tok, data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".tx_run.json.tmp-12345").write_text('{"tx_r')  # killed while writing the marker
    stub_steps(Trainer(model_with(folder), TrainConfig(**BASE, out=str(out)))).fit(data, tokenizer=tok)
    assert (out / "tx_run.json").is_file()


# ------------------------------------------------------------------------------------------ bad batches, models


@pytest.fixture(scope="module")
def trainer(folder):
    return Trainer(model_with(folder), TrainConfig(**BASE, grad_accum=2))


def batch(b=2, s=8, **changes):
    ids = np.full((b, s + 1), 5, np.int32)
    out = {
        "input_ids": ids[:, :-1].copy(),
        "targets": ids[:, 1:].copy(),
        "loss_mask": np.ones((b, s), np.float32),
        "segment_ids": np.ones((b, s), np.int32),
        "positions": np.tile(np.arange(s, dtype=np.int32), (b, 1)),
    }
    for k, v in changes.items():
        if v is None:
            out.pop(k)
        else:
            out[k] = v
    return out


@pytest.mark.parametrize(
    "bad, error, match",
    [
        ([[1, 2, 3]], ConfigError, r"a batch must be a dict of \[batch, seq\] arrays with keys input_ids, targets"),
        (batch(targets=None), ConfigError, r"with keys input_ids, targets, loss_mask .*; got \['input_ids', 'loss_m"),
        (batch(input_ids=np.zeros((2, 8, 1), np.int32)), ConfigError, r"must be a non-empty \[batch, seq\] array"),
        (batch(loss_mask=np.ones((2, 7), np.float32)), ConfigError, r"batch\['loss_mask'\] has shape \(2, 7\) but"),
        (batch(input_ids=np.full((2, 8), 1.5)), ConfigError, r"batch\['input_ids'\] must hold integer token ids"),
        (batch(targets=np.full((2, 8), 400, np.int32)), DataError, r"token id 400, outside the model's vocabulary"),
        (batch(input_ids=np.full((2, 8), -1, np.int32)), DataError, r"token id -1, outside the model's vocabulary"),
        (batch(b=3), ConfigError, r"batch of 3 rows cannot be split into grad_accum=2 micro-batches"),
    ],
)
def test_bad_batches(trainer, bad, error, match):
    with pytest.raises(error, match=match):
        trainer.step(bad)
    assert trainer.step_count == 0


def test_padding_ids_are_not_checked(trainer):
    """Padding (segment 0) may hold any id: it is masked out, and a tokenizer's pad id may lie past the vocab."""
    from tx.train.trainer import _check_batch

    b = batch()
    b["segment_ids"][:, -2:] = 0
    b["input_ids"][:, -2:] = 1000
    _check_batch(b, 400)


def test_nothing_to_train(folder):
    with pytest.raises(ConfigError, match=r"the model has nothing to train: attach LoRA"):
        Trainer(tx.load_model(folder), TrainConfig(**BASE))
    frozen = tx.attach(tx.load_model(folder), connector=tx.ConnectorConfig(expansion_rate=2, trainable=False))
    with pytest.raises(ConfigError, match=r"nothing to train"):
        Trainer(frozen, TrainConfig(**BASE))
