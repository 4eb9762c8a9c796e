"""Bad adapter folders: each fails with an AdapterError (or CheckpointError for a broken file) naming the problem,
and a failed load leaves the model without adapters."""

import json
import shutil

import numpy as np
import pytest
from fixtures_models import make_checkpoint
from safetensors.numpy import load_file, save_file

import tx
from tx.adapters.attach import has_connector, has_lora
from tx.errors import AdapterError, CheckpointError, TxError


@pytest.fixture(scope="module")
def saved(checkpoints, tmp_path_factory):
    """An adapter folder (LoRA r=4 on all linears + an mHC connector n=2) saved from the qwen3 checkpoint."""
    model = tx.load_model(checkpoints["qwen3"][0])
    tx.attach(model, lora=tx.LoRAConfig(rank=4, alpha=8), connector=tx.ConnectorConfig(expansion_rate=2))
    return tx.save_adapter(model, tmp_path_factory.mktemp("adapter") / "a")


@pytest.fixture()
def adapter(saved, tmp_path):
    """A copy of the saved adapter that a test may break."""
    return shutil.copytree(saved, tmp_path / "adapter")


@pytest.fixture(scope="module")
def deeper(tmp_path_factory):
    """A qwen3 base with 3 layers and hidden size 48 (the fixture's has 2 and 40)."""
    folder, _ = make_checkpoint("qwen3", tmp_path_factory.mktemp("deeper"), num_hidden_layers=3, hidden_size=48)
    return folder


_MODELS = {}


def refused(folder, model_folder, error=AdapterError, match=None):
    """Load ``folder`` into a model of ``model_folder``: it must fail and leave the model unadapted.

    The models are shared between tests, which also checks that every failed load really left them unadapted.
    """
    if model_folder not in _MODELS:
        _MODELS[model_folder] = tx.load_model(model_folder)
    model = _MODELS[model_folder]
    with pytest.raises(error, match=match) as info:
        tx.load_adapter(model, folder)
    assert not has_lora(model) and not has_connector(model)
    assert getattr(model, "lora_config", None) is None and getattr(model, "connector_config", None) is None
    return str(info.value)


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is ...:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


# --------------------------------------------------------------------------------------------- different base


def test_lora_from_a_base_with_other_shapes(saved, checkpoints):
    # qwen3's q_proj is [64, 40] (head_dim 16); qwen2's is [40, 40]
    message = refused(saved, checkpoints["qwen2"][0], match="does not fit this model")
    assert "different base model" in message
    assert "model.layers.0.self_attn.q_proj.lora_B.weight' has shape (64, 4) but this model expects (40, 4)" in message


def test_adapter_from_a_deeper_wider_base(deeper, checkpoints, tmp_path):
    model = tx.load_model(deeper)
    tx.attach(
        model, lora=tx.LoRAConfig(rank=2, alpha=4, targets=["q_proj"]), connector=tx.ConnectorConfig(expansion_rate=2)
    )
    folder = tx.save_adapter(model, tmp_path / "deep")
    message = refused(folder, checkpoints["qwen3"][0], match="does not fit this model")
    assert "unexpected tensor 'base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight'" in message
    assert "has shape (2, 48) but this model expects (2, 40)" in message
    # the connector alone (hidden 48 vs 40) is refused too, naming its file
    (folder / "adapter_config.json").unlink()
    (folder / "adapter_model.safetensors").unlink()
    message = refused(folder, checkpoints["qwen3"][0], match="tx_connector.safetensors")
    assert "has shape (3, " in message and "but this model expects (2, " in message


def test_connector_adapter_into_a_model_with_other_layer_count(saved, deeper):
    message = refused(saved, deeper, match="does not fit this model")
    assert "missing tensor" in message and "layers.2" in message


# ------------------------------------------------------------------------------------- sidecar format version


@pytest.mark.parametrize(
    "version, match",
    [
        (2, r"written by a newer tx \(tx 0.1.0, format version 2\); this tx \(0.1.0\) reads format versions up to 1"),
        (99, r"format version 99.*Upgrade tx"),
        ("1", r"format_version must be an integer >= 1, found '1'"),
        (1.0, r"format_version must be an integer >= 1, found 1.0"),
        (True, r"format_version must be an integer >= 1, found True"),
        (0, r"format_version must be an integer >= 1, found 0"),
        (-3, r"format_version must be an integer >= 1, found -3"),
        (..., r"format_version must be an integer >= 1, found None"),
    ],
)
def test_sidecar_format_version(adapter, checkpoints, version, match):
    edit_json(adapter / "tx_connector_config.json", format_version=version)
    message = refused(adapter, checkpoints["qwen3"][0], match=match)
    assert "tx_connector_config.json" in message


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(expansion_rate="4"), r"expansion_rate must be an integer >= 1.*got '4'"),
        (dict(expansion_rate=2.5), r"expansion_rate must be an integer >= 1.*got 2.5"),
        (dict(kind="hyper"), r"kind must be one of 'static', 'dynamic', 'mhc', 'mhc_lite', got 'hyper'"),
        (dict(trainable="no"), r"trainable must be True or False, got 'no'"),
        (dict(sinkhorn_iterations=5), r"unknown connector fields \['sinkhorn_iterations'\]"),
    ],
)
def test_sidecar_bad_values(adapter, checkpoints, change, match):
    edit_json(adapter / "tx_connector_config.json", **change)
    message = refused(adapter, checkpoints["qwen3"][0], match=match)
    assert "tx_connector_config.json" in message


# ----------------------------------------------------------------------------------- malformed adapter_config


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"r": 4, "lora_alpha": }', r"adapter_config.json is not valid JSON: Expecting value at line 1, column 24"),
        ("", r"adapter_config.json is not valid JSON: Expecting value at line 1"),
        ('["r", 4]', r"adapter_config.json must hold a JSON object, found list"),
        ("null", r"adapter_config.json must hold a JSON object, found NoneType"),
        (b'{"r": "\xff\xfe"}', r"adapter_config.json is not valid JSON: not UTF-8 text"),
    ],
)
def test_adapter_config_not_json(adapter, checkpoints, text, match):
    path = adapter / "adapter_config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    refused(adapter, checkpoints["qwen3"][0], match=match)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(r="8"), r"rank must be an integer >= 1, got '8'"),
        (dict(r=0), r"rank must be an integer >= 1, got 0"),
        (dict(r=2.5), r"rank must be an integer >= 1, got 2.5"),
        (dict(lora_alpha="x"), r"alpha must be a number > 0, got 'x'"),
        (dict(target_modules=...), r"target_modules is missing"),
        (dict(target_modules=5), r"target_modules must be a list of module names or a regex string, got 5"),
        (dict(target_modules=["q_proj", 1]), r"target_modules must be a list .* got \['q_proj', 1\]"),
        (dict(target_modules=["c_attn"]), r"'c_attn' matches no module.*q_proj"),
        (dict(target_modules="(("), r"not a valid regular expression"),
        (dict(layers_to_transform=[7]), r"LoRA layers \[7\] do not exist: the model has 2 layers"),
        (dict(layers_to_transform="0"), r"layers must be None or a non-empty list"),
        (dict(lora_dropout=2), r"dropout must be in \[0, 1\), got 2"),
        (dict(use_rslora="false"), r"use_rslora must be true or false, got 'false'"),
        (dict(peft_type="IA3"), r"peft_type 'IA3' is not supported"),
        (dict(use_dora=True), r"use_dora=True not supported by tx"),
        (dict(modules_to_save=["lm_head"]), r"modules_to_save=\['lm_head'\] not supported"),
        (dict(layers_pattern="blocks"), r"layers_pattern 'blocks' is not supported"),
    ],
)
def test_adapter_config_bad_values(adapter, checkpoints, change, match):
    edit_json(adapter / "adapter_config.json", **change)
    message = refused(adapter, checkpoints["qwen3"][0], match=match)
    assert "adapter_config.json" in message or "does not fit this model" in message


# ----------------------------------------------------------------------------------- weights: pickles, damage


def test_pickle_only_adapter_is_refused(adapter, checkpoints):
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    message = refused(adapter, checkpoints["qwen3"][0], match="adapter_model.bin")
    assert "pickle" in message and "never pickles" in message and "safe_serialization=True" in message


def test_truncated_adapter_weights(adapter, checkpoints):
    path = adapter / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    refused(adapter, checkpoints["qwen3"][0], CheckpointError, match=r"adapter_model.safetensors: truncated")


def test_empty_adapter_weights(adapter, checkpoints):
    (adapter / "tx_connector.safetensors").write_bytes(b"")
    refused(adapter, checkpoints["qwen3"][0], CheckpointError, match=r"tx_connector.safetensors: not a safetensors")


@pytest.mark.parametrize("file", ["adapter_model.safetensors", "tx_connector.safetensors"])
def test_non_finite_adapter_weights(adapter, checkpoints, file):
    tensors = load_file(adapter / file)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].copy()
    tensors[key].flat[0] = np.nan
    save_file(tensors, adapter / file)
    message = refused(adapter, checkpoints["qwen3"][0], match="holds NaN or Inf")
    assert repr(key) in message


def test_wrong_dtype_in_adapter_weights_is_cast_or_refused(adapter, checkpoints):
    # an int tensor where a float is expected: loaded as float (values are cast), never a crash
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key] = np.zeros(tensors[key].shape, np.int32)
    save_file(tensors, adapter / "adapter_model.safetensors")
    model = tx.load_model(checkpoints["qwen3"][0])
    tx.load_adapter(model, adapter)
    assert has_lora(model)


def test_adapter_path_is_a_file_or_missing(adapter, checkpoints, tmp_path):
    model = tx.load_model(checkpoints["qwen3"][0])
    with pytest.raises(AdapterError, match="is not an adapter folder"):
        tx.load_adapter(model, adapter / "adapter_config.json")
    with pytest.raises(AdapterError, match="is not an adapter folder"):
        tx.load_adapter(model, tmp_path / "nope")
    with pytest.raises(TxError, match="has neither adapter_config.json"):
        tx.load_adapter(model, tmp_path)
