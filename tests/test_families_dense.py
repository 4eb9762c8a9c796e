"""Dense families with other block shapes (Gemma 2 / 3, Phi-3, OLMo 2 / 3, Granite, SmolLM3) against transformers
and PEFT.

Each family's tiny checkpoint has its layer pattern (tests/fixtures_models.py): local / global layers with their own
ropes, NoPE layers, fused projections, soft-caps, multipliers. Tolerances (fp32): logits vs transformers 1e-4;
identity at init with a connector + LoRA 1e-6 relative (the connector's promise); PEFT round trips and merged
exports 1e-4.
"""

import json

import numpy as np
import pytest
import torch
from fixtures_compare import hf_masked, max_diff, padded_batch, peft_copy, randomize_lora, tx_logits
from fixtures_models import DENSE_FAMILY_NAMES, make_checkpoint

import tx
from tx.adapters.attach import lora_modules
from tx.generate import generate_ids

TOL = 1e-4
KINDS = ("static", "dynamic", "mhc")


@pytest.fixture(scope="module")
def dense_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    return {fam: make_checkpoint(fam, root / fam) for fam in DENSE_FAMILY_NAMES}


# unit of blocks and repeats per segment; the rope key and window of each unit position
LAYOUT = {
    "gemma2": [[("default", 4), ("default", None)]],
    "gemma3": [[("sliding_attention", 4), ("sliding_attention", 4), ("full_attention", None)]],
    "phi3": [[("default", None)]],
    "olmo2": [[("default", None)]],
    "olmo3": [[("sliding_attention", 4)], [("full_attention", None)]],
    "granite": [[("default", None)]],
    "smollm3": [[("default", None)], [(None, None), ("default", None)]],
}


@pytest.mark.parametrize("family", DENSE_FAMILY_NAMES)
def test_logits_match_transformers(dense_checkpoints, family):
    folder, ref = dense_checkpoints[family]
    model = tx.load_model(folder)
    layout = [[(b.spec.rope, b.spec.window) for b in s.blocks] for s in model.segments]
    assert layout == LAYOUT[family]
    ids, mask = padded_batch(model.config.vocab_size)
    want = hf_masked(ref, ids, mask)
    assert max_diff(tx_logits(model, ids, mask), want, mask) <= TOL


@pytest.mark.parametrize("family", DENSE_FAMILY_NAMES)
def test_bf16_checkpoint_loads(tmp_path, family):
    folder, ref = make_checkpoint(family, tmp_path / "bf16", dtype="bfloat16")
    model = tx.load_model(folder)  # bf16 on disk, fp32 in tx
    ids, mask = padded_batch(model.config.vocab_size, seed=2)
    assert max_diff(tx_logits(model, ids, mask), hf_masked(ref, ids, mask), mask) <= TOL


def identity(folder, kind, n, lora=True):
    model = tx.load_model(folder)
    tx.attach(
        model,
        lora=tx.LoRAConfig(rank=4, alpha=8) if lora else None,
        connector=tx.ConnectorConfig(expansion_rate=n, kind=kind),
    )
    ids, mask = padded_batch(model.config.vocab_size)
    return tx.verify_identity(model, ids, mask)


@pytest.mark.parametrize("family", DENSE_FAMILY_NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_identity_with_connector_and_lora(dense_checkpoints, family, kind):
    """Every kind on every family, n rotating over 2..4 (the whole grid: the slow test below)."""
    n = 2 + (DENSE_FAMILY_NAMES.index(family) + KINDS.index(kind)) % 3
    report = identity(dense_checkpoints[family][0], kind, n)
    assert report.passed and report.relative_diff <= 1e-6, report


@pytest.mark.slow
@pytest.mark.parametrize("family", DENSE_FAMILY_NAMES)
def test_identity_grid(dense_checkpoints, family):
    for kind in KINDS:
        for n in (2, 3, 4):
            for lora in (False, True):
                report = identity(dense_checkpoints[family][0], kind, n, lora)
                assert report.passed and report.relative_diff <= 1e-6, (kind, n, lora, report)


@pytest.mark.parametrize("family", DENSE_FAMILY_NAMES)
def test_peft_adapter_loads_in_tx(dense_checkpoints, tmp_path, family):
    """PEFT's all-linear (Phi-3: the fused qkv_proj and gate_up_proj modules) -> tx."""
    import peft

    folder, ref = dense_checkpoints[family]
    hf = peft_copy(ref, config=peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    hf.save_pretrained(tmp_path / "peft")
    ids, mask = padded_batch(ref.config.vocab_size, seed=4)
    want = hf_masked(hf, ids, mask)
    assert np.abs(want - hf_masked(ref, ids, mask)).max() > 1e-2
    model = tx.load_adapter(tx.load_model(folder), tmp_path / "peft")
    names = {s.name for s, _ in lora_modules(model)}
    if family == "phi3":
        assert names == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert max_diff(tx_logits(model, ids, mask), want, mask) <= TOL


@pytest.mark.parametrize("family", DENSE_FAMILY_NAMES)
def test_tx_adapter_loads_in_peft_and_merged_export_in_transformers(dense_checkpoints, tmp_path, family):
    import transformers as T

    folder, ref = dense_checkpoints[family]
    model = tx.attach(tx.load_model(folder), lora=tx.LoRAConfig(rank=3, alpha=6, layers=[0, 2]))
    randomize_lora(model)
    ids, mask = padded_batch(model.config.vocab_size, seed=5)
    got = tx_logits(model, ids, mask)
    assert np.abs(got - hf_masked(ref, ids, mask)).max() > 1e-2
    out = tx.save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    if family == "phi3":
        assert set(cfg["target_modules"]) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}, cfg
    assert max_diff(got, hf_masked(peft_copy(ref, out), ids, mask), mask) <= TOL
    again = tx.load_adapter(tx.load_model(folder), out)
    np.testing.assert_array_equal(tx_logits(again, ids, mask), got)
    tx.save_model(tx.merge_lora(model), tmp_path / "merged")
    merged = T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert max_diff(hf_masked(merged, ids, mask), got, mask) <= TOL


@pytest.mark.parametrize("family", DENSE_FAMILY_NAMES)
def test_generation_matches_transformers(dense_checkpoints, family):
    """Greedy decoding with the KV cache past the sliding windows (4) and Phi-3's original length (8), a
    left-padded batch as transformers' batched generate."""
    folder, ref = dense_checkpoints[family]
    model = tx.load_model(folder)
    prompts = [[5, 9, 11, 4, 8], [7, 3]]
    got = generate_ids(model, prompts, 7)
    ids = np.zeros((2, 5), np.int64)
    mask = np.zeros((2, 5), np.int64)
    for i, p in enumerate(prompts):
        ids[i, 5 - len(p) :], mask[i, 5 - len(p) :] = p, 1
    with torch.no_grad():
        want = ref.generate(
            torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=7, do_sample=False, pad_token_id=0
        )
    assert got == want[:, 5:].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["phi3", "gemma2"])
def test_trainer_learns_with_fused_lora_and_soft_caps(tmp_path, family):
    """The trainer on a fused-projection family (LoRA on qkv_proj / gate_up_proj) and a soft-capped one, with an
    mhc connector: the loss falls and the base weights stay bit for bit."""
    from fixtures_tokenizer import make_chatml_tokenizer

    from tx.train.data import Dataset
    from tx.train.trainer import TrainConfig, Trainer

    make_chatml_tokenizer(tmp_path / "tok")
    tok = tx.load_tokenizer(tmp_path / "tok")
    folder, _ = make_checkpoint(family, tmp_path / family, vocab_size=tok.vocab_size)
    model = tx.attach(
        tx.load_model(folder),
        lora=tx.LoRAConfig(rank=4, alpha=8),
        connector=tx.ConnectorConfig(expansion_rate=2, kind="mhc"),
    )
    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]
    rng = np.random.default_rng(0)
    records = []
    for _ in range(32):
        w = list(rng.choice(words, size=3))
        records.append(
            {
                "messages": [
                    {"role": "user", "content": " ".join(w)},
                    {"role": "assistant", "content": " ".join(w[::-1])},
                ]
            }
        )
    data = Dataset(records, tok, seq_len=48, batch_size=4, seed=0, vocab_size=tok.vocab_size)
    site = "qkv_proj" if family == "phi3" else "q_proj"
    lora = next(m for s, m in lora_modules(model) if s.name == site)
    base_before = np.asarray(lora.base.weight[...]).copy()
    trainer = Trainer(
        model, TrainConfig(steps=16, lr=1e-2, schedule="constant", batch_size=4, seq_len=48, progress=False)
    )
    losses = [float(trainer.step(data.batch(i))["loss"]) for i in range(16)]
    assert np.mean(losses[-4:]) < 0.9 * np.mean(losses[:4]), losses
    np.testing.assert_array_equal(np.asarray(lora.base.weight[...]), base_before)
    assert np.abs(np.asarray(lora.lora_b[...])).max() > 0


def test_older_configs_without_layer_types():
    """Gemma 3 configs of transformers 4 (``rope_theta``, ``rope_local_base_freq``, ``rope_scaling``,
    ``sliding_window_pattern``, no ``layer_types``) and Gemma 2 ones get the families' default patterns."""
    from tx.models.config import parse_config

    base = dict(vocab_size=11, hidden_size=16, intermediate_size=8, num_attention_heads=2, head_dim=8)
    cfg = parse_config(
        {
            **base,
            "architectures": ["Gemma3ForCausalLM"],
            "num_hidden_layers": 7,
            "sliding_window": 5,
            "sliding_window_pattern": 3,
            "rope_theta": 1e6,
            "rope_local_base_freq": 1e4,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        }
    )
    assert [(s.window, s.rope) for s in cfg.layer_specs] == [
        (5, "sliding_attention"),
        (5, "sliding_attention"),
        (None, "full_attention"),
    ] * 2 + [(5, "sliding_attention")]
    ropes = dict(cfg.ropes)
    assert (ropes["full_attention"].kind, ropes["full_attention"].factor, ropes["full_attention"].theta) == (
        "linear",
        8.0,
        1e6,
    )
    assert (ropes["sliding_attention"].kind, ropes["sliding_attention"].theta) == ("default", 1e4)
    gemma2 = parse_config({**base, "architectures": ["Gemma2ForCausalLM"], "num_hidden_layers": 3, "sliding_window": 4})
    assert [s.window for s in gemma2.layer_specs] == [4, None, 4]
    assert (gemma2.attn_softcap, gemma2.final_softcap, gemma2.embed_scale) == (50.0, 30.0, 4.0)  # class defaults
    assert gemma2.attn_scale == 256**-0.5 and cfg.attn_softcap is None
