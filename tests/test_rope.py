"""Rope kinds (tx/models/rope.py) against transformers' ROPE_INIT_FUNCTIONS and rotary embedding modules.

Tolerances (fp32): inverse frequencies 1e-6 relative; cos / sin tables 1e-5 absolute at positions up to 40
(rounding of ``position * inv_freq`` in fp32 near 40 rad is ~4e-6); attention factors 1e-6 relative.
"""

import numpy as np
import pytest
import torch

from tx.errors import ConfigError
from tx.models.config import parse_config
from tx.models.rope import apply_rope, inv_freq, parse_rope, rope_tables

HEAD_DIM = 16
BASE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)

CASES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 3.0, "rope_theta": 10000.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
        "rope_theta": 500000.0,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "rope_theta": 10000.0},
    "yarn_mscale": {
        "rope_type": "yarn",
        "factor": 4.0,
        "mscale": 0.7,
        "mscale_all_dim": 0.9,
        "beta_fast": 16,
        "beta_slow": 2,
        "original_max_position_embeddings": 8,
        "rope_theta": 10000.0,
    },
    "yarn_untruncated": {
        "rope_type": "yarn",
        "factor": 3.0,
        "truncate": False,
        "original_max_position_embeddings": 8,
        "rope_theta": 10000.0,
    },
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    "longrope": {
        "rope_type": "longrope",
        "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
        "long_factor": [1.2, 1.9, 2.7, 3.5, 4.4, 5.2, 6.3, 7.0],
        "original_max_position_embeddings": 8,
        "rope_theta": 10000.0,
    },
}


def llama_config(params: dict, **extra):
    import transformers as T

    return T.LlamaConfig(**BASE, **extra, rope_parameters=dict(params), architectures=["LlamaForCausalLM"])


def tx_rope(hf_cfg):
    data = hf_cfg.to_dict()
    return parse_rope(data["rope_parameters"], data, HEAD_DIM, "config.json")


@pytest.mark.parametrize("case", CASES)
def test_inv_freq_and_attention_factor_match_transformers(case):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = llama_config(CASES[case])
    rope = tx_rope(hf_cfg)
    kind = CASES[case]["rope_type"]
    if kind == "default":
        want, factor = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)), 1.0
    else:
        want, factor = ROPE_INIT_FUNCTIONS[kind](hf_cfg, "cpu")
    np.testing.assert_allclose(np.asarray(inv_freq(rope, HEAD_DIM)), want.numpy(), rtol=1e-6)
    assert rope.attention_factor == pytest.approx(factor, rel=1e-6)
    if kind in ("dynamic", "longrope"):  # past the length the kind switches at
        for seq_len in (9, 33, 40):
            want, _ = ROPE_INIT_FUNCTIONS[kind](hf_cfg, "cpu", seq_len=seq_len)
            got = inv_freq(rope, HEAD_DIM, np.int32(seq_len))
            np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-6)


def hf_tables(module, positions):
    x = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = module(x, torch.tensor(positions))
    return cos.numpy(), sin.numpy()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("length", [6, 40])  # within and past max_position_embeddings / the original length
def test_tables_match_rotary_embedding_module(case, length):
    """cos / sin of transformers' rotary module in a forward (its dynamic / longrope switch included)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf_cfg = llama_config(CASES[case])
    positions = np.stack([np.arange(length), np.maximum(np.arange(length) - 3, 0)]).astype(np.int64)
    want_cos, want_sin = hf_tables(LlamaRotaryEmbedding(hf_cfg), positions)
    cos, sin = rope_tables(tx_rope(hf_cfg), HEAD_DIM, positions.astype(np.int32))
    np.testing.assert_allclose(np.asarray(cos), want_cos, atol=1e-5)
    np.testing.assert_allclose(np.asarray(sin), want_sin, atol=1e-5)


@pytest.mark.parametrize("kind", ["default", "longrope"])
def test_partial_rotary_matches_phi3(kind):
    """Phi-3's partial rotary: only the first rotary_dim channels of each head turn; the rest pass through."""
    import transformers as T
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding, apply_rotary_pos_emb

    params = {"rope_type": kind, "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    if kind == "longrope":
        params.update(short_factor=[1.0, 1.5, 2.0, 3.0], long_factor=[2.0, 3.0, 5.0, 7.0])
        params["original_max_position_embeddings"] = 8
    hf_cfg = T.Phi3Config(**BASE, rope_parameters=params, original_max_position_embeddings=8)
    rope = tx_rope(hf_cfg)
    assert rope.dim(HEAD_DIM) == 8
    positions = np.arange(12)[None].astype(np.int64)
    cos_t, sin_t = Phi3RotaryEmbedding(hf_cfg)(torch.zeros(1), torch.tensor(positions))
    q = torch.randn(1, 4, 12, HEAD_DIM, generator=torch.Generator().manual_seed(0))
    want, _ = apply_rotary_pos_emb(q, q, cos_t, sin_t)
    cos, sin = rope_tables(rope, HEAD_DIM, positions.astype(np.int32))
    got = apply_rope(np.asarray(q.permute(0, 2, 1, 3)), cos, sin)
    np.testing.assert_allclose(np.asarray(got), want.permute(0, 2, 1, 3).numpy(), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got)[..., 8:], q.permute(0, 2, 1, 3).numpy()[..., 8:])


def test_bad_rope_and_activation_name_key_value_and_supported():
    data = dict(
        architectures=["LlamaForCausalLM"],
        vocab_size=10,
        hidden_size=16,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    with pytest.raises(ConfigError, match=r"rope_type 'ntk_by_parts' is not supported; supported: default, linear"):
        parse_config({**data, "rope_parameters": {"rope_type": "ntk_by_parts", "rope_theta": 1e4}})
    with pytest.raises(ConfigError, match=r"hidden_act 'relu' is not supported; supported: silu, swish, gelu_pytorch"):
        parse_config({**data, "hidden_act": "relu"})
    gemma = {**data, "architectures": ["Gemma2ForCausalLM"], "hidden_activation": "quick_gelu"}
    with pytest.raises(ConfigError, match=r"hidden_activation 'quick_gelu' is not supported"):
        parse_config(gemma)
    with pytest.raises(ConfigError, match=r"longrope 'long_factor' must be a list of 4 numbers"):
        params = {"rope_type": "longrope", "short_factor": [1] * 4, "long_factor": [1] * 3}
        parse_config({**data, "original_max_position_embeddings": 4, "rope_parameters": params})
