"""Generation with the KV cache equals greedy decoding by full recomputation and transformers' greedy output."""

import numpy as np
import pytest
import torch
from fixtures_compare import greedy_full

import tx
from tx.generate import generate_ids


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_cached_greedy_matches_recompute_and_transformers(checkpoints, family):
    folder, ref = checkpoints[family]
    model = tx.load_model(folder)
    prompts = [[5, 17, 33, 8, 60, 9, 11], [44, 12, 7]]
    got = generate_ids(model, prompts, 8)
    for p, g in zip(prompts, got):
        assert g == greedy_full(model, p, 8)
        with torch.no_grad():
            hf = ref.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[
                0, len(p) :
            ].tolist()
        assert g == hf


def test_sampling_is_seeded(checkpoints):
    model = tx.load_model(checkpoints["llama"][0])
    a = generate_ids(model, [[5, 6, 7]], 6, temperature=1.0, top_p=0.9, seed=3)
    b = generate_ids(model, [[5, 6, 7]], 6, temperature=1.0, top_p=0.9, seed=3)
    c = generate_ids(model, [[5, 6, 7]], 6, temperature=1.0, top_p=0.9, seed=4)
    assert a == b and a != c


def test_stops_at_eos_and_rejects_too_long(checkpoints):
    model = tx.load_model(checkpoints["llama"][0])
    first = generate_ids(model, [[5, 6, 7]], 3)[0]
    assert generate_ids(model, [[5, 6, 7]], 3, eos_ids=[first[0]])[0] == [first[0]]
    with pytest.raises(tx.errors.ConfigError, match="exceeds the model's context"):
        generate_ids(model, [[5] * 10], 300)


def test_generation_ignores_lora_dropout_and_keeps_the_mode(checkpoints):
    """A model in training mode with LoRA dropout generates as in eval mode (dropout off), and stays in its mode."""
    model = tx.load_model(checkpoints["llama"][0])
    tx.attach(model, lora=tx.LoRAConfig(rank=4, alpha=8, dropout=0.5))
    lora = model.layers.attn.q_proj
    lora.lora_b.set_value(0.5 * np.random.default_rng(0).standard_normal(lora.lora_b.shape).astype(np.float32))
    assert lora.deterministic is False
    got = generate_ids(model, [[5, 17, 33, 8], [44, 12, 7]], 6)
    assert lora.deterministic is False  # unchanged by generate
    model.eval()
    assert got == generate_ids(model, [[5, 17, 33, 8], [44, 12, 7]], 6)
    # the same logits a dropout-free forward gives: greedy by full recomputation in eval mode
    assert got[0] == greedy_full(model, [5, 17, 33, 8], 6)
    model.train()
    with_dropout = np.asarray(model(np.asarray([[5, 17, 33, 8]], np.int32)))
    model.eval()
    assert not np.allclose(with_dropout, np.asarray(model(np.asarray([[5, 17, 33, 8]], np.int32))))  # dropout is live
