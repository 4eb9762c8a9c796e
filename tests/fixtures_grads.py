"""Adapter gradients of a model on a packed batch, for tests that compare two ways of computing the same model."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from tx.adapters.connector import ConnectorParam
from tx.adapters.lora import LoRAParam
from tx.train.loss import model_loss_sum


def packed_batch(vocab, rows=2, seq=16, seed=0):
    """Next-token batch of random ids: two packed documents in the second row, padding at the end of the first."""
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


def move_adapters(model, seed=0, size=0.05):
    """Add N(0, size^2) noise to every LoRA and connector variable, so that every gradient path is exercised
    (at init B = 0 and the connector gates are 0). The same seed moves identical models identically."""
    i = 0
    for _, v in nnx.iter_graph(model):
        if isinstance(v, (LoRAParam, ConnectorParam)):
            i += 1
            noise = size * jax.random.normal(jax.random.key(seed * 1000 + i), v.shape, jax.numpy.float32)
            v.set_value(v[...] + noise.astype(v.dtype))


def adapter_grads(model, b):
    """(summed token loss, (LoRA grads, connector grads)) in one jitted call."""
    graphdef, lora, conn, rest = nnx.split(model, LoRAParam, ConnectorParam, ...)

    def loss(lora, conn):
        return model_loss_sum(nnx.merge(graphdef, lora, conn, rest, copy=True), b)[0]

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(lora, conn)
