"""The language model of Gemma3ForConditionalGeneration checkpoints (text only) against transformers and PEFT.

tx loads, adapts and exports the text model and leaves the vision tower and projector as they are: the merged
export is again a Gemma3ForConditionalGeneration checkpoint with the vision weights unchanged. Both on-disk
layouts writers have used load (transformers 5 / the hub's ``language_model.model.*``; transformers 4.50-4.57's
``model.language_model.*``). Tolerances (fp32): logits vs transformers 1e-4; identity at init 1e-6 relative;
PEFT round trips and merged exports 1e-4.
"""

import json

import numpy as np
import pytest
import torch
from fixtures_compare import hf_masked, max_diff, padded_batch, peft_copy, randomize_lora, tx_logits
from fixtures_models import hf_config
from safetensors.numpy import load_file, save_file

import tx
from tx.adapters.attach import lora_modules
from tx.errors import AdapterError, CheckpointError
from tx.generate import generate_ids
from tx.models.config import parse_config

TOL = 1e-4
VISION = dict(
    hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
)


def vlm(seed=0):
    """A Gemma3ForConditionalGeneration with the text model of tests/fixtures_models.py's gemma3 ([S S F] x 2,
    q/k norm, linear rope on global layers) and a tiny SigLIP tower; every parameter random."""
    import transformers as T

    text = hf_config("gemma3").to_dict()
    for key in ("architectures", "transformers_version", "dtype"):
        text.pop(key, None)
    cfg = T.Gemma3Config(text_config=text, vision_config=VISION, mm_tokens_per_image=4)
    cfg.architectures = ["Gemma3ForConditionalGeneration"]
    torch.manual_seed(seed)
    model = T.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and name.endswith("norm.weight"):
                p.copy_(0.2 * torch.randn_like(p))  # Gemma's norms scale by 1 + w
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def relayout(src, dst):
    """The same checkpoint in transformers 4.50-4.57's key layout (model.language_model.*, model.vision_tower.*)."""
    dst.mkdir()
    tensors = load_file(src / "model.safetensors")
    renamed = {}
    for key, value in tensors.items():
        if key.startswith("language_model.model."):
            key = "model.language_model." + key[len("language_model.model.") :]
        elif key.startswith("language_model."):
            key = key[len("language_model.") :]
        else:
            key = "model." + key
        renamed[key] = value
    save_file(renamed, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


@pytest.fixture(scope="module")
def vlm_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3_vlm")
    ref = vlm()
    ref.save_pretrained(root / "hub")
    assert any(k.startswith("language_model.model.") for k in load_file(root / "hub" / "model.safetensors"))
    return {"hub": root / "hub", "legacy": relayout(root / "hub", root / "legacy")}, ref


@pytest.mark.parametrize("layout", ["hub", "legacy"])
def test_logits_match_transformers(vlm_checkpoints, layout):
    import transformers as T

    folders, ref = vlm_checkpoints
    model = tx.load_model(folders[layout])
    assert model.config.architecture == "Gemma3ForConditionalGeneration"
    assert [[(b.spec.rope, b.spec.window) for b in s.blocks] for s in model.segments] == [
        [("sliding_attention", 4), ("sliding_attention", 4), ("full_attention", None)]
    ]
    ids, mask = padded_batch(model.config.vocab_size)
    want = hf_masked(ref, ids, mask)
    assert max_diff(tx_logits(model, ids, mask), want, mask) <= TOL
    loaded = T.Gemma3ForConditionalGeneration.from_pretrained(folders[layout], dtype=torch.float32).eval()
    np.testing.assert_allclose(hf_masked(loaded, ids, mask), want, atol=1e-6)  # transformers reads the layout too


def test_hub_config_takes_the_text_config_defaults():
    """The hub's configs give only the sizes that differ from Gemma3TextConfig's defaults (google/gemma-3-4b-it's
    text_config, below); the rest, eos_token_id at the top level included, comes out as transformers reads it."""
    import transformers as T

    data = {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "eos_token_id": [1, 106],
        "text_config": {
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "model_type": "gemma3_text",
            "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024,
        },
        "vision_config": {"model_type": "siglip_vision_model"},
    }
    cfg = parse_config(json.loads(json.dumps(data)))
    ref = T.Gemma3Config(**data).text_config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (
        ref.vocab_size,
        ref.hidden_size,
        ref.intermediate_size,
        ref.num_hidden_layers,
    )
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        ref.num_attention_heads,
        ref.num_key_value_heads,
        ref.head_dim,
    )
    assert cfg.attn_scale == ref.query_pre_attn_scalar**-0.5 and cfg.rms_norm_eps == ref.rms_norm_eps
    assert cfg.max_positions == ref.max_position_embeddings and cfg.tie_word_embeddings == ref.tie_word_embeddings
    windows = [s.window for s in cfg.layer_specs]
    assert windows == [ref.sliding_window if t == "sliding_attention" else None for t in ref.layer_types]
    full, local = cfg.rope_for("full_attention"), cfg.rope_for("sliding_attention")
    assert (full.kind, full.factor, full.theta) == ("linear", 8.0, ref.rope_parameters["full_attention"]["rope_theta"])
    assert (local.kind, local.theta) == ("default", ref.rope_parameters["sliding_attention"]["rope_theta"])
    assert cfg.eos_token_id == [1, 106] and cfg.hidden_act == "gelu_tanh"


def test_missing_language_model_names_the_keys(vlm_checkpoints, tmp_path):
    folders, _ = vlm_checkpoints
    (tmp_path / "config.json").write_text((folders["hub"] / "config.json").read_text())
    tensors = {k: v for k, v in load_file(folders["hub"] / "model.safetensors").items() if "vision" in k}
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"language_model\.model\.embed_tokens\.weight"):
        tx.load_model(tmp_path)


def test_identity_with_connector_and_lora(vlm_checkpoints):
    folders, _ = vlm_checkpoints
    model = tx.attach(
        tx.load_model(folders["hub"]),
        lora=tx.LoRAConfig(rank=4, alpha=8, targets="all-linear"),
        connector=tx.ConnectorConfig(expansion_rate=4, kind="mhc"),
    )
    ids, mask = padded_batch(model.config.vocab_size)
    report = tx.verify_identity(model, ids, mask)
    assert report.passed and report.relative_diff <= 1e-6, report


def test_tx_adapter_loads_in_peft_and_merged_export_keeps_the_vision_tower(vlm_checkpoints, tmp_path):
    import transformers as T

    folders, ref = vlm_checkpoints
    model = tx.attach(tx.load_model(folders["hub"]), lora=tx.LoRAConfig(rank=3, alpha=6, targets="all-linear"))
    randomize_lora(model)
    ids, mask = padded_batch(model.config.vocab_size, seed=5)
    got = tx_logits(model, ids, mask)
    assert np.abs(got - hf_masked(ref, ids, mask)).max() > 1e-2
    out = tx.save_adapter(model, tmp_path / "adapter")
    hf = peft_copy(ref, out)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in hf.named_parameters() if ".lora_A" in n}
    assert adapted and all(".language_model.layers." in n for n in adapted), sorted(adapted)[:5]
    assert len(adapted) == sum(len(s.layer_ids) for s, _ in lora_modules(model))
    assert max_diff(got, hf_masked(hf, ids, mask), mask) <= TOL

    tx.save_model(tx.merge_lora(model), tmp_path / "merged")
    merged = T.Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert max_diff(hf_masked(merged, ids, mask), got, mask) <= TOL
    source, written = (
        load_file(folders["hub"] / "model.safetensors"),
        load_file(tmp_path / "merged" / "model.safetensors"),
    )
    vision = [k for k in source if not k.startswith("language_model.")]
    assert vision and set(written) == set(source)
    for k in vision:
        np.testing.assert_array_equal(written[k], source[k])
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["architectures"] == [
        "Gemma3ForConditionalGeneration"
    ]


def test_peft_adapter_loads_in_tx(vlm_checkpoints, tmp_path):
    """PEFT on the language model's linears (the regex users give PEFT for a multimodal model) -> tx; an adapter
    that also adapts the vision tower names a vision tensor and why."""
    import peft

    folders, ref = vlm_checkpoints
    targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    hf = peft_copy(ref, config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    hf.save_pretrained(tmp_path / "peft")
    ids, mask = padded_batch(ref.config.text_config.vocab_size, seed=4)
    want = hf_masked(hf, ids, mask)
    model = tx.load_adapter(tx.load_model(folders["hub"]), tmp_path / "peft")
    assert {s.name for s, _ in lora_modules(model)} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert max_diff(tx_logits(model, ids, mask), want, mask) <= TOL

    both = peft_copy(ref, config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    both.save_pretrained(tmp_path / "both")
    with pytest.raises(AdapterError, match=r"vision_tower.*outside the language model"):
        tx.load_adapter(tx.load_model(folders["hub"]), tmp_path / "both")


def test_generation_matches_transformers(vlm_checkpoints):
    folders, ref = vlm_checkpoints
    model = tx.load_model(folders["legacy"])
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
