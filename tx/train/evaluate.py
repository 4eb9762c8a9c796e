"""Evaluation loss of a model (adapters included) over a dataset's eval batches."""

from __future__ import annotations

from functools import partial

import jax
from flax import nnx

from tx.train.loss import model_loss_sum


@partial(jax.jit, static_argnums=(0,))
def _loss_sum(graphdef, state, batch):
    model = nnx.merge(graphdef, state)
    model.eval()
    return model_loss_sum(model, batch)


def eval_loss(model, data, max_batches: int | None = None) -> float:
    """Mean token loss over ``data.eval_batches()`` (every row once, fixed order)."""
    graphdef, state = nnx.split(model)
    total = count = 0.0
    for i, batch in enumerate(data.eval_batches()):
        if max_batches is not None and i >= max_batches:
            break
        s, n = _loss_sum(graphdef, state, batch)
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)
