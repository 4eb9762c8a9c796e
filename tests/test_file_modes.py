"""Files and folders tx writes get the modes a plain open()/mkdir() would give (0o666 / 0o777 less the umask).

Atomic writes go through a temporary file, and ``safetensors`` creates its files 0o600; left as they are, saved
models, adapters and checkpoints would be readable only by their owner (not by a vLLM server or a colleague).
"""

import os
import stat

import pytest
from fixtures_models import make_checkpoint
from fixtures_tokenizer import make_chatml_tokenizer

import tx
from tx import safetensors_io
from tx.train.data import Dataset
from tx.train.trainer import TrainConfig, Trainer


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def modes(folder):
    """relative path -> permission bits, for ``folder`` and everything below it."""
    found = {".": stat.S_IMODE(folder.stat().st_mode)}
    for path in folder.rglob("*"):
        found[str(path.relative_to(folder))] = stat.S_IMODE(path.stat().st_mode)
    return found


def assert_modes(folder, must_hold):
    found = modes(folder)
    assert set(must_hold) <= set(found), sorted(found)
    wrong = {name: oct(mode) for name, mode in found.items() if mode != (0o755 if (folder / name).is_dir() else 0o644)}
    assert not wrong, f"expected files 0o644 and folders 0o755 under {folder}, found {wrong}"


def test_current_umask(umask_022, monkeypatch):
    assert safetensors_io.current_umask() == 0o022

    def no_proc(*args, **kwargs):
        raise OSError("no /proc")

    monkeypatch.setattr(safetensors_io, "open", no_proc, raising=False)  # the fallback: set and restore
    assert safetensors_io.current_umask() == 0o022
    assert os.umask(0o022) == 0o022  # left as it was


def test_saved_files_are_readable_by_others(umask_022, tmp_path):
    source = tmp_path / "source"
    make_chatml_tokenizer(source)  # tokenizer files, which save_model copies along
    tok = tx.load_tokenizer(source)
    make_checkpoint("qwen3", source, vocab_size=tok.vocab_size)

    model = tx.load_model(source)
    tx.attach(model, lora=tx.LoRAConfig(rank=2, alpha=4))
    assert_modes(tx.save_adapter(model, tmp_path / "adapter"), ["adapter_config.json", "adapter_model.safetensors"])
    assert_modes(tx.save_model(model, tmp_path / "model"), ["config.json", "model.safetensors", "tokenizer.json"])

    records = [{"text": f"the {w} sat on the mat"} for w in ("cat", "dog", "sun", "moon")] * 4
    data = Dataset(records, tok, seq_len=16, batch_size=2, seed=0, vocab_size=tok.vocab_size)
    config = TrainConfig(steps=2, batch_size=2, seq_len=16, save_every=1, progress=False, out=str(tmp_path / "run"))
    Trainer(model, config).fit(data)
    assert_modes(
        tmp_path / "run",
        [
            "metrics.jsonl",
            "checkpoints",
            "checkpoints/step_0000002",
            "checkpoints/step_0000002/train_state.safetensors",
            "checkpoints/step_0000002/state.json",
            "checkpoints/step_0000002/COMPLETE",
            "adapter/adapter_model.safetensors",
        ],
    )
