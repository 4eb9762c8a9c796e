"""Bad checkpoints fail with a CheckpointError that names the problem."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import tx
from tx.errors import CheckpointError


@pytest.fixture()
def ckpt(checkpoints, tmp_path):
    folder, _ = checkpoints["qwen2"]
    dst = tmp_path / "ckpt"
    shutil.copytree(folder, dst)
    return dst


def rewrite(folder, fn):
    tensors = load_file(folder / "model.safetensors")
    fn(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no config.json"):
        tx.load_model(tmp_path)


def test_unsupported_architecture(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unsupported architecture.*GPT2LMHeadModel.*LlamaForCausalLM"):
        tx.load_model(ckpt)


def test_malformed_config_json(ckpt):
    (ckpt / "config.json").write_text('{"hidden_size": 40,\n "vocab_size": }')
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON.*line 2"):
        tx.load_model(ckpt)


def test_config_wrong_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["hidden_size"] = "40"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"'hidden_size' must be int, found '40'"):
        tx.load_model(ckpt)


def test_missing_tensor_is_named(ckpt):
    rewrite(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'.*\(72, 40\)"):
        tx.load_model(ckpt)


def test_wrong_shape_names_both_shapes(ckpt):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:10]

    rewrite(ckpt, shrink)
    with pytest.raises(
        CheckpointError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \(10, 40\).*\(20, 40\)"
    ):
        tx.load_model(ckpt)


def test_unexpected_tensors_listed(ckpt):
    def add(t):
        t["model.layers.0.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
        t["vision_tower.weight"] = np.zeros((2,), np.float32)

    rewrite(ckpt, add)
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*'model.layers.0.mlp.extra.weight'.*'vision_tower"):
        tx.load_model(ckpt)


def test_truncated_file(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError, match=r"model.safetensors: truncated: tensor '.*' ends at byte \d+ but the file"
    ):
        tx.load_model(ckpt)


def test_corrupt_header(ckpt):
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[8:20] = b"\xff" * 12
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        tx.load_model(ckpt)


def test_nan_weight_is_reported(ckpt):
    def poison(t):
        t["model.norm.weight"][3] = np.nan

    rewrite(ckpt, poison)
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' holds NaN or Inf"):
        tx.load_model(ckpt)


def test_pickle_only_folder_is_refused(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="never pickles"):
        tx.load_model(ckpt)


def test_shard_index_cannot_escape_folder(ckpt, tmp_path):
    (ckpt / "model.safetensors").rename(tmp_path / "outside.safetensors")
    index = {"weight_map": {"model.norm.weight": "../outside.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        tx.load_model(ckpt)


def test_unreachable_hub_id():
    # HF_HUB_OFFLINE=1 in tests: the hub cannot be reached, and the message says so in one sentence
    with pytest.raises(CheckpointError, match=r"'nobody/no-such-model' is not a local folder and could not be fetched"):
        tx.load_model("nobody/no-such-model")


def test_missing_local_path():
    with pytest.raises(CheckpointError, match="no such folder"):
        tx.load_model("./does/not/exist")


def test_bad_dtype(ckpt):
    with pytest.raises(CheckpointError, match="dtype 'float8' is not supported"):
        tx.load_model(ckpt, dtype="float8")
