"""Unrolled layers (``scan_layers=False``) compute what the scanned stack computes: logits, train steps, generation."""

import jax
import numpy as np
import pytest
from fixtures_grads import adapter_grads, move_adapters, packed_batch

import tx
from tx.generate import generate_ids
from tx.train.trainer import TrainConfig, Trainer


def adapted(folder, kind="mhc", dropout=0.1):
    model = tx.load_model(folder)
    tx.attach(
        model,
        lora=tx.LoRAConfig(rank=4, alpha=8, dropout=dropout, seed=1),
        connector=tx.ConnectorConfig(expansion_rate=2, kind=kind),
    )
    return model


# The scan (tx.models.layer_scan: a written-out backward pass; with dropout, its keys advance per layer) against
# the unrolled layers' plain autodiff.
@pytest.mark.parametrize(("kind", "dropout"), [("mhc", 0.1), ("dynamic", 0.1), ("mhc", 0.0)])
def test_gradients_and_train_steps_match_scanned(checkpoints, kind, dropout):
    folder, ref = checkpoints["qwen3"]
    b = packed_batch(ref.config.vocab_size)
    grads, losses = [], []
    for scan in (True, False):
        model = adapted(folder, kind, dropout)
        move_adapters(model)
        model.scan_layers = scan
        grads.append(adapter_grads(model, b))
        trainer = Trainer(
            model, TrainConfig(steps=3, lr=1e-3, batch_size=2, seq_len=16, scan_layers=scan, progress=False)
        )
        assert model.scan_layers is scan
        losses.append([float(trainer.step(b)["loss"]) for _ in range(3)])  # dropout keys advance alike in both
    (loss_s, g_s), (loss_u, g_u) = grads
    assert abs(float(loss_u) - float(loss_s)) < 1e-5 * abs(float(loss_s))
    leaves_s, leaves_u = jax.tree.leaves(g_s), jax.tree.leaves(g_u)
    assert len(leaves_s) == len(leaves_u) > 0
    # same arithmetic in a different program: equal up to fp32 reassociation by XLA, whose error scales with the
    # largest gradient (sums of per-token terms; measured max diff ~1e-6 x the largest, a wrong layer gives ~1e-1)
    atol = 3e-6 * max(float(np.abs(a).max()) for a in leaves_s)
    for a, c in zip(leaves_s, leaves_u):
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-4, atol=atol)
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    assert losses[0][2] < losses[0][0]  # the steps did move the adapters


def test_logits_and_generation_match_scanned(checkpoints):
    folder, ref = checkpoints["llama"]
    model = tx.load_model(folder)
    ids = np.asarray([[5, 17, 33, 8, 60, 9, 11, 2]], np.int32)
    scanned = np.asarray(model(ids))
    prompts = [[5, 17, 33, 8, 60, 9, 11], [44, 12, 7]]
    want = generate_ids(model, prompts, 6)
    model.scan_layers = False
    np.testing.assert_allclose(np.asarray(model(ids)), scanned, atol=1e-5)
    assert generate_ids(model, prompts, 6) == want


def test_remat_gives_the_same_gradients(checkpoints):
    # TrainConfig(remat=True): each layer recomputed in the backward pass, inside the written-out layer scan
    folder, ref = checkpoints["qwen3"]
    b = packed_batch(ref.config.vocab_size)
    out = []
    for remat in (False, True):
        model = tx.load_model(folder)
        tx.attach(model, lora=tx.LoRAConfig(rank=4, alpha=8, seed=1), connector=tx.ConnectorConfig(expansion_rate=2))
        move_adapters(model)
        model.remat = remat
        out.append(adapter_grads(model, b))
    (loss_a, g_a), (loss_b, g_b) = out
    assert abs(float(loss_a) - float(loss_b)) < 1e-5 * abs(float(loss_a))
    atol = 3e-6 * max(float(np.abs(a).max()) for a in jax.tree.leaves(g_a))  # as in the test above
    for a, c in zip(jax.tree.leaves(g_a), jax.tree.leaves(g_b), strict=True):
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-4, atol=atol)
