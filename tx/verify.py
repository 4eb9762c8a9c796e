"""Identity check: the adapted model must compute what the base model computes until training moves it."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from tx.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class IdentityReport:
    """Max |logits(adapted) - logits(base)| over real (non-padding) tokens, against ``tolerance * max |logits|``."""

    max_abs_diff: float
    max_abs_logit: float
    tolerance: float
    num_tokens: int
    dtype: str

    @property
    def relative_diff(self) -> float:
        return self.max_abs_diff / max(self.max_abs_logit, 1e-30)

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance * self.max_abs_logit

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (
            f"identity check ({self.num_tokens} tokens, {self.dtype}): max |dlogits| = {self.max_abs_diff:.3e}, "
            f"max |logits| = {self.max_abs_logit:.3e}, relative {self.relative_diff:.3e} "
            f"(tolerance {self.tolerance:.0e}): {verdict}"
        )


def default_tolerance(dtype) -> float:
    """1e-6 relative in fp32 (the issue's bound); bf16/fp16 carry 8/11 mantissa bits, so 2^-7 ~ 8e-3 per op
    compounds over layers: 5e-2 relative is the bound used there."""
    return 1e-6 if jnp.dtype(dtype) == jnp.float32 else 5e-2


def pad_batch(sequences, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad a list of token-id lists; returns (ids [B, S], mask [B, S])."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ConfigError("verify_identity needs at least one non-empty sequence of token ids")
    n = max(len(s) for s in sequences)
    ids = np.full((len(sequences), n), pad_id, np.int32)
    mask = np.zeros((len(sequences), n), np.int32)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def verify_identity(model, input_ids, attention_mask=None, *, tolerance: float | None = None) -> IdentityReport:
    """Run ``model`` with its adapters disabled and enabled on the same tokens and compare the logits.

    input_ids: [B, S] array or a list of token-id lists (right-padded here). Passes when
    max |diff| <= tolerance * max |logits| (default 1e-6 in fp32, 5e-2 in bf16).
    """
    from tx.adapters.attach import adapters_disabled

    if isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], (list, tuple, np.ndarray)):
        input_ids, mask = pad_batch([list(s) for s in input_ids])
        attention_mask = mask if attention_mask is None else attention_mask
    ids = np.asarray(input_ids, np.int32)
    if ids.ndim == 1:
        ids = ids[None]
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask).reshape(ids.shape)
    vocab = model.config.vocab_size
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        bad = int(ids.max() if ids.max() >= vocab else ids.min())
        raise ConfigError(
            f"token id {bad} is outside the model's vocabulary (vocab_size {vocab}); is the tokenizer the model's? "
            "Pass the checkpoint's own tokenizer (or ids below vocab_size)"
        )
    with adapters_disabled(model):
        base = np.asarray(model(ids, attention_mask=mask), np.float32)
    adapted = np.asarray(model(ids, attention_mask=mask), np.float32)
    valid = mask.astype(bool)
    diff = float(np.abs(adapted - base)[valid].max())
    top = float(np.abs(base)[valid].max())
    tol = default_tolerance(model.dtype) if tolerance is None else tolerance
    return IdentityReport(diff, top, tol, int(valid.sum()), str(jnp.dtype(model.dtype)))
