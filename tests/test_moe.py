"""Mixture-of-experts families (Qwen3-MoE, Qwen2-MoE, Mixtral) against transformers and PEFT.

Tolerances (fp32): logits vs transformers 1e-4 (the loader's bound for every family); identity at init with
mhc n = 4 + LoRA 1e-6 relative (the connector's promise); PEFT round trips and merged exports 1e-4.
"""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from fixtures_models import MOE_FAMILY_NAMES, make_checkpoint
from safetensors.numpy import load_file, save_file

import tx
from tx.adapters.attach import lora_modules
from tx.errors import CheckpointError, ConfigError
from tx.generate import generate_ids
from tx.models.config import BlockSpec
from tx.models.segments import plan_segments

TOL = 1e-4


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {fam: make_checkpoint(fam, root / fam) for fam in MOE_FAMILY_NAMES}


def padded_batch(vocab, seed=0):
    """Three rows of 9: full, left-padded, right-padded."""
    ids = np.random.default_rng(seed).integers(3, vocab, size=(3, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, 6:] = 0
    return ids, mask


def hf_masked(model, ids, mask):
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()


@jax.jit
def _noop(x):
    return x


def tx_logits(model, ids, mask=None):
    from flax import nnx

    @nnx.jit
    def f(model, ids, mask):
        return model(ids, attention_mask=mask)

    mask = np.ones_like(ids) if mask is None else mask
    return np.asarray(f(model, jnp.asarray(ids), jnp.asarray(mask)))


def randomize_lora(model, seed=1, std=0.2):
    rng = np.random.default_rng(seed)
    for _, m in lora_modules(model):
        m.lora_b.set_value(jnp.asarray(rng.normal(0, std, m.lora_b.shape), jnp.float32))


def test_segments_of_layer_patterns():
    d, s = BlockSpec(), BlockSpec(mlp="moe")
    shape = lambda specs: [(len(p.unit), p.repeats) for p in plan_segments(specs)]  # noqa: E731
    assert shape([d] * 6) == [(1, 6)]
    assert shape([d, d, d, s, s, s, s, s]) == [(1, 3), (1, 5)]
    assert shape([d, s] * 3) == [(2, 3)]
    assert shape([d, s, d, s, d]) == [(2, 2), (1, 1)]
    assert shape([d, s, d, s, d, d]) == [(2, 2), (1, 2)]
    plans = plan_segments([d, s, d, s, d, d])
    assert plans[0].layer_ids(0) == (0, 2) and plans[0].layer_ids(1) == (1, 3) and plans[1].layer_ids(0) == (4, 5)


@pytest.mark.parametrize("family", MOE_FAMILY_NAMES)
def test_logits_match_transformers(moe_checkpoints, family):
    folder, ref = moe_checkpoints[family]
    model = tx.load_model(folder)
    if family == "qwen3_moe":
        assert [(len(s.blocks), s.repeats) for s in model.segments] == [(2, 2), (1, 2)]
        assert model.segments[0].blocks[1].spec.mlp == "moe" and model.segments[1].blocks[0].spec.mlp == "dense"
    ids, mask = padded_batch(model.config.vocab_size)
    got, want = tx_logits(model, ids, mask), hf_masked(ref, ids, mask)
    diff = np.abs(got - want)[mask.astype(bool)].max()
    assert diff <= TOL, diff


def test_dense_and_ragged_experts_agree(moe_checkpoints, monkeypatch):
    """The two expert formulations (dense on CPU, ragged_dot on GPU/TPU) compute the same logits."""
    folder, _ = moe_checkpoints["qwen2_moe"]
    model = tx.attach(tx.load_model(folder), lora=tx.LoRAConfig(rank=4, alpha=8))
    randomize_lora(model)
    ids, mask = padded_batch(model.config.vocab_size, seed=3)
    monkeypatch.setenv("TX_MOE", "dense")
    dense = tx_logits(model, ids, mask)
    monkeypatch.setenv("TX_MOE", "ragged")
    ragged = tx_logits(model, ids, mask)
    assert np.abs(dense - ragged).max() <= 1e-5


@pytest.mark.parametrize("family", MOE_FAMILY_NAMES)
def test_identity_mhc4_with_expert_lora(moe_checkpoints, family):
    folder, _ = moe_checkpoints[family]
    model = tx.load_model(folder)
    tx.attach(
        model,
        lora=tx.LoRAConfig(rank=4, alpha=8),
        connector=tx.ConnectorConfig(expansion_rate=4, kind="mhc"),
    )
    names = {s.name for s, _ in lora_modules(model)}
    assert {"experts.gate_up_proj", "experts.down_proj", "gate", "q_proj"} <= names
    ids, mask = padded_batch(model.config.vocab_size)
    report = tx.verify_identity(model, ids, mask)
    assert report.passed and report.relative_diff <= 1e-6, report


def peft_copy(ref, folder=None, config=None):
    import peft

    base = copy.deepcopy(ref)
    if folder is not None:
        return peft.PeftModel.from_pretrained(base, folder).eval()
    return peft.get_peft_model(base, config).eval()


@pytest.mark.parametrize("family", MOE_FAMILY_NAMES)
def test_peft_all_linear_with_experts_loads_in_tx(moe_checkpoints, tmp_path, family):
    """PEFT's all-linear + target_parameters on the experts (it adds the router and a rank_pattern itself)."""
    import peft

    folder, ref = moe_checkpoints[family]
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", target_parameters=["experts.gate_up_proj", "experts.down_proj"]
    )
    hf = peft_copy(ref, config=config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    hf.save_pretrained(tmp_path / "peft")
    ids, mask = padded_batch(ref.config.vocab_size)
    want = hf_masked(hf, ids, mask)
    assert np.abs(want - hf_masked(ref, ids, mask)).max() > 1e-2
    model = tx.load_adapter(tx.load_model(folder), tmp_path / "peft")
    assert any(s.is_experts for s, _ in lora_modules(model))
    diff = np.abs(tx_logits(model, ids, mask) - want)[mask.astype(bool)].max()
    assert diff <= TOL, diff


@pytest.mark.parametrize("family", MOE_FAMILY_NAMES)
def test_tx_expert_adapter_loads_in_peft_and_merges(moe_checkpoints, tmp_path, family):
    import transformers as T

    folder, ref = moe_checkpoints[family]
    layers = [1, 2] if family != "qwen3_moe" else None
    model = tx.attach(tx.load_model(folder), lora=tx.LoRAConfig(rank=3, alpha=6, layers=layers))
    randomize_lora(model)
    ids, mask = padded_batch(model.config.vocab_size, seed=5)
    got = tx_logits(model, ids, mask)
    assert np.abs(got - hf_masked(ref, ids, mask)).max() > 1e-2
    out = tx.save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_parameters"], cfg
    want = hf_masked(peft_copy(ref, out), ids, mask)
    valid = mask.astype(bool)
    assert np.abs(got - want)[valid].max() <= TOL
    again = tx.load_adapter(tx.load_model(folder), out)
    np.testing.assert_array_equal(tx_logits(again, ids, mask), got)
    # merged export: transformers loads it and computes what the adapted tx model computes
    tx.save_model(tx.merge_lora(model), tmp_path / "merged")
    merged = T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert np.abs(hf_masked(merged, ids, mask) - got)[valid].max() <= TOL


def test_expert_targets_and_errors(moe_checkpoints):
    folder, _ = moe_checkpoints["qwen3_moe"]
    model = tx.attach(tx.load_model(folder), lora=tx.LoRAConfig(rank=2, targets=["experts"]))
    sites = {(s.name, s.layer_ids) for s, _ in lora_modules(model)}
    assert sites == {("experts.gate_up_proj", (1, 3)), ("experts.down_proj", (1, 3))}
    model = tx.attach(tx.load_model(folder), lora=tx.LoRAConfig(rank=2, targets=["down_proj"]))
    assert {s.name for s, _ in lora_modules(model)} == {"down_proj", "experts.down_proj"}  # as PEFT's suffix match
    with pytest.raises(ConfigError, match=r"'expert' matches no module.*experts\.gate_up_proj"):
        tx.attach(tx.load_model(folder), lora=tx.LoRAConfig(rank=2, targets=["expert"]))


def test_generation_matches_transformers(moe_checkpoints):
    folder, ref = moe_checkpoints["qwen3_moe"]
    model = tx.load_model(folder)
    prompts = [[5, 9, 11, 4], [7, 3]]
    got = generate_ids(model, prompts, 6)
    for prompt, out in zip(prompts, got):
        with torch.no_grad():
            want = ref.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert out == want[0, len(prompt) :].tolist()


def test_bad_expert_tensors(moe_checkpoints, tmp_path):
    import shutil

    folder, _ = moe_checkpoints["qwen3_moe"]
    bad = shutil.copytree(folder, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.2.up_proj.weight"]
    tensors["model.layers.3.mlp.experts.0.down_proj.weight"] = tensors["model.layers.3.mlp.experts.0.down_proj.weight"][
        :, :7
    ]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as info:
        tx.load_model(bad)
    message = str(info.value)
    assert "missing tensor 'model.layers.1.mlp.experts.2.up_proj.weight' (expected shape (24, 40))" in message
    assert (
        "'model.layers.3.mlp.experts.0.down_proj.weight' has shape (40, 7) but config.json implies (40, 24)" in message
    )
