"""Tiny random-weight checkpoints written by transformers' save_pretrained, for every supported family."""

from __future__ import annotations

from pathlib import Path

FAMILY_NAMES = ("llama", "llama3_tied", "qwen2", "qwen3", "mistral")
# Mixture-of-experts families (tests/test_moe.py): >= 3 layers, 4+ experts, top-2, each with its layer pattern.
MOE_FAMILY_NAMES = ("qwen3_moe", "qwen2_moe", "mixtral", "gpt_oss")
MOE = dict(num_hidden_layers=5, intermediate_size=56, num_experts_per_tok=2)
# Dense families with other block shapes (tests/test_families_dense.py), each with its layer pattern.
DENSE_FAMILY_NAMES = ("gemma2", "gemma3", "phi3", "olmo2", "olmo3", "granite", "smollm3")
S, F = "sliding_attention", "full_attention"
# DeepSeek families (tests/test_deepseek.py): multi-head latent attention, grouped routing, first k layers dense.
DEEPSEEK_FAMILY_NAMES = ("deepseek_v3", "deepseek_v3_qproj", "deepseek_v2", "glm4_moe_lite")
DEEPSEEK = dict(
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,  # MLA expands keys and values for every head
    max_position_embeddings=128,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=12,
    moe_intermediate_size=16,
    n_routed_experts=8,
    num_experts_per_tok=3,
    n_group=4,
    topk_group=2,
)

COMMON = dict(
    vocab_size=101,
    hidden_size=40,
    intermediate_size=72,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def hf_config(family: str, **overrides):
    import transformers as T

    COMMON = {**globals()["COMMON"], **overrides}
    if family == "llama":
        return T.LlamaConfig(**COMMON, rope_theta=500000.0, architectures=["LlamaForCausalLM"])
    if family == "llama3_tied":
        rope = dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        )
        return T.LlamaConfig(
            **COMMON, rope_parameters=rope, tie_word_embeddings=True, architectures=["LlamaForCausalLM"]
        )
    if family == "qwen2":
        return T.Qwen2Config(**COMMON, architectures=["Qwen2ForCausalLM"])
    if family == "qwen3":
        return T.Qwen3Config(**COMMON, head_dim=16, architectures=["Qwen3ForCausalLM"])
    if family == "mistral":
        return T.MistralConfig(**COMMON, sliding_window=5, architectures=["MistralForCausalLM"])
    if family.startswith("deepseek_v4"):
        return _deepseek_v4_config(T, family, overrides)
    if family.startswith(("deepseek", "glm4_moe_lite")):
        return _deepseek_config(T, family, {**COMMON, **DEEPSEEK, **overrides})
    dense = _dense_config(T, family, COMMON)
    if dense is not None:
        return dense
    moe = {**COMMON, **MOE, **overrides}
    if family == "qwen3_moe":  # D S D S D D (layer 5 in mlp_only_layers): segments [D S] x 2, [D] x 2
        return T.Qwen3MoeConfig(
            **{**moe, "num_hidden_layers": 6},
            head_dim=12,
            num_experts=5,
            moe_intermediate_size=24,
            decoder_sparse_step=2,
            mlp_only_layers=[5],
            norm_topk_prob=True,
            architectures=["Qwen3MoeForCausalLM"],
        )
    if family == "qwen2_moe":  # every layer sparse, a gated shared expert, q/k/v bias, unnormalised top-k
        return T.Qwen2MoeConfig(
            **{**moe, "num_hidden_layers": 3},
            num_experts=4,
            moe_intermediate_size=20,
            shared_expert_intermediate_size=36,
            norm_topk_prob=False,
            architectures=["Qwen2MoeForCausalLM"],
        )
    if family == "gpt_oss":  # sliding / full layers (segments of [S F]), yarn rope, sinks, biases, clamped SwiGLU
        return T.GptOssConfig(
            **{**moe, "num_hidden_layers": 4, "intermediate_size": overrides.get("intermediate_size", 20)},
            head_dim=12,
            num_local_experts=4,
            sliding_window=5,
            swiglu_limit=1.5,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=150000.0,
                factor=4.0,
                beta_fast=32.0,
                beta_slow=1.0,
                truncate=False,
                original_max_position_embeddings=16,
            ),
            architectures=["GptOssForCausalLM"],
        )
    if family == "mixtral":  # every layer sparse, sliding window
        return T.MixtralConfig(
            **{**moe, "num_hidden_layers": 3, "intermediate_size": 28},
            num_local_experts=4,
            sliding_window=6,
            architectures=["MixtralForCausalLM"],
        )
    raise ValueError(family)


def _deepseek_v4_config(T, family: str, overrides: dict):
    """DeepSeek-V4, two option sets.

    "deepseek_v4": 6 layers HCA, sliding, CSA, HCA, CSA, HCA (segments [H] x 1, [S] x 1, [C H] x 2), hash routing on
    the first two, hc_mult 4, yarn on the compress rope, sqrt-softplus scores, index_topk 64 (every entry: the
    selection cannot differ). "deepseek_v4_b": 5 layers sliding, CSA, CSA, HCA, CSA with one hash layer, hc_mult 3,
    default ropes, sigmoid scores, one output group, index_topk 2 (the indexer chooses), 8 indexer heads.
    """
    base = dict(
        vocab_size=96,
        hidden_size=32,
        moe_intermediate_size=16,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        q_lora_rank=12,
        partial_rotary_factor=0.5,
        num_experts_per_tok=2,
        n_routed_experts=5,
        hc_sinkhorn_iters=20,
        sliding_window=6,
        o_lora_rank=10,
        index_head_dim=8,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        architectures=["DeepseekV4ForCausalLM"],
    )
    h, s, c = "heavily_compressed_attention", "sliding_attention", "compressed_sparse_attention"
    if family == "deepseek_v4":
        cfg = dict(
            num_hidden_layers=6,
            layer_types=[h, s, c, h, c, h],
            mlp_layer_types=["hash_moe"] * 2 + ["moe"] * 4,
            hc_mult=4,
            o_groups=2,
            index_n_heads=2,
            index_topk=64,
            compress_rates={c: 4, h: 8},
            rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64),
        )
    else:
        cfg = dict(
            num_hidden_layers=5,
            layer_types=[s, c, c, h, c],
            mlp_layer_types=["hash_moe"] + ["moe"] * 4,
            hc_mult=3,
            hc_sinkhorn_iters=8,
            o_groups=1,
            index_n_heads=8,
            index_topk=2,
            scoring_func="sigmoid",
            routed_scaling_factor=2.0,
            swiglu_limit=0.3,
            compress_rates={c: 3, h: 5},
        )
    return T.DeepseekV4Config(**{**base, **cfg, **overrides})


def _deepseek_config(T, family: str, common: dict):
    """DeepSeek-V3 with the low-rank query path and interleaved rope, yarn with mscale / mscale_all_dim (both the
    cos / sin factor and the softmax scale differ from 1), 1 dense layer then 3 MoE ones: segments [D] x 1, [S] x 3;
    DeepSeek-V3 with q_proj, rope in the rotate-half layout and 2 dense layers; DeepSeek-V2 (softmax scores,
    group_limited_greedy) with q_proj, as V2-Lite."""
    yarn = dict(
        rope_type="yarn",
        rope_theta=10000.0,
        factor=4.0,
        original_max_position_embeddings=32,
        beta_fast=32.0,
        beta_slow=1.0,
    )
    if family == "deepseek_v3":
        return T.DeepseekV3Config(
            **common,
            q_lora_rank=24,
            first_k_dense_replace=1,
            n_shared_experts=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            rope_interleave=True,
            rope_parameters={**yarn, "mscale": 1.0, "mscale_all_dim": 0.8},
            architectures=["DeepseekV3ForCausalLM"],
        )
    if family == "deepseek_v3_qproj":
        return T.DeepseekV3Config(
            **common,
            q_lora_rank=None,
            first_k_dense_replace=2,
            n_shared_experts=2,
            routed_scaling_factor=1.5,
            norm_topk_prob=False,
            rope_interleave=False,
            rope_parameters={**yarn, "mscale": 0.9, "mscale_all_dim": 0.6},
            architectures=["DeepseekV3ForCausalLM"],
        )
    if family == "deepseek_v2":
        return T.DeepseekV2Config(
            **common,
            q_lora_rank=None,
            first_k_dense_replace=1,
            n_shared_experts=2,
            routed_scaling_factor=1.5,
            topk_method="group_limited_greedy",
            rope_parameters={**yarn, "mscale": 0.707, "mscale_all_dim": 0.707},
            architectures=["DeepseekV2ForCausalLM"],
        )
    if family == "glm4_moe_lite":  # GLM-4.7-Flash: V3's MLA and routing, a per-layer mlp_layer_types, plain rope
        return T.Glm4MoeLiteConfig(
            **common,
            q_lora_rank=20,
            mlp_layer_types=["dense", "sparse", "dense", "sparse"],
            n_shared_experts=1,
            routed_scaling_factor=1.8,
            norm_topk_prob=True,
            rope_interleave=True,
            architectures=["Glm4MoeLiteForCausalLM"],
        )
    raise ValueError(family)


def _dense_config(T, family: str, common: dict):
    """Configs of the dense families with other block shapes; None for another family."""
    if family == "gemma2":  # sandwich norms, 1 + w, GeGLU, soft-caps, query_pre_attn_scalar, S F S F
        return T.Gemma2Config(
            **{**common, "num_hidden_layers": 4},
            head_dim=12,
            query_pre_attn_scalar=10,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=4.0,
            sliding_window=4,
            layer_types=[S, F, S, F],
            architectures=["Gemma2ForCausalLM"],
        )
    if family == "gemma3":  # + q/k norm, local rope base on sliding layers, linear rope on global ones: [S S F] x 2
        ropes = {
            F: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
            S: {"rope_type": "default", "rope_theta": 10_000.0},
        }
        return T.Gemma3TextConfig(
            **{**common, "num_hidden_layers": 6},
            head_dim=12,
            query_pre_attn_scalar=12,
            sliding_window=4,
            layer_types=[S, S, F, S, S, F],
            rope_parameters=ropes,
            architectures=["Gemma3ForCausalLM"],
        )
    if family == "phi3":  # fused qkv / gate_up, longrope (long factors past 8 positions), partial rotary 0.6
        rope = {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0, 1.3, 2.1],
            "long_factor": [1.7, 3.1, 5.3],
            "partial_rotary_factor": 0.6,
            "original_max_position_embeddings": 8,
        }
        return T.Phi3Config(
            **{**common, "num_hidden_layers": 3},
            rope_parameters=rope,
            original_max_position_embeddings=8,
            architectures=["Phi3ForCausalLM"],
        )
    if family == "olmo2":  # norms after the sublayer, q/k norm over the whole projection
        return T.Olmo2Config(**{**common, "num_hidden_layers": 3}, architectures=["Olmo2ForCausalLM"])
    if family == "olmo3":  # + sliding-window layers: [S S S F]
        return T.Olmo3Config(
            **{**common, "num_hidden_layers": 4},
            sliding_window=4,
            layer_types=[S, S, S, F],
            architectures=["Olmo3ForCausalLM"],
        )
    if family == "granite":  # embedding, residual, attention multipliers and logits scaling
        return T.GraniteConfig(
            **{**common, "num_hidden_layers": 3},
            embedding_multiplier=3.0,
            residual_multiplier=0.4,
            attention_multiplier=0.07,
            logits_scaling=2.5,
            architectures=["GraniteForCausalLM"],
        )
    if family == "smollm3":  # NoPE layers, yarn rope: [R] x 2, [N R] x 2
        rope = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16, "rope_theta": 20000.0}
        return T.SmolLM3Config(
            **{**common, "num_hidden_layers": 6},
            no_rope_layers=[1, 1, 0, 1, 0, 1],
            rope_parameters=rope,
            architectures=["SmolLM3ForCausalLM"],
        )
    return None


def hf_model(family: str, seed: int = 0, **overrides):
    """A transformers model with every parameter random (norms and biases too), fp32, eager attention."""
    import torch
    import transformers as T

    torch.manual_seed(seed)
    cfg = hf_config(family, **overrides)
    cfg._attn_implementation = "eager"
    model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    centre = 0.0 if family.startswith("gemma") else 1.0  # Gemma's norms scale by 1 + w: w is centred at 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(centre + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3: shifts which experts are chosen
                buf.copy_(0.3 * torch.randn_like(buf))
            if name.endswith("tid2eid"):  # DeepSeek-V4's hash routing: distinct random experts per token id
                experts = cfg.n_routed_experts
                buf.copy_(torch.stack([torch.randperm(experts)[: buf.shape[1]] for _ in range(buf.shape[0])]))
    return model


def make_checkpoint(
    family: str, folder: Path, *, dtype: str = "float32", max_shard_size=None, seed: int = 0, **overrides
):
    """Write a checkpoint folder and return (folder, the fp32 transformers model after the same dtype cast)."""
    import torch

    model = hf_model(family, seed, **overrides)
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, **kwargs)
    if dtype != "float32":
        # a fresh fp32 model with the cast weights: .float() would keep bf16-rounded rotary buffers
        cast = {k: v.float() for k, v in model.state_dict().items()}
        model = hf_model(family, seed, **overrides)
        model.load_state_dict(cast)
    return Path(folder), model
