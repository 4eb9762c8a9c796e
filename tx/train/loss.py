"""Next-token cross-entropy that never materialises fp32 logits for the whole batch.

The final hidden states are cut into chunks of tokens; each chunk is projected to the vocabulary,
reduced to (logsumexp - target logit) in fp32 and, when there is more than one chunk, rematerialised
in the backward pass. Peak logits memory is ``chunk x vocab`` instead of ``batch x seq x vocab``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_sum(hidden, targets, weights, project, chunk: int = 2048):
    """Sum over tokens of weights * -log p(target), and the sum of weights.

    hidden: [B, S, C]; targets: [B, S] int; weights: [B, S] (the loss mask); project: [N, C] -> [N, V].
    """
    c = hidden.shape[-1]
    h = hidden.reshape(-1, c)
    t = targets.reshape(-1)
    w = weights.reshape(-1).astype(jnp.float32)
    n = h.shape[0]
    chunk = max(1, min(chunk, n))
    pad = (-n) % chunk
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        t = jnp.pad(t, (0, pad))
        w = jnp.pad(w, (0, pad))
    k = h.shape[0] // chunk

    def chunk_loss(h, t, w):
        logits = project(h).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        return jnp.sum((lse - target) * w)

    if k == 1:  # one chunk: its logits are the peak either way, so keep them instead of recomputing the projection
        total = chunk_loss(h, t, w)
    else:
        chunk_loss = jax.checkpoint(chunk_loss)

        def body(acc, xs):
            return acc + chunk_loss(*xs), None

        total, _ = jax.lax.scan(
            body, jnp.zeros((), jnp.float32), (h.reshape(k, chunk, c), t.reshape(k, chunk), w.reshape(k, chunk))
        )
    return total, jnp.sum(w)


def model_loss_sum(model, batch, chunk: int = 2048):
    """(sum of token losses, number of loss tokens) of a tx model on a batch from :mod:`tx.train.data`."""
    hidden, _ = model.hidden_states(
        batch["input_ids"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids")
    )
    return cross_entropy_sum(hidden, batch["targets"], batch["loss_mask"], model.project, chunk)
