"""Comparing tx with transformers / PEFT on padded batches: the batch, both models' logits, random LoRA."""

import copy

import jax.numpy as jnp
import numpy as np
import torch

from tx.adapters.attach import lora_modules


def padded_batch(vocab, seed=0, length=11, right=4):
    """Three rows: full, left-padded (3), right-padded (the last ``right``)."""
    ids = np.random.default_rng(seed).integers(3, vocab, size=(3, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, length - right :] = 0
    return ids, mask


def hf_masked(model, ids, mask):
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()


def tx_logits(model, ids, mask=None):
    from flax import nnx

    @nnx.jit
    def f(model, ids, mask):
        return model(ids, attention_mask=mask)

    mask = np.ones_like(ids) if mask is None else mask
    return np.asarray(f(model, jnp.asarray(ids), jnp.asarray(mask)))


def max_diff(a, b, mask):
    """Largest difference over the real (unpadded) positions."""
    return float(np.abs(a - b)[mask.astype(bool)].max())


def randomize_lora(model, seed=1, std=0.2):
    """LoRA B matrices random (B = 0 at init makes every adapter a no-op, which proves nothing)."""
    rng = np.random.default_rng(seed)
    for _, m in lora_modules(model):
        m.lora_b.set_value(jnp.asarray(rng.normal(0, std, m.lora_b.shape), jnp.float32))


def peft_copy(ref, folder=None, config=None):
    """A PEFT model over a copy of ``ref``: an adapter folder loaded, or a new adapter of ``config``."""
    import peft

    base = copy.deepcopy(ref)
    if folder is not None:
        return peft.PeftModel.from_pretrained(base, folder).eval()
    return peft.get_peft_model(base, config).eval()


def greedy_full(model, prompt, n):
    """Greedy continuation of ``prompt`` by ``n`` tokens, each from a full forward pass (no cache)."""
    ids = list(prompt)
    for _ in range(n):
        logits = np.asarray(model(np.asarray([ids], np.int32)))[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt) :]
