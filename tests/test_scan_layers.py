"""Unrolled layers (``scan_layers=False``) compute what the scanned stack computes: logits, train steps, generation."""

import jax
import numpy as np
import pytest
from flax import nnx

import tx
from tx.adapters.connector import ConnectorParam
from tx.adapters.lora import LoRAParam
from tx.generate import generate_ids
from tx.train.loss import model_loss_sum
from tx.train.trainer import TrainConfig, Trainer


def adapted(folder, kind="mhc"):
    model = tx.load_model(folder)
    tx.attach(
        model,
        lora=tx.LoRAConfig(rank=4, alpha=8, dropout=0.1, seed=1),
        connector=tx.ConnectorConfig(expansion_rate=2, kind=kind),
    )
    return model


def batch(vocab, rows=2, seq=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(rows, seq + 1)).astype(np.int32)
    segments = np.ones((rows, seq), np.int32)
    segments[1, seq // 2 :] = 2  # two packed documents in the second row
    segments[0, -3:] = 0  # padding
    return {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "loss_mask": (segments > 0).astype(np.float32),
        "segment_ids": segments,
    }


def adapter_grads(model, b):
    """Gradient of the summed token loss with respect to LoRA and connector state, one jitted call."""
    graphdef, lora, conn, rest = nnx.split(model, LoRAParam, ConnectorParam, ...)

    def loss(lora, conn):
        return model_loss_sum(nnx.merge(graphdef, lora, conn, rest, copy=True), b)[0]

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(lora, conn)


@pytest.mark.parametrize("kind", ["mhc", "dynamic"])
def test_gradients_and_train_steps_match_scanned(checkpoints, kind):
    folder, ref = checkpoints["qwen3"]
    b = batch(ref.config.vocab_size)
    grads, losses = [], []
    for scan in (True, False):
        model = adapted(folder, kind)
        # move the adapters off their init (B = 0, gates = 0) so every gradient path is exercised
        for path, v in nnx.iter_graph(model):
            if isinstance(v, (LoRAParam, ConnectorParam)):
                key = jax.random.key(abs(hash(path)) % 2**31)
                v.set_value(v[...] + 0.05 * jax.random.normal(key, v.shape, v.dtype))
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
