"""Loaded checkpoints compute transformers' logits (fp32, max abs diff <= 1e-4)."""

import numpy as np
import pytest
import torch
from fixtures_models import FAMILY_NAMES, make_checkpoint

import tx

TOL = 1e-4


def hf_logits(model, ids, mask=None):
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(ids), **kw).logits.float().numpy()


def batch(vocab, b=2, s=12, seed=0):
    return np.random.default_rng(seed).integers(3, vocab, size=(b, s)).astype(np.int32)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_logits_match_transformers(checkpoints, family):
    folder, ref = checkpoints[family]
    model = tx.load_model(folder)
    ids = batch(model.config.vocab_size)
    got = np.asarray(model(ids))
    want = hf_logits(ref, ids)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= TOL, np.abs(got - want).max()
    assert np.abs(want).max() > 0.5  # the comparison is not between near-zero numbers


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches(checkpoints, family, side):
    folder, ref = checkpoints[family]
    model = tx.load_model(folder)
    ids = batch(model.config.vocab_size, b=3, s=10, seed=1)
    mask = np.ones_like(ids)
    for row, pad in ((1, 3), (2, 6)):
        if side == "left":
            mask[row, :pad] = 0
        else:
            mask[row, ids.shape[1] - pad :] = 0
    got = np.asarray(model(ids, attention_mask=mask))
    want = hf_logits(ref, ids, mask)
    valid = mask.astype(bool)
    assert np.abs(got - want)[valid].max() <= TOL
    assert np.isfinite(got).all()
    # a padded row equals the same tokens run alone without padding
    row = 2
    alone = np.asarray(model(ids[row : row + 1, valid[row]]))[0]
    np.testing.assert_allclose(got[row][valid[row]], alone, atol=TOL)


def test_bf16_checkpoint_loads(tmp_path):
    folder, ref = make_checkpoint("qwen3", tmp_path / "bf16", dtype="bfloat16")
    model = tx.load_model(folder)  # bf16 on disk, fp32 in tx
    ids = batch(model.config.vocab_size)
    assert np.abs(np.asarray(model(ids)) - hf_logits(ref, ids)).max() <= TOL


def test_sharded_checkpoint_equals_single_file(checkpoints, tmp_path):
    folder, _ = checkpoints["llama"]
    sharded, _ = make_checkpoint("llama", tmp_path / "sharded", max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    a, b = tx.load_model(folder), tx.load_model(sharded)
    ids = batch(a.config.vocab_size)
    np.testing.assert_array_equal(np.asarray(a(ids)), np.asarray(b(ids)))


def test_bf16_compute_close_to_fp32(checkpoints):
    folder, ref = checkpoints["qwen3"]
    model = tx.load_model(folder, dtype="bfloat16")
    ids = batch(model.config.vocab_size)
    got = np.asarray(model(ids)).astype(np.float32)
    want = hf_logits(ref, ids)
    # bf16 has an 8-bit mantissa: relative error ~2^-8 per op, a few ops deep
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()
