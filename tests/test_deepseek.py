"""DeepSeek-V3 / V2 (multi-head latent attention, grouped routing, first k layers dense) against transformers and PEFT.

Checkpoints (tests/fixtures_models.py, every weight random, V3's e_score_correction_bias too): V3 with the low-rank
query path and interleaved rope, V3 with q_proj and rotate-half rope, V2 with softmax scores and
group_limited_greedy; all with yarn (mscale / mscale_all_dim), 8 experts in 4 groups of which 2 are kept, top-3.
Tolerances (fp32): logits vs transformers 1e-4; identity at init with mhc n = 4 + LoRA 1e-6 relative; PEFT round
trips and merged exports 1e-4.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from fixtures_compare import greedy_full, hf_masked, max_diff, padded_batch, peft_copy, randomize_lora, tx_logits
from fixtures_models import DEEPSEEK_FAMILY_NAMES, make_checkpoint

import tx
from tx.adapters.attach import lora_modules
from tx.errors import ConfigError
from tx.generate import generate_ids

TOL = 1e-4
MLA_SITES = {"kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}


@pytest.fixture(scope="module")
def ds_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepseek")
    return {fam: make_checkpoint(fam, root / fam) for fam in DEEPSEEK_FAMILY_NAMES}


SEGMENTS = {  # (blocks in the unit, repeats, MLP of the unit's first block) per segment
    "deepseek_v3": [(1, 1, "dense"), (1, 3, "moe")],
    "deepseek_v3_qproj": [(1, 2, "dense"), (1, 2, "moe")],
    "deepseek_v2": [(1, 1, "dense"), (1, 3, "moe")],
    "glm4_moe_lite": [(2, 2, "dense")],  # mlp_layer_types dense, sparse, dense, sparse: one unit of two, twice
}
V3_ROUTING = ("deepseek_v3", "deepseek_v3_qproj", "glm4_moe_lite")  # sigmoid scores with a correction bias


@pytest.mark.parametrize("family", DEEPSEEK_FAMILY_NAMES)
def test_logits_match_transformers(ds_checkpoints, family):
    folder, ref = ds_checkpoints[family]
    model = tx.load_model(folder)
    assert [(len(s.blocks), s.repeats, s.blocks[0].spec.mlp) for s in model.segments] == SEGMENTS[family]
    assert [b.spec.mlp for b in model.segments[-1].blocks][-1] == "moe"
    moe = model.config.moe
    assert (moe.n_group, moe.topk_group, moe.top_k) == (4, 2, 3)
    if family in V3_ROUTING:
        bias = np.asarray(model.segments[-1].blocks[-1].mlp.score_correction_bias[...])
        assert np.abs(bias).min() > 0  # random, as loaded
    ids, mask = padded_batch(model.config.vocab_size)
    diff = max_diff(tx_logits(model, ids, mask), hf_masked(ref, ids, mask), mask)
    print(f"{family}: max |logit diff| {diff:.2e}")
    assert diff <= TOL, diff


@pytest.mark.parametrize("family", DEEPSEEK_FAMILY_NAMES)
def test_identity_mhc4_with_lora(ds_checkpoints, family):
    model = tx.load_model(ds_checkpoints[family][0])
    tx.attach(model, lora=tx.LoRAConfig(rank=4, alpha=8), connector=tx.ConnectorConfig(expansion_rate=4, kind="mhc"))
    names = {s.name for s, _ in lora_modules(model)}
    q = {"q_a_proj", "q_b_proj"} if family in ("deepseek_v3", "glm4_moe_lite") else {"q_proj"}
    experts = {"experts.gate_up_proj", "experts.down_proj", "gate", "shared_expert.down_proj", "down_proj"}
    assert MLA_SITES | q | experts <= names, names
    ids, mask = padded_batch(model.config.vocab_size)
    report = tx.verify_identity(model, ids, mask)
    print(f"{family}: identity relative diff {report.relative_diff:.2e}")
    assert report.passed and report.relative_diff <= 1e-6, report


@pytest.mark.parametrize("family", DEEPSEEK_FAMILY_NAMES)
def test_peft_all_linear_with_experts_loads_in_tx(ds_checkpoints, tmp_path, family):
    import peft

    folder, ref = ds_checkpoints[family]
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", target_parameters=["experts.gate_up_proj", "experts.down_proj"]
    )
    hf = peft_copy(ref, config=config)
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
    assert {"kv_a_proj_with_mqa", "kv_b_proj", "experts.gate_up_proj", "experts.down_proj"} <= names, names
    assert max_diff(tx_logits(model, ids, mask), want, mask) <= TOL


@pytest.mark.parametrize("family", DEEPSEEK_FAMILY_NAMES)
def test_tx_adapter_loads_in_peft_and_merged_export_in_transformers(ds_checkpoints, tmp_path, family):
    import transformers as T

    folder, ref = ds_checkpoints[family]
    model = tx.attach(tx.load_model(folder), lora=tx.LoRAConfig(rank=3, alpha=6))
    names = {s.name for s, _ in lora_modules(model)}
    assert MLA_SITES | {"experts.gate_up_proj", "experts.down_proj", "shared_expert.gate_proj"} <= names, names
    randomize_lora(model)
    ids, mask = padded_batch(model.config.vocab_size, seed=5)
    got = tx_logits(model, ids, mask)
    assert np.abs(got - hf_masked(ref, ids, mask)).max() > 1e-2
    out = tx.save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert "experts.gate_up_proj" in cfg["target_parameters"], cfg
    assert max_diff(got, hf_masked(peft_copy(ref, out), ids, mask), mask) <= TOL
    again = tx.load_adapter(tx.load_model(folder), out)
    np.testing.assert_array_equal(tx_logits(again, ids, mask), got)
    tx.save_model(tx.merge_lora(model), tmp_path / "merged")
    merged = T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert max_diff(hf_masked(merged, ids, mask), got, mask) <= TOL


@pytest.mark.parametrize("family", DEEPSEEK_FAMILY_NAMES)
def test_generation_matches_recompute_and_transformers(ds_checkpoints, family):
    """Greedy decoding with the latent cache, a left-padded batch as transformers' batched generate."""
    folder, ref = ds_checkpoints[family]
    model = tx.load_model(folder)
    prompts = [[5, 9, 11, 4, 8], [7, 3]]
    got = generate_ids(model, prompts, 7)
    assert got[0] == greedy_full(model, prompts[0], 7)
    ids = np.zeros((2, 5), np.int64)
    mask = np.zeros((2, 5), np.int64)
    for i, p in enumerate(prompts):
        ids[i, 5 - len(p) :], mask[i, 5 - len(p) :] = p, 1
    with torch.no_grad():
        want = ref.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=7,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert got == want[:, 5:].tolist()


def test_latent_cache_bytes_per_token():
    """A DeepSeek-V3-shaped config (the hub's sizes): the cache holds kv_lora_rank + qk_rope_head_dim numbers per
    token and layer, 576, against 128 heads x (192 + 128) = 40960 for full keys and values (71x)."""
    from tx.models.config import parse_config
    from tx.models.decoder import KVCache
    from tx.models.mla import cache_numbers_per_token

    data = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "n_shared_experts": 1,
        "n_routed_experts": 256,
        "routed_scaling_factor": 2.5,
        "kv_lora_rank": 512,
        "q_lora_rank": 1536,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "qk_nope_head_dim": 128,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "n_group": 8,
        "topk_group": 4,
        "num_experts_per_tok": 8,
        "first_k_dense_replace": 3,
        "norm_topk_prob": True,
        "moe_layer_freq": 1,
        "max_position_embeddings": 163840,
        "rope_theta": 10000,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
    }
    cfg = parse_config(data)
    numbers = cache_numbers_per_token(cfg)
    assert numbers == {"latent": 576, "full": 40960}
    bf16 = {k: 2 * v * cfg.num_layers for k, v in numbers.items()}
    print(f"DeepSeek-V3 cache bytes per token (bf16, 61 layers): latent {bf16['latent']}, full K/V {bf16['full']}")
    assert bf16 == {"latent": 70272, "full": 4997120}
    small = dict(data, num_hidden_layers=4, first_k_dense_replace=1, vocab_size=16)
    import jax
    import jax.numpy as jnp

    cache = jax.eval_shape(lambda: KVCache.create(parse_config(small), 1, 10, jnp.bfloat16))
    per_token = sum(a.size for a in jax.tree.leaves(cache.layers)) // 10
    assert per_token == 576 * 4
    # the softmax scale carries yarn's mscale(40, mscale_all_dim 1) squared
    assert cfg.attn_scale == pytest.approx(192**-0.5 * (0.1 * np.log(40) + 1) ** 2)


@pytest.mark.parametrize(
    "family, key, value, match",
    [
        ("deepseek_v3", "scoring_func", "softmax", r"scoring_func 'softmax' is not supported for deepseek_v3; "
         r"supported: 'sigmoid'"),
        ("deepseek_v3", "topk_method", "greedy", r"topk_method 'greedy' is not supported for deepseek_v3; "
         r"supported: 'noaux_tc'"),
        ("deepseek_v2", "topk_method", "noaux_tc", r"topk_method 'noaux_tc' is not supported for deepseek_v2; "
         r"supported: 'greedy', 'group_limited_greedy'"),
        ("deepseek_v2", "scoring_func", "sigmoid", r"scoring_func 'sigmoid' is not supported for deepseek_v2"),
    ],
)  # fmt: skip
def test_unsupported_routing_names_key_value_and_supported(ds_checkpoints, tmp_path, family, key, value, match):
    bad = shutil.copytree(ds_checkpoints[family][0], tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg[key] = value
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=match):
        tx.load_model(bad)


def test_unsupported_rope_type_names_it(ds_checkpoints, tmp_path):
    bad = shutil.copytree(ds_checkpoints["deepseek_v3"][0], tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["rope_parameters"]["rope_type"] = "ntk_by_parts"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"rope_type 'ntk_by_parts' is not supported; supported: default, .*yarn"):
        tx.load_model(bad)


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2"])
def test_absorbed_latent_decoding_equals_full_forward(ds_checkpoints, family):
    """Prefill then token-by-token decoding on the latent cache, kv_b_proj absorbed (with a random LoRA delta on
    it and on every other linear), gives the logits of one full forward pass over the whole sequence (fp32, 1e-4)."""
    import jax.numpy as jnp

    from tx.models.decoder import KVCache

    model = tx.attach(tx.load_model(ds_checkpoints[family][0]), lora=tx.LoRAConfig(rank=3, alpha=6))
    randomize_lora(model, std=0.1)
    model.eval()
    ids = np.random.default_rng(2).integers(3, model.config.vocab_size, size=(2, 9)).astype(np.int32)
    want = np.asarray(model(jnp.asarray(ids)))
    cache = KVCache.create(model.config, 2, 9, jnp.float32)
    assert cache.layers[0][0][0].shape[-2:] == (1, model.config.mla.kv_lora_rank)
    hidden, cache = model.hidden_states(jnp.asarray(ids[:, :5]), cache=cache)
    got = [np.asarray(model.project(hidden))]
    for i in range(5, 9):
        hidden, cache = model.hidden_states(jnp.asarray(ids[:, i : i + 1]), cache=cache)
        got.append(np.asarray(model.project(hidden)))
    got = np.concatenate(got, axis=1)
    diff = float(np.abs(got - want).max())
    print(f"{family}: absorbed decoding vs full forward {diff:.2e}")
    assert diff <= TOL, diff


def _fp8_quantise(w: torch.Tensor, block: int = 128):
    """(float8_e4m3fn values, float32 scale_inv per block) of a 2-D weight, as DeepSeek-V3's files hold them."""
    rows, cols = w.shape
    nr, nc = -(-rows // block), -(-cols // block)
    padded = torch.zeros(nr * block, nc * block)
    padded[:rows, :cols] = w
    blocks = padded.reshape(nr, block, nc, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).reshape(nr * block, nc * block)[:rows, :cols].to(torch.float8_e4m3fn)
    return q, scale.float()


def _fp8_reference(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> np.ndarray:
    rows, cols = q.shape
    full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
    return (q.float() * full).numpy()


def test_fp8_dequantisation_matches_reference_on_several_blocks():
    from tx.models.fp8 import FP8, dequantize

    torch.manual_seed(0)
    w = torch.randn(300, 260) * torch.linspace(0.1, 3.0, 260)
    q, scale = _fp8_quantise(w)
    got = dequantize(q.view(torch.uint8).numpy().view(FP8), scale.numpy())
    np.testing.assert_array_equal(got, _fp8_reference(q, scale))
    assert scale.shape == (3, 3)


def test_fp8_checkpoint_loads_as_its_dequantised_weights(ds_checkpoints, tmp_path):
    """Every linear weight of the layers as float8_e4m3fn + weight_scale_inv (the hub's layout): the loaded weights
    equal the reference dequantisation bit for bit (fp32), and the model matches transformers on the dequantised
    weights (1e-4). A weight without its scale names the tensor."""
    import transformers as T
    from flax import nnx
    from safetensors.torch import load_file, save_file

    folder, _ = ds_checkpoints["deepseek_v3"]
    tensors = load_file(folder / "model.safetensors")
    quantised, plain = {}, {}
    for key, value in tensors.items():
        if ".layers." in key and key.endswith("proj.weight") and value.ndim == 2:
            q, scale = _fp8_quantise(value.float())
            quantised[key], quantised[key + "_scale_inv"] = q, scale
            plain[key] = torch.from_numpy(_fp8_reference(q, scale))
        else:
            quantised[key] = plain[key] = value
    assert sum(v.dtype == torch.float8_e4m3fn for v in quantised.values()) > 40
    ref_dir, fp8_dir = tmp_path / "plain", tmp_path / "fp8"
    for d, ts in ((ref_dir, plain), (fp8_dir, quantised)):
        shutil.copytree(folder, d)
        save_file(ts, d / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((fp8_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (fp8_dir / "config.json").write_text(json.dumps(cfg))
    want, got = tx.load_model(ref_dir), tx.load_model(fp8_dir)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(want)), nnx.to_flat_state(nnx.state(got))):
        np.testing.assert_array_equal(np.asarray(b[...]), np.asarray(a[...]), err_msg=str(path))
    ref = T.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ids, mask = padded_batch(cfg["vocab_size"], seed=6)
    assert max_diff(tx_logits(got, ids, mask), hf_masked(ref, ids, mask), mask) <= TOL
    key = "model.layers.2.self_attn.kv_b_proj.weight"
    del quantised[key + "_scale_inv"]
    save_file(quantised, fp8_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(tx.errors.CheckpointError, match=rf"tensor '{key}' is float8_e4m3fn but its scale"):
        tx.load_model(fp8_dir)


def test_bad_mlp_layer_types_names_the_key(ds_checkpoints, tmp_path):
    bad = shutil.copytree(ds_checkpoints["glm4_moe_lite"][0], tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["mlp_layer_types"] = ["dense", "sparse", "moe", "sparse"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(tx.errors.CheckpointError, match=r"'mlp_layer_types' must list 'dense' or 'sparse' for each"):
        tx.load_model(bad)


def test_peft_remapped_model_types_agree_with_peft():
    """tx names dense / shared-expert linears through target_parameters on the model types whose adapter configs PEFT
    rewrites on load (it would take gate_proj / up_proj for transformers 4's experts and double their rank): that
    set, over the model types tx loads, must be PEFT's own."""
    from peft.utils import transformers_weight_conversion as conv

    from tx.adapters.io import PEFT_REMAPPED_MODEL_TYPES
    from tx.models.families import FAMILIES

    def rewritten(model_type: str) -> bool:
        base = conv._MODEL_TO_CONVERSION_PATTERN.get(model_type)
        return bool(base and conv._MOE_TARGET_MODULE_MAPPING.get(base) and conv._MOE_FUSED_TARGETS.get(base))

    ours = {t for f in FAMILIES for t in f.model_types}
    assert {t for t in ours if rewritten(t)} == PEFT_REMAPPED_MODEL_TYPES & ours


def test_finetune_mla_moe_with_mhc_learns(tmp_path_factory, tmp_path):
    """The trainer on DeepSeek-V3 (MLA, grouped routing, a dense segment then an MoE one) with LoRA on every linear,
    the experts and the router, plus mhc n = 4: the loss falls and the routing metrics show every token routed."""
    from fixtures_models import make_checkpoint as make
    from fixtures_tokenizer import make_chatml_tokenizer
    from test_trainer import records

    from tx.train.data import Dataset
    from tx.train.trainer import TrainConfig, Trainer

    tok_folder = tmp_path_factory.mktemp("ds_tok")
    make_chatml_tokenizer(tok_folder)
    tok = tx.load_tokenizer(tok_folder)
    folder = make("deepseek_v3", tmp_path / "ckpt", vocab_size=tok.vocab_size)[0]
    model = tx.attach(
        tx.load_model(folder), lora=tx.LoRAConfig(rank=4, alpha=8), connector=tx.ConnectorConfig(expansion_rate=4)
    )
    data = Dataset(records(), tok, seq_len=48, batch_size=4, seed=0, vocab_size=tok.vocab_size)
    cfg = TrainConfig(
        steps=10, lr=1e-2, batch_size=4, seq_len=48, progress=False, schedule="constant", out=str(tmp_path / "run")
    )
    steps = [h for h in Trainer(model, cfg).fit(data)["history"] if "loss" in h]
    losses = [h["loss"] for h in steps]
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses
    assert all(h["router_dropped"] == 0 and h["router_max_load"] >= 1 >= h["router_min_load"] for h in steps)
