"""The GPU/TPU attention path (jax.nn.dot_product_attention) computes what the CPU path computes, and with it the
model still computes transformers' logits. On this CPU machine the fused path runs XLA's implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tx
import tx.models.layers as layers
from tx.models.decoder import attention_mask_matrix


def inputs(dtype=jnp.float32, b=2, s=7, h=4, k=2, d=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, s, h, d), dtype)
    kk = jax.random.normal(keys[1], (b, s, k, d), dtype)
    v = jax.random.normal(keys[2], (b, s, k, d), dtype)
    idx = jnp.arange(s)
    valid = jnp.ones((b, s), bool).at[1, :2].set(False)  # left padding in row 1
    segments = jnp.ones((b, s), jnp.int32).at[0, 4:].set(2)  # two packed documents in row 0
    mask = attention_mask_matrix(idx, idx, valid, segments, segments, window=5)
    return q, kk, v, mask, valid


def test_fused_equals_einsum_fp32_values_and_gradients():
    q, k, v, mask, valid = inputs()
    w = jax.random.normal(jax.random.key(9), q.shape)

    def loss(f, q, k, v):
        out = f(q, k, v, mask)
        return jnp.sum(jnp.where(valid[:, :, None, None], out * w, 0.0))

    fused = lambda q, k, v, m: layers.attend_fused(q, k, v, m, implementation="xla")  # noqa: E731
    got = fused(q, k, v, mask)
    want = layers.attend_einsum(q, k, v, mask)
    rows = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=1e-6)
    g_got = jax.grad(lambda *a: loss(fused, *a), argnums=(0, 1, 2))(q, k, v)
    g_want = jax.grad(lambda *a: loss(layers.attend_einsum, *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_got, g_want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    assert float(jnp.abs(g_want[1]).max()) > 0.1  # the gradients compared are not all zero


def test_fused_bf16_close_to_fp32():
    q, k, v, mask, valid = inputs(jnp.bfloat16)
    got = layers.attend_fused(q, k, v, mask, implementation="xla").astype(jnp.float32)
    want = layers.attend_einsum(*(a.astype(jnp.float32) for a in (q, k, v)), mask)
    rows = np.asarray(valid)
    # bf16 keeps 8 bits of mantissa: outputs of size ~1 carry errors of ~1e-2
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=3e-2)


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_model_with_fused_attention_matches_transformers(checkpoints, family, monkeypatch):
    folder, ref = checkpoints[family]

    def fused(q, k, v, m, scale=None, softcap=None, sinks=None):
        assert softcap is None and sinks is None  # these families have neither
        return layers.attend_fused(q, k, v, m, implementation="xla", scale=scale)

    monkeypatch.setattr(layers, "attend", fused)
    model = tx.load_model(folder)
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, size=(2, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    got = np.asarray(model(ids, attention_mask=mask))
    with torch.no_grad():
        want = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()
    assert np.abs(got - want)[mask.astype(bool)].max() <= 1e-4
