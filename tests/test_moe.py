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
from fixtures_compare import hf_masked, randomize_lora, tx_logits
from fixtures_compare import padded_batch as _padded_batch
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
    return _padded_batch(vocab, seed, length=9, right=3)


@jax.jit
def _noop(x):
    return x


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


def test_dense_blocked_and_ragged_experts_agree(moe_checkpoints, monkeypatch):
    """The three expert formulations (dense and blocked on CPU, ragged_dot on GPU/TPU) compute the same logits."""
    folder, _ = moe_checkpoints["qwen2_moe"]
    model = tx.attach(tx.load_model(folder), lora=tx.LoRAConfig(rank=4, alpha=8))
    randomize_lora(model)
    ids, mask = padded_batch(model.config.vocab_size, seed=3)
    monkeypatch.setenv("TX_MOE", "dense")
    dense = tx_logits(model, ids, mask)
    monkeypatch.setenv("TX_MOE", "ragged")
    ragged = tx_logits(model, ids, mask)
    assert np.abs(dense - ragged).max() <= 1e-5
    monkeypatch.setenv("TX_MOE", "blocked")
    assert np.abs(dense - tx_logits(model, ids, mask)).max() <= 1e-5


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


@pytest.mark.parametrize("family", MOE_FAMILY_NAMES)
def test_generation_matches_transformers(moe_checkpoints, family):
    """Greedy decoding with the KV cache, past the sliding windows (Mixtral 6, gpt-oss 5) and gpt-oss's sinks."""
    folder, ref = moe_checkpoints[family]
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


def test_bad_moe_options_name_the_key(moe_checkpoints, tmp_path):
    import shutil

    folder, _ = moe_checkpoints["mixtral"]
    for key, value, match in (
        (
            "num_experts_per_tok",
            9,
            r"'num_experts_per_tok' \(9\) exceeds the number of experts \(4, 'num_local_experts'\)",
        ),
        ("num_local_experts", 0, r"'num_local_experts' must be a positive integer, found 0"),
    ):
        bad = shutil.copytree(folder, tmp_path / key)
        cfg = json.loads((bad / "config.json").read_text())
        cfg[key] = value
        (bad / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match=match):
            tx.load_model(bad)


@pytest.mark.parametrize("family", MOE_FAMILY_NAMES)
def test_router_sums_and_aux_loss_match_transformers(moe_checkpoints, family):
    """The load-balancing loss over the padded batch's real tokens equals transformers' ``aux_loss`` (fp32, 1e-6),
    and every routed choice is computed (dropless: counts sum to tokens x top_k x MoE layers)."""
    from tx.models.moe import load_balancing_loss, router_metrics

    folder, ref = moe_checkpoints[family]
    model = tx.load_model(folder)
    ids, mask = padded_batch(model.config.vocab_size, seed=7)
    _, _, router = jax.jit(lambda i, m: nnx_forward(model, i, m))(ids, mask)
    with torch.no_grad():
        want = ref(torch.tensor(ids), attention_mask=torch.tensor(mask), output_router_logits=True).aux_loss
    assert abs(float(load_balancing_loss(router)) - float(want)) <= 1e-6 * max(1.0, abs(float(want)))
    moe_layers = sum(spec.mlp == "moe" for spec in model.config.layer_specs)
    assert float(router.tokens) == mask.sum() * moe_layers
    assert float(jnp.sum(router.counts)) == mask.sum() * moe_layers * model.config.moe.top_k
    assert float(router_metrics(router)["router_dropped"]) == 0.0


def nnx_forward(model, ids, mask):
    return model.forward(ids, attention_mask=mask)


@pytest.mark.slow
def test_moe_finetune_learns_reports_routing_and_resumes(moe_checkpoints, tmp_path_factory, tmp_path):
    """LoRA (router included) + mhc on Qwen3-MoE: the loss falls, routing metrics are logged, the load-balancing
    loss is on (the checkpoint's coefficient, the router trains), and a resumed run equals the uninterrupted one."""
    from fixtures_tokenizer import make_chatml_tokenizer
    from test_trainer import records

    from tx.train.data import Dataset
    from tx.train.trainer import TrainConfig, Trainer

    tok_folder = tmp_path_factory.mktemp("moe_tok")
    make_chatml_tokenizer(tok_folder)
    tok = tx.load_tokenizer(tok_folder)
    folder = make_checkpoint("qwen3_moe", tmp_path / "ckpt", vocab_size=tok.vocab_size, router_aux_loss_coef=0.02)[0]

    def fresh():
        model = tx.load_model(folder)
        return tx.attach(model, lora=tx.LoRAConfig(rank=4, alpha=8), connector=tx.ConnectorConfig(expansion_rate=4))

    data = Dataset(records(), tok, seq_len=48, batch_size=4, seed=0, vocab_size=tok.vocab_size)
    cfg = dict(steps=12, lr=1e-2, batch_size=4, seq_len=48, save_every=6, progress=False, schedule="constant")
    full_model = fresh()
    trainer = Trainer(full_model, TrainConfig(**cfg, out=str(tmp_path / "full")))
    assert trainer.aux_coef == pytest.approx(0.02)
    full = trainer.fit(data)
    steps = [h for h in full["history"] if "loss" in h]
    losses = [h["loss"] for h in steps]
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses  # 12 steps: ~18% down (6.5 -> 5.3)
    assert all(h["router_dropped"] == 0 and h["router_max_load"] >= 1 >= h["router_min_load"] for h in steps)
    assert all(h["router_aux_loss"] > 0 for h in steps)
    part = Trainer(fresh(), TrainConfig(**{**cfg, "steps": 6}, out=str(tmp_path / "part")))
    part.fit(data)
    resumed_model = fresh()
    res = Trainer(resumed_model, TrainConfig(**cfg, out=str(tmp_path / "part"), resume=True)).fit(data)
    b = [h["loss"] for h in res["history"] if "loss" in h]
    np.testing.assert_allclose(losses[6:], b, atol=1e-5)
    for (site, a), (_, r) in zip(lora_modules(full_model), lora_modules(resumed_model)):
        np.testing.assert_allclose(np.asarray(a.lora_b[...]), np.asarray(r.lora_b[...]), atol=1e-6, err_msg=site.name)


@pytest.mark.parametrize("formulation", ["dense", "blocked", "ragged"])
def test_gpt_oss_moe_layer_matches_transformers(formulation, monkeypatch):
    """gpt-oss's MoE part (router bias, softmax over the top-k logits, experts with biases, clamped SwiGLU on
    interleaved gate / up rows) equals transformers' GptOssMLP on copied random weights (fp32, 1e-5)."""
    import transformers as T
    from flax import nnx

    from tx.models.config import ModelConfig, RopeConfig
    from tx.models.families import _moe_gpt_oss
    from tx.models.moe import MoE

    hf_cfg = T.GptOssConfig(
        hidden_size=24, intermediate_size=10, num_local_experts=5, num_experts_per_tok=3, swiglu_limit=1.5
    )
    torch.manual_seed(0)
    ref = T.models.gpt_oss.modeling_gpt_oss.GptOssMLP(hf_cfg).float()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.5)
    moe_cfg = _moe_gpt_oss(hf_cfg.to_dict(), "config.json")
    cfg = ModelConfig(
        family="gpt_oss", model_type="gpt_oss", architecture="GptOssForCausalLM", vocab_size=8, hidden_size=24,
        intermediate_size=10, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=12, rms_norm_eps=1e-5,
        max_positions=64, rope=RopeConfig(theta=1e4), moe=moe_cfg,
    )  # fmt: skip
    layer = MoE(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    layer.router.weight.set_value(jnp.asarray(sd["router.weight"]))
    layer.router.bias.set_value(jnp.asarray(sd["router.bias"]))
    # transformers keeps experts as [E, in, out]; tx as [E, out, in] (PEFT's layout)
    layer.experts.gate_up_proj.weight.set_value(jnp.asarray(sd["experts.gate_up_proj"].transpose(0, 2, 1)))
    layer.experts.gate_up_proj.bias.set_value(jnp.asarray(sd["experts.gate_up_proj_bias"]))
    layer.experts.down_proj.weight.set_value(jnp.asarray(sd["experts.down_proj"].transpose(0, 2, 1)))
    layer.experts.down_proj.bias.set_value(jnp.asarray(sd["experts.down_proj_bias"]))
    x = np.random.default_rng(1).standard_normal((2, 7, 24)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.tensor(x))[0].numpy()
    monkeypatch.setenv("TX_MOE", formulation)
    got, sums = layer(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
    assert np.abs(want).max() > 0.1 and float(jnp.sum(sums.counts)) == 2 * 7 * 3


def test_mxfp4_dequantisation_matches_transformers():
    """MXFP4 blocks + scales (every FP4 code, scales around 2^0) dequantise as transformers' converter does."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from tx.models.mxfp4 import dequantize

    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(3, 6, 2, 16), dtype=np.uint8)  # [E, out, in / 32, 16]
    scales = rng.integers(120, 134, size=(3, 6, 2), dtype=np.uint8)
    want = convert_moe_packed_tensors(torch.tensor(blocks), torch.tensor(scales), dtype=torch.float32).numpy()
    got = dequantize(blocks, scales)  # [E, out, in]; transformers transposes to its [E, in, out]
    np.testing.assert_array_equal(got, want.transpose(0, 2, 1))
    with pytest.raises(CheckpointError, match=r"blocks \(3, 6, 2, 16\) and scales \(3, 6\) do not match"):
        dequantize(blocks, scales[..., 0])


def test_gpt_oss_mxfp4_checkpoint_loads_as_its_dequantised_weights(tmp_path):
    """A gpt-oss checkpoint with MXFP4 experts (``*_blocks`` / ``*_scales``, as on the hub) loads into the same model
    as one holding transformers' dequantisation of those blocks in plain fp32 tensors: logits equal exactly."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    folder, _ = make_checkpoint("gpt_oss", tmp_path / "plain", hidden_size=64, intermediate_size=32)
    tensors = load_file(folder / "model.safetensors")
    rng = np.random.default_rng(3)
    quantised, plain = {}, {}
    for key, value in tensors.items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            e, d_in, d_out = value.shape  # transformers' [E, in, out]; MXFP4 stores [E, out, in / 32, 16]
            blocks = rng.integers(0, 256, size=(e, d_out, d_in // 32, 16), dtype=np.uint8)
            scales = rng.integers(121, 126, size=(e, d_out, d_in // 32), dtype=np.uint8)
            quantised[key + "_blocks"], quantised[key + "_scales"] = blocks, scales
            deq = convert_moe_packed_tensors(torch.tensor(blocks), torch.tensor(scales), dtype=torch.float32)
            plain[key] = deq.numpy()
        else:
            quantised[key] = plain[key] = value
    save_file(plain, folder / "model.safetensors", metadata={"format": "pt"})
    mx = tmp_path / "mxfp4"
    mx.mkdir()
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (mx / "config.json").write_text(json.dumps(cfg))
    save_file(quantised, mx / "model.safetensors", metadata={"format": "pt"})
    ids, mask = padded_batch(cfg["vocab_size"], seed=2)
    want = tx_logits(tx.load_model(folder), ids, mask)
    got = tx_logits(tx.load_model(mx), ids, mask)
    np.testing.assert_array_equal(got, want)
    # a merged export of the MXFP4 model is a plain checkpoint transformers loads (no quantization_config left)
    out = tx.save_model(tx.load_model(mx), tmp_path / "export")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    np.testing.assert_array_equal(tx_logits(tx.load_model(out), ids, mask), want)


def test_token_ids_outside_the_vocabulary_are_named(moe_checkpoints):
    """A tokenizer larger than the model's vocabulary would give NaN logits (an out-of-range embedding gather)."""
    from tx.verify import verify_identity

    model = tx.load_model(moe_checkpoints["gpt_oss"][0])
    vocab = model.config.vocab_size
    with pytest.raises(
        ConfigError, match=rf"token id {vocab + 5} is outside the model's vocabulary \(vocab_size {vocab}\)"
    ):
        verify_identity(model, [[3, vocab + 5, 4]])
    with pytest.raises(ConfigError, match=rf"token id {vocab} is outside"):
        generate_ids(model, [[3, 4], [vocab]], 2)


def test_blocked_experts_equal_dense_in_value_and_gradient():
    """The blocked formulation (pairs sorted by expert, each expert's rows padded to blocks of BLOCK) on a routing
    that needs several blocks for one expert, one partly filled block for others and none for one: outputs and the
    gradients of the input and of expert LoRA equal the dense formulation's (fp32, 1e-5; the LoRA gradients, sums
    over ~300 rows of size ~50, 1e-5 relative: the two add in different orders, measured 5e-7 relative)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tx.adapters.lora import LoRAParam
    from tx.adapters.lora_experts import LoRAExperts
    from tx.models import moe as M
    from tx.models.config import MoEConfig

    t, e, k = 300, 5, 2
    experts = M.Experts(MoEConfig(num_experts=e, top_k=k, expert_size=6), 8, dtype=jnp.float32, rngs=nnx.Rngs(0))
    for i, name in enumerate(("gate_up_proj", "down_proj")):
        lora = LoRAExperts(getattr(experts, name), name=name, rank=2, scale=2.0, key=jax.random.key(i))
        lora.lora_b.set_value(0.3 * jax.random.normal(jax.random.key(7 + i), lora.lora_b.shape))
        setattr(experts, name, lora)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((t, 8)), jnp.float32)
    first = np.where(np.arange(t) < 280, 0, 1 + np.arange(t) % 3)  # expert 0: 280 rows (3 blocks), expert 4: none
    second = 1 + (np.arange(t) % 3)
    second = np.where(second == first, (second % 3) + 1, second)
    top_i = jnp.asarray(np.stack([first, second], 1), jnp.int32)
    top_w = jnp.asarray(rng.uniform(0.1, 1.0, (t, k)), jnp.float32)
    counts = np.bincount(np.asarray(top_i).ravel(), minlength=e)
    assert counts[0] > 2 * M.BLOCK and counts[-1] == 0, counts
    graphdef, lora_state, rest = nnx.split(experts, LoRAParam, ...)

    def run(kind):
        def loss(state, x):
            m = nnx.merge(graphdef, state, rest)
            if kind == "dense":
                y = m.dense(x, jnp.zeros((t, e)).at[jnp.arange(t)[:, None], top_i].set(top_w))
            else:
                y = m.blocked(x, top_w, top_i)
            return jnp.sum(jnp.sin(y)), y

        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(lora_state, x)

    (_, want), (g_want, gx_want) = run("dense")
    (_, got), (g_got, gx_got) = run("blocked")
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(gx_got, gx_want, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
        assert np.abs(np.asarray(b)).max() > 0
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert M.formulation(1, e, k) == "dense" and M.formulation(4096, 16, 4) == "blocked"

    # the blocked loop's own backward pass also gives the expert weights' gradient (a model differentiated in its
    # base weights): equal to autodiff's through the dense formulation; and the blocks not in use stay zero
    plan = M.plan_blocks(top_w, top_i, e, M.BLOCK)
    count = int(plan.runs.sum())  # blocks in use; the rest are padding
    assert 0 < count < plan.expert.shape[0] and int(plan.runs[-1]) == 0, (plan.runs, plan.expert.shape)
    base = experts.gate_up_proj.base
    xs = jnp.take(jnp.concatenate([x, jnp.zeros((1, 8))]), plan.token, axis=0)
    w = base.weight[...]

    def weight_loss(kind, w):
        if kind == "dense":
            y = jnp.einsum("nbi,noi->nbo", xs, jnp.take(w, plan.expert, axis=0))
            y = y * (jnp.arange(plan.expert.shape[0]) < count)[:, None, None]
        else:
            y = M._block_matmul(w, xs, plan.runs)
        return jnp.sum(jnp.sin(y) * jnp.cos(xs[..., :1])), y

    (_, y_want), gw_want = jax.value_and_grad(lambda w: weight_loss("dense", w), has_aux=True)(w)
    (_, y_got), gw_got = jax.value_and_grad(lambda w: weight_loss("blocked", w), has_aux=True)(w)
    assert not np.any(np.asarray(y_got)[count:])
    np.testing.assert_allclose(y_got, y_want, atol=1e-5)
    assert np.abs(np.asarray(gw_want)).max() > 0
    np.testing.assert_allclose(gw_got, gw_want, rtol=1e-5, atol=1e-5)
