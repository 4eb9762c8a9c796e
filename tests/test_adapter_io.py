"""Adapter files: tx <-> PEFT round trips (logits within 1e-4, fp32), the connector sidecar, and bad adapter folders."""

import copy
import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from test_lora import hf_logits, logits, randomize_b, token_batch, train

import tx
from tx.adapters.attach import attach, has_connector, has_lora, lora_modules
from tx.adapters.connector import ConnectorParam
from tx.errors import AdapterError

TOL = 1e-4  # tx vs transformers + PEFT, fp32


def peft_model(ref, folder=None, config=None):
    """PEFT around a copy of the session's transformers model (PEFT changes the model it wraps)."""
    import peft

    base = copy.deepcopy(ref)
    if folder is not None:
        return peft.PeftModel.from_pretrained(base, folder).eval()
    return peft.get_peft_model(base, config).eval()


def lora_files(folder):
    return load_file(folder / "adapter_model.safetensors"), json.loads((folder / "adapter_config.json").read_text())


def rewrite(folder, tensors=None, config=None):
    if tensors is not None:
        save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    if config is not None:
        (folder / "adapter_config.json").write_text(json.dumps(config))


# --------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "family,config",
    [
        ("llama", tx.LoRAConfig(rank=4, alpha=8)),
        (
            "qwen3",
            tx.LoRAConfig(rank=4, alpha=6, use_rslora=True, layers=[1], targets=["q_proj", "v_proj", "down_proj"]),
        ),
    ],
    ids=["llama-all-linear", "qwen3-rslora-layer1"],
)
def test_tx_adapter_loads_in_peft(checkpoints, tmp_path, family, config):
    folder, ref = checkpoints[family]
    model = attach(tx.load_model(folder), lora=config)
    ids = token_batch(model.config.vocab_size)
    losses, _ = train(model, ids, steps=3)
    assert losses[-1] < losses[0]
    got = logits(model, ids)
    base = hf_logits(ref, ids)
    assert np.abs(got - base).max() > 1e-2  # training moved the model: the comparison below is not base vs base

    out = tx.save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    tensors, cfg = lora_files(out)
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    assert cfg["lora_alpha"] == config.alpha and cfg["use_rslora"] is config.use_rslora and cfg["bias"] == "none"
    assert cfg["base_model_name_or_path"] == str(folder)
    if config.layers:
        assert cfg["layers_to_transform"] == [1] and cfg["target_modules"] == ["q_proj", "v_proj", "down_proj"]
        assert sorted(tensors) == sorted(
            f"base_model.model.model.layers.1.{m}.lora_{ab}.weight"
            for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
            for ab in "AB"
        )  # only the adapted layer is saved
    else:
        assert "layers_to_transform" not in cfg and len(cfg["target_modules"]) == 7 and len(tensors) == 2 * 7 * 2
    key = "base_model.model.model.layers.1.self_attn.q_proj"
    q = lora_modules(model)[0][1]  # q_proj comes first
    assert tensors[f"{key}.lora_A.weight"].shape == (4, 40) and tensors[f"{key}.lora_B.weight"].dtype == np.float32
    np.testing.assert_array_equal(tensors[f"{key}.lora_B.weight"], np.asarray(q.lora_b[...])[1])

    want = hf_logits(peft_model(ref, out), ids)
    diff = np.abs(got - want).max()
    assert diff <= TOL, diff
    # and back into tx: identical weights, identical logits
    again = tx.load_adapter(tx.load_model(folder), out)
    np.testing.assert_array_equal(logits(again, ids), got)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_peft_adapter_loads_in_tx(checkpoints, tmp_path, family):
    import peft

    folder, ref = checkpoints[family]
    if family == "llama":  # a regex target and rsLoRA
        config = peft.LoraConfig(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=r"model\.layers\.\d+\.(self_attn\.(q|k)_proj|mlp\.up_proj)",
        )
    else:  # a list, a layer subset, and an exclude entry that names a module tx never adapts
        config = peft.LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["o_proj", "gate_proj", "up_proj"],
            exclude_modules=["up_proj", "lm_head"],
            layers_to_transform=[0],
        )
    hf = peft_model(ref, config=config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    hf.save_pretrained(tmp_path / "peft")
    ids = token_batch(ref.config.vocab_size)
    want = hf_logits(hf, ids)
    assert np.abs(want - hf_logits(ref, ids)).max() > 1e-2

    model = tx.load_adapter(tx.load_model(folder), tmp_path / "peft")
    names = {s.name: m.layer_mask.tolist() for s, m in lora_modules(model)}
    if family == "llama":
        assert names == {"q_proj": [1.0, 1.0], "k_proj": [1.0, 1.0], "up_proj": [1.0, 1.0]}
        assert model.lora_config.use_rslora and model.lora_config.scale == 8 / 2
    else:
        assert names == {"o_proj": [1.0, 0.0], "gate_proj": [1.0, 0.0]}
    diff = np.abs(logits(model, ids) - want).max()
    assert diff <= TOL, diff


def test_uneven_targets_saved_as_exact_regex(checkpoints, tmp_path):
    """Modules adapted on different layers cannot be a name list + layers_to_transform: PEFT gets a regex of paths."""
    folder, ref = checkpoints["llama"]
    targets = r"model\.layers\.0\.self_attn\.q_proj|model\.layers\.1\.mlp\.down_proj"
    model = attach(tx.load_model(folder), lora=tx.LoRAConfig(rank=4, alpha=8, targets=targets))
    randomize_b(model)
    out = tx.save_adapter(model, tmp_path / "a")
    tensors, cfg = lora_files(out)
    assert isinstance(cfg["target_modules"], str) and "layers_to_transform" not in cfg
    assert sorted(tensors) == sorted(
        f"base_model.model.model.layers.{key}.lora_{ab}.weight"
        for key in ("0.self_attn.q_proj", "1.mlp.down_proj")
        for ab in "AB"
    )
    ids = token_batch(model.config.vocab_size)
    got = logits(model, ids)
    assert np.abs(got - hf_logits(ref, ids)).max() > 1e-2
    diff = np.abs(got - hf_logits(peft_model(ref, out), ids)).max()
    assert diff <= TOL, diff


def test_peft_keys_with_adapter_name(checkpoints, tmp_path):
    """Some PEFT writers keep the adapter name: ``...lora_A.default.weight``."""
    folder, _ = checkpoints["llama"]
    model = attach(tx.load_model(folder), lora=tx.LoRAConfig(rank=4, alpha=8))
    randomize_b(model)
    out = tx.save_adapter(model, tmp_path / "a")
    tensors, _ = lora_files(out)
    rewrite(out, {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()})
    assert all(".default.weight" in k for k in load_file(out / "adapter_model.safetensors"))
    ids = token_batch(model.config.vocab_size)
    np.testing.assert_array_equal(logits(tx.load_adapter(tx.load_model(folder), out), ids), logits(model, ids))


def test_connector_sidecar_round_trip(checkpoints, tmp_path):
    folder, ref = checkpoints["llama"]
    conn = tx.ConnectorConfig(expansion_rate=2, kind="mhc", sinkhorn_iters=3)  # few iterations: a quick compile
    model = attach(tx.load_model(folder), lora=tx.LoRAConfig(rank=4, alpha=8), connector=conn)
    randomize_b(model)
    key = jax.random.key(3)
    for k, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model, ConnectorParam))):
        var.set_value(var[...] + 0.1 * jax.random.normal(jax.random.fold_in(key, k), var.shape))
    ids = token_batch(model.config.vocab_size)
    got = logits(model, ids)

    out = tx.save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tx_connector.safetensors",
        "tx_connector_config.json",
    ]
    side = json.loads((out / "tx_connector_config.json").read_text())
    assert side["format_version"] == 1 and side["tx_version"] == tx.__version__
    assert side["expansion_rate"] == 2 and side["kind"] == "mhc" and side["trainable"] is True
    weights = load_file(out / "tx_connector.safetensors")
    assert weights["layers.attn_residual.proj"].shape == (2, 2 * 40, 8) and "layers.mlp_residual.res_gate" in weights

    loaded = tx.load_adapter(tx.load_model(folder), out)
    assert has_connector(loaded) and loaded.connector_config == conn and loaded.streams.n == 2
    np.testing.assert_array_equal(logits(loaded, ids), got)
    with tx.adapters_disabled(loaded):  # LoRA, both connectors and the stream edges off: the base model
        np.testing.assert_array_equal(logits(loaded, ids), logits(tx.load_model(folder), ids))
    assert np.abs(got - logits(tx.load_model(folder), ids)).max() > 1e-2

    # PEFT reads the LoRA part of the same folder and ignores the sidecar
    hf = peft_model(ref, out)
    b = hf.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.detach().numpy()
    np.testing.assert_array_equal(b, np.asarray(lora_modules(model)[0][1].lora_b[...])[0])

    # a LoRA-only save into the same folder removes the stale sidecar
    tx.save_adapter(attach(tx.load_model(folder), lora=tx.LoRAConfig(rank=4, alpha=8)), out)
    assert not (out / "tx_connector.safetensors").exists() and not (out / "tx_connector_config.json").exists()
    assert not has_connector(tx.load_adapter(tx.load_model(folder), out))


# ---------------------------------------------------------------------------------------------- bad folders


@pytest.fixture
def saved(checkpoints, tmp_path):
    """A tx LoRA adapter (rank 4) of the llama checkpoint."""
    folder, _ = checkpoints["llama"]
    return tx.save_adapter(attach(tx.load_model(folder), lora=tx.LoRAConfig(rank=4, alpha=8)), tmp_path / "saved")


def test_adapter_for_another_base(checkpoints, saved):
    model = tx.load_model(checkpoints["qwen3"][0])  # q_proj has 64 outputs (4 heads x 16), llama's 40
    with pytest.raises(AdapterError) as err:
        tx.load_adapter(model, saved)
    msg = str(err.value)
    assert "different base model" in msg and str(saved) in msg
    assert "'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight' has shape (40, 4)" in msg
    assert "this model expects (64, 4)" in msg
    assert not has_lora(model) and model.lora_config is None  # nothing left half-attached


def test_missing_or_pickled_weights(checkpoints, saved, tmp_path):
    model = tx.load_model(checkpoints["llama"][0])
    (saved / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match=f"adapter folder {saved} is missing adapter_model.safetensors"):
        tx.load_adapter(model, saved)
    (saved / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(AdapterError, match="adapter_model.bin .a PyTorch pickle.; tx reads safetensors only"):
        tx.load_adapter(model, saved)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="has neither adapter_config.json .* nor tx_connector_config.json"):
        tx.load_adapter(model, tmp_path / "empty")
    with pytest.raises(AdapterError, match="is not an adapter folder"):
        tx.load_adapter(model, tmp_path / "nowhere")
    assert not has_lora(model)


@pytest.mark.parametrize(
    "change,message",
    [
        # rank_pattern is read (PEFT's per-module ranks): tensors of another rank are named with both shapes
        (
            dict(rank_pattern={"q_proj": 8}),
            r"q_proj.lora_A.weight' has shape \(4, 40\) but this model expects \(8, 40\)",
        ),
        (dict(alpha_pattern={"v_proj": "big"}), "alpha_pattern must map regex strings to positive numbers"),
        (dict(use_dora=True), "use_dora=True not supported"),
        (dict(r=0), "LoRA rank must be an integer >= 1, got 0"),
        (dict(lora_alpha=-2), "LoRA alpha must be a number > 0, got -2"),
        (dict(target_modules=["q_proj", "c_attn"]), "'c_attn' matches no module.*q_proj, k_proj, v_proj"),
        (dict(peft_type="IA3"), "peft_type 'IA3' is not supported"),
    ],
)
def test_unsupported_peft_config(checkpoints, saved, change, message):
    _, cfg = lora_files(saved)
    rewrite(saved, config={**cfg, **change})
    model = tx.load_model(checkpoints["llama"][0])
    with pytest.raises(AdapterError, match=message):
        tx.load_adapter(model, saved)
    assert not has_lora(model)


def test_missing_and_unexpected_tensors(checkpoints, saved):
    tensors, _ = lora_files(saved)
    gone = "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"
    del tensors[gone]
    tensors["base_model.model.lm_head.lora_A.weight"] = np.zeros((4, 40), np.float32)
    rewrite(saved, tensors)
    model = tx.load_model(checkpoints["llama"][0])
    with pytest.raises(AdapterError) as err:
        tx.load_adapter(model, saved)
    assert f"missing tensor '{gone}'" in str(err.value)
    assert "unexpected tensor 'base_model.model.lm_head.lora_A.weight'" in str(err.value)
    assert not has_lora(model)


def test_newer_sidecar_format(checkpoints, tmp_path):
    folder, _ = checkpoints["llama"]
    model = attach(tx.load_model(folder), connector=tx.ConnectorConfig(expansion_rate=2, kind="static"))
    out = tx.save_adapter(model, tmp_path / "conn")
    assert sorted(p.name for p in out.iterdir()) == ["tx_connector.safetensors", "tx_connector_config.json"]
    side = json.loads((out / "tx_connector_config.json").read_text())
    (out / "tx_connector_config.json").write_text(json.dumps({**side, "format_version": 99, "tx_version": "9.0"}))
    fresh = tx.load_model(folder)
    with pytest.raises(AdapterError, match=r"written by a newer tx \(tx 9.0, format version 99\).*Upgrade tx"):
        tx.load_adapter(fresh, out)
    assert not has_connector(fresh)


def test_save_and_load_need_the_right_model(checkpoints, tmp_path, saved):
    folder, _ = checkpoints["llama"]
    with pytest.raises(AdapterError, match="no adapter to save"):
        tx.save_adapter(tx.load_model(folder), tmp_path / "none")
    with_lora = attach(tx.load_model(folder), lora=tx.LoRAConfig(rank=4))
    with pytest.raises(AdapterError, match="needs a model without adapters"):
        tx.load_adapter(with_lora, saved)
    assert not [p for p in saved.iterdir() if p.name.startswith(".")]  # no temporary files left behind
