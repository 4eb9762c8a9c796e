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

    hidden: [B, S, C]; targets: [B, S] int; weights: [B, S] (the loss mask); ``project(h, dtype)``: [N, C] ->
    [N, V] logits in that dtype (fp32 here).
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
        return token_losses_sum(project(h, jnp.float32), t, w)

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


@jax.custom_vjp
def token_losses_sum(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """``sum(weights * (logsumexp(logits) - logits[target]))`` over tokens; logits [N, V] fp32, targets [N] int.

    The backward pass is one elementwise expression, ``(softmax - onehot(target)) * weight``, from the saved
    exponentials; autodiff builds the one-hot part with a scatter, which keeps XLA from fusing it with the
    softmax part and with the cast that a bf16 LM head's gradient matmul wants (three more passes over [N, V]).
    """
    return _token_losses_fwd(logits, targets, weights)[0]


def _token_losses_fwd(logits, targets, weights):
    peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    exp = jnp.exp(logits - peak)
    total = jnp.sum(exp, axis=-1, keepdims=True)
    lse = jnp.log(total) + peak
    target = jnp.take_along_axis(logits, targets[:, None], axis=-1)
    return jnp.sum((lse - target)[:, 0] * weights), (exp, total, targets, weights)


def _token_losses_bwd(res, g):
    exp, total, targets, weights = res
    wg = (weights * g)[:, None]
    p = exp * (wg / total)  # softmax * weight; a select, not a subtracted one-hot: XLA:CPU vectorises it (4x)
    dlogits = jnp.where(jnp.arange(exp.shape[-1], dtype=targets.dtype) == targets[:, None], p - wg, p)
    return dlogits, None, None  # targets are integers; weights (the loss mask) are data, never trained


token_losses_sum.defvjp(_token_losses_fwd, _token_losses_bwd)


def model_loss_sum(model, batch, chunk: int = 2048):
    """(sum of token losses, number of loss tokens) of a tx model on a batch from :mod:`tx.train.data`."""
    total, count, _ = model_loss_terms(model, batch, chunk)
    return total, count


def model_loss_terms(model, batch, chunk: int = 2048):
    """(sum of token losses, number of loss tokens, routing totals of the MoE layers or None)."""
    hidden, _, router = model.forward(
        batch["input_ids"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids")
    )
    total, count = cross_entropy_sum(hidden, batch["targets"], batch["loss_mask"], model.project, chunk)
    return total, count, router
