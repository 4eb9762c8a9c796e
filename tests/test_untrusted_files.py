"""Checkpoint, tokenizer and adapter folders are untrusted: tx reads only JSON, safetensors and tokenizer files from
them, never unpickles or imports anything, and never follows a file name read from a file out of the folder.

Traps: pickles (``pytorch_model.bin``, ``adapter_model.bin``, ``training_args.bin``, ``optimizer.pt``) that create a
marker file when unpickled, and ``modeling_*.py`` / ``tokenization_*.py`` files (named by ``auto_map`` entries, as
for ``trust_remote_code``) that create it when imported. An audit hook also records every file the process opens
and every module it imports while tx loads the folder.
"""

import contextlib
import json
import os
import pickle
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures_run import chat_records, model_folder

import tx
from tx.errors import CheckpointError, DataError

READABLE = (".json", ".safetensors", ".jinja")  # what tx may open in a model or adapter folder


class _Trap:
    """Unpickling this calls ``open(marker, "w")``: the marker file exists iff a pickle was loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_untrusted(folder: Path, marker: Path) -> Path:
    """Put pickles and remote code that would create ``marker`` into ``folder``; returns ``marker``."""
    folder, marker = Path(folder), Path(marker)
    payload = pickle.dumps(_Trap(marker))
    for name in ("pytorch_model.bin", "adapter_model.bin", "training_args.bin", "optimizer.pt", "rng_state.pth"):
        (folder / name).write_bytes(payload)
    code = f"open({str(marker)!r}, 'w').write('imported')\n"
    (folder / "modeling_evil.py").write_text(code)
    (folder / "tokenization_evil.py").write_text(code)
    (folder / "__init__.py").write_text(code)
    config = folder / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        data["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
        config.write_text(json.dumps(data))
    tok_config = folder / "tokenizer_config.json"
    if tok_config.is_file():
        data = json.loads(tok_config.read_text())
        data["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
        tok_config.write_text(json.dumps(data))
    return marker


class _Audit:
    """Records paths opened and modules imported while active (an audit hook cannot be removed, only paused)."""

    active = False
    opened: list[str] = []
    imported: list[str] = []

    @classmethod
    def hook(cls, event, args):
        if not cls.active:
            return
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            cls.opened.append(os.fsdecode(args[0]))
        elif event == "import":
            cls.imported.append(str(args[0]))


sys.addaudithook(_Audit.hook)


@contextlib.contextmanager
def audited():
    """Record what the process opens and imports inside the block."""
    _Audit.opened, _Audit.imported, _Audit.active = [], [], True
    try:
        yield _Audit
    finally:
        _Audit.active = False


def test_the_traps_work(tmp_path):
    marker = tmp_path / "marker"
    plant_untrusted(tmp_path, marker)
    assert not marker.exists()
    pickle.loads((tmp_path / "pytorch_model.bin").read_bytes())
    assert marker.exists()


@pytest.fixture(scope="module")
def trapped(tmp_path_factory):
    """A copy of the tiny model folder with every trap planted, plus a saved adapter folder, also trapped."""
    root = tmp_path_factory.mktemp("trapped")
    folder = shutil.copytree(model_folder(tmp_path_factory), root / "model")
    marker = plant_untrusted(folder, root / "EXECUTED")
    model = tx.load_model(folder)
    tx.attach(model, lora=tx.LoRAConfig(rank=2, alpha=4), connector=tx.ConnectorConfig(expansion_rate=2))
    adapter = tx.save_adapter(model, root / "adapter")
    plant_untrusted(adapter, marker)
    marker.unlink(missing_ok=True)
    return folder, adapter, marker


def only_safe_files_read(audit, *folders):
    for path in audit.opened:
        for folder in folders:
            if Path(path).resolve().is_relative_to(Path(folder).resolve()):
                assert path.endswith(READABLE), f"tx opened {path}"
    assert not [m for m in audit.imported if "evil" in m or m == "__init__"], audit.imported


def test_load_model_tokenizer_adapter_never_run_code(trapped):
    folder, adapter, marker = trapped
    with audited() as audit:
        model = tx.load_model(folder)
        tok = tx.load_tokenizer(folder)
        tx.load_adapter(model, adapter)
        prompt = tok.apply_chat_template(chat_records(1)[0]["messages"][:1], add_generation_prompt=True)
    assert "<|im_start|>assistant" in prompt
    only_safe_files_read(audit, folder, adapter)
    assert any(p.endswith("model.safetensors") for p in audit.opened)  # the hook does see tx's reads
    assert not marker.exists()


def test_pickle_only_folders_are_refused_unread(trapped, tmp_path):
    folder, adapter, marker = trapped
    pickled = shutil.copytree(folder, tmp_path / "model")
    (pickled / "model.safetensors").unlink()
    pickled_adapter = shutil.copytree(adapter, tmp_path / "adapter")
    (pickled_adapter / "adapter_model.safetensors").unlink()
    model = tx.load_model(folder)
    with audited() as audit:
        with pytest.raises(CheckpointError, match="holds only PyTorch pickle weights .* never pickles"):
            tx.load_model(pickled)
        with pytest.raises(tx.errors.AdapterError, match="holds only adapter_model.bin .a PyTorch pickle.; tx reads"):
            tx.load_adapter(model, pickled_adapter)
    only_safe_files_read(audit, pickled, pickled_adapter)
    assert not marker.exists()


def test_export_copies_no_pickle_or_code(trapped, tmp_path):
    folder, _, marker = trapped
    model = tx.load_model(folder)
    tx.attach(model, lora=tx.LoRAConfig(rank=2, alpha=4))
    out = tx.save_model(model, tmp_path / "merged")
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".py"))], names
    assert not marker.exists()


# ----------------------------------------------------------------------------- file names read from files


@pytest.fixture()
def sharded(tmp_path_factory, tmp_path):
    """The tiny checkpoint split into two shards with an index."""
    from safetensors.numpy import load_file, save_file

    src = model_folder(tmp_path_factory)
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(src / "config.json", folder / "config.json")
    tensors = load_file(src / "model.safetensors")
    keys = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize(
    "name",
    ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors", "..\\outside.safetensors", "..", ""],
)
def test_shard_names_cannot_leave_the_folder(sharded, name):
    index = sharded / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = sorted(data["weight_map"])[0]
    data["weight_map"][first] = name
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=re.escape(f"shard name {name!r} points outside the checkpoint folder")):
        tx.load_model(sharded)


@pytest.mark.parametrize("weight_map", [["a"], {"model.norm.weight": 3}, "model.safetensors"])
def test_malformed_shard_index(sharded, weight_map):
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="malformed index"):
        tx.load_model(sharded)


def test_hub_cache_symlinked_shards_load(sharded, tmp_path):
    """The hub cache keeps each file as a symlink into ../../blobs; that is the folder's own layout, not a name
    read from a file, so it loads (and gives the same weights)."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    snapshot = tmp_path / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(sharded.iterdir())):
        blob = blobs / f"sha{i}"
        shutil.copy(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    a, b = tx.load_model(sharded), tx.load_model(snapshot)
    np.testing.assert_array_equal(np.asarray(a.embed.embedding[...]), np.asarray(b.embed.embedding[...]))


@pytest.mark.parametrize("statement", ["include", "import", "extends", "from"])
def test_chat_template_cannot_read_files(tmp_path_factory, tmp_path, statement):
    """A chat template (code from the folder, run sandboxed) may not pull in another file by name."""
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    folder = shutil.copytree(model_folder(tmp_path_factory), tmp_path / "model")
    source = {
        "include": f"{{% include {str(secret)!r} %}}",
        "import": f"{{% import {str(secret)!r} as s %}}x",
        "extends": f"{{% extends {str(secret)!r} %}}",
        "from": f"{{% from {str(secret)!r} import m %}}x",
    }[statement]
    (folder / "chat_template.jinja").write_text(source)
    tok = tx.load_tokenizer(folder)
    with pytest.raises(DataError, match="a chat template cannot include, import or extend other files") as info:
        tok.apply_chat_template(chat_records(1)[0]["messages"])
    assert "TOP SECRET" not in str(info.value)


def test_chat_template_sandbox(tmp_path_factory, tmp_path):
    folder = shutil.copytree(model_folder(tmp_path_factory), tmp_path / "model")
    (folder / "chat_template.jinja").write_text("{{ cycler.__init__.__globals__.os.system('touch x') }}")
    tok = tx.load_tokenizer(folder)
    with pytest.raises(DataError, match="unsafe"):
        tok.apply_chat_template(chat_records(1)[0]["messages"])


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json", "tokenizer.json"])
def test_binary_junk_in_json_files(tmp_path_factory, tmp_path, name):
    folder = shutil.copytree(model_folder(tmp_path_factory), tmp_path / "model")
    (folder / name).write_bytes(b"\x80\x04\x95junk\xff")  # a pickle header where JSON should be
    with pytest.raises(CheckpointError, match=re.escape(name) + r" is not (valid JSON|a valid tokenizer.json)"):
        tx.load_model(folder) if name == "config.json" else tx.load_tokenizer(folder)
