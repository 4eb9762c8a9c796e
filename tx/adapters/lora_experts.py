"""LoRA on a stacked expert tensor: ``W_e + s * B_e A_e`` for every expert ``e``, as PEFT's ``target_parameters``.

:class:`LoRAExperts` wraps a :class:`~tx.models.moe.ExpertLinear` (``weight [*stack, E, out, in]``) with fp32
:class:`~tx.adapters.lora.LoRAParam` matrices::

    lora_a [*stack, E, r, in]      random at init (PEFT's init of its ``lora_A`` Linear(in, r * E))
    lora_b [*stack, E, out, r]     zero at init: the adapted model equals the base model exactly

PEFT keeps one ``lora_A.weight [r * E, in]`` and one ``lora_B.weight [out, r * E]`` per expert tensor; the expert
axis is the slow one of A's rows and the fast one of B's columns (:func:`to_peft`, :func:`from_peft`). Dropout is
not applied to expert tensors (PEFT cannot apply it to a parameter either).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tx.adapters.lora import LoRAMask, LoRAParam, _place_like, init_lora_a
from tx.errors import ConfigError
from tx.models.matmul import einsum
from tx.models.moe import ExpertLinear

_F32 = jnp.float32


class LoRAExperts(nnx.Module):
    """An :class:`~tx.models.moe.ExpertLinear` plus a low-rank delta per expert (see the module docstring)."""

    def __init__(self, base: ExpertLinear, *, name: str, rank: int, scale: float, key, init="default", mask=None):
        self.base = base
        self.name = name
        self.rank = rank
        self.scale = float(scale)
        self.enabled = True
        weight = base.weight
        stack, (experts, d_out, d_in) = weight.shape[:-3], weight.shape[-3:]
        w_axes = weight.get_metadata().get("axes") or (None,) * weight.ndim
        lead, e_axis, out_axis, in_axis = tuple(w_axes[:-3]), w_axes[-3], w_axes[-2], w_axes[-1]
        a_axes, b_axes = (*lead, e_axis, "lora", in_axis), (*lead, e_axis, out_axis, "lora")
        a = init_lora_a(key, (*stack, experts, rank, d_in), init)
        b = jnp.zeros((*stack, experts, d_out, rank), _F32)
        self.lora_a = LoRAParam(_place_like(a, weight[...], a_axes), axes=a_axes)
        self.lora_b = LoRAParam(_place_like(b, weight[...], b_axes), axes=b_axes)
        if mask is not None and not np.all(mask == 1):
            mask = np.asarray(mask, np.float32)
            if mask.shape != tuple(stack):
                raise ConfigError(f"LoRA layer mask has shape {mask.shape}, expected {tuple(stack)}")
            self.lora_mask = LoRAMask(jnp.asarray(mask), axes=lead)
        else:
            self.lora_mask = None
        self.dropout_key = None

    @property
    def layer_mask(self) -> np.ndarray:
        if self.lora_mask is None:
            return np.ones(self.base.weight.shape[:-3], np.float32)
        return np.asarray(self.lora_mask[...], np.float32)

    def _scale(self, dtype) -> jax.Array:
        scale = self.scale if self.lora_mask is None else self.scale * self.lora_mask[...]
        return jnp.asarray(scale, _F32).astype(dtype)

    def delta_weight(self) -> jax.Array:
        """``s * m * B_e A_e`` in fp32, [*stack, E, out, in]."""
        delta = jnp.einsum(
            "...eor,...eri->...eoi", self.lora_b[...], self.lora_a[...], precision=jax.lax.Precision.HIGHEST
        )
        return delta * (self.scale * jnp.asarray(self.layer_mask))[..., None, None, None]

    def dense(self, x: jax.Array) -> jax.Array:
        y = self.base.dense(x)
        if not self.enabled:
            return y
        a, b = self.lora_a[...].astype(x.dtype), self.lora_b[...].astype(x.dtype)
        h = einsum("ti,eri->ter", x, a) if x.ndim == 2 else einsum("tei,eri->ter", x, a)
        return y + einsum("ter,eor->teo", h * self._scale(x.dtype), b).astype(y.dtype)

    def blocked(self, x: jax.Array, expert: jax.Array, runs: jax.Array) -> jax.Array:
        y = self.base.blocked(x, expert, runs)
        if not self.enabled:
            return y
        a = jnp.take(self.lora_a[...], expert, axis=0).astype(x.dtype)  # [NB, r, in]
        # B gathered as [NB, r, out]: its gradient is then a [NB, r, out] product, which XLA:CPU runs ~4x faster
        # than the [NB, out, r] one (a rank-wide minor dimension), measured in benchmarks/profile_step.py
        b = jnp.take(jnp.swapaxes(self.lora_b[...], -1, -2), expert, axis=0).astype(x.dtype)  # [NB, r, out]
        h = einsum("nbi,nri->nbr", x, a)
        return y + einsum("nbr,nro->nbo", h * self._scale(x.dtype), b).astype(y.dtype)

    def ragged(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
        y = self.base.ragged(x, group_sizes)
        if not self.enabled:
            return y
        a = jnp.swapaxes(self.lora_a[...].astype(x.dtype), -1, -2)  # [E, in, r]
        b = jnp.swapaxes(self.lora_b[...].astype(x.dtype), -1, -2)  # [E, r, out]
        h = jax.lax.ragged_dot(x, a, group_sizes, preferred_element_type=_F32).astype(x.dtype)
        d = jax.lax.ragged_dot(h * self._scale(x.dtype), b, group_sizes, preferred_element_type=_F32)
        return y + d.astype(y.dtype)


def merge_experts(lora: LoRAExperts) -> ExpertLinear:
    """Fold the deltas into the expert weights (fp32, then the weight's dtype); returns the base ExpertLinear."""
    weight = lora.base.weight
    weight.set_value((weight[...].astype(_F32) + lora.delta_weight()).astype(weight.dtype))
    return lora.base


def to_peft(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One layer's ``a [E, r, in]``, ``b [E, out, r]`` -> PEFT's ``lora_A [r * E, in]``, ``lora_B [out, r * E]``."""
    e, r, d_in = a.shape
    return a.reshape(e * r, d_in), np.ascontiguousarray(b.transpose(1, 2, 0)).reshape(b.shape[1], r * e)


def a_from_peft(lora_a: np.ndarray, experts: int) -> np.ndarray:
    """PEFT's ``lora_A [r * E, in]`` -> tx's ``[E, r, in]`` (the inverse of :func:`to_peft`)."""
    return lora_a.reshape(experts, lora_a.shape[0] // experts, lora_a.shape[1])


def b_from_peft(lora_b: np.ndarray, experts: int) -> np.ndarray:
    """PEFT's ``lora_B [out, r * E]`` -> tx's ``[E, out, r]`` (the inverse of :func:`to_peft`)."""
    return np.ascontiguousarray(lora_b.reshape(lora_b.shape[0], lora_b.shape[1] // experts, experts).transpose(2, 0, 1))
