"""Mixture-of-experts MLP: a top-k router and gated experts, dropless (every routed token is computed).

Parameters keep transformers 5's in-memory layout (PEFT's ``target_parameters`` layout for expert LoRA)::

    router.weight               [*stack, E, C]
    experts.gate_up_proj.weight [*stack, E, 2I, C]    gate rows first, then up
    experts.down_proj.weight    [*stack, E, C, I]

Two formulations compute the same function:

- ``dense`` (CPU): every expert runs on every token and the outputs are summed with the routing weights, zero for
  the experts a token did not choose. ``E / k`` times the routed FLOPs, but plain batched matmuls, which XLA:CPU
  runs at its matmul peak; ``jax.lax.ragged_dot`` runs at a small fraction of it there (see
  ``benchmarks/moe.py``).
- ``ragged`` (GPU / TPU): the (token, choice) pairs sorted by expert and multiplied with ``jax.lax.ragged_dot``,
  the routed FLOPs only.

``TX_MOE=dense`` or ``TX_MOE=ragged`` overrides the choice by backend.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from tx.models.config import ModelConfig
from tx.models.layers import MLP, Linear, _param, swiglu
from tx.models.matmul import einsum


def formulation() -> str:
    choice = os.environ.get("TX_MOE")
    if choice in ("dense", "ragged"):
        return choice
    return "dense" if jax.default_backend() == "cpu" else "ragged"


class ExpertLinear(nnx.Module):
    """Per-expert projections ``y_e = W_e x`` with ``weight [*stack, E, out, in]``."""

    def __init__(self, experts: int, d_in: int, d_out: int, *, axes, stack=(), dtype, rngs):
        lead = ("layers",) * len(stack)
        self.weight = _param(rngs, (*stack, experts, d_out, d_in), (*lead, "expert", axes[1], axes[0]), dtype)

    def dense(self, x: jax.Array) -> jax.Array:
        """x: [T, in] (every expert sees the token) or [T, E, in] -> [T, E, out]."""
        w = self.weight[...].astype(x.dtype)
        if x.ndim == 2:
            return einsum("ti,eoi->teo", x, w)
        return einsum("tei,eoi->teo", x, w)

    def ragged(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """x: [N, in] rows sorted by expert, ``group_sizes [E]`` rows each -> [N, out]."""
        w = jnp.swapaxes(self.weight[...].astype(x.dtype), -1, -2)
        return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32).astype(x.dtype)


class Experts(nnx.Module):
    """``E`` gated SiLU experts of width ``I``, fused as ``gate_up_proj`` and ``down_proj``."""

    def __init__(self, experts: int, hidden: int, width: int, *, stack=(), dtype, rngs):
        self.num_experts, self.width = experts, width
        self.gate_up_proj = ExpertLinear(
            experts, hidden, 2 * width, axes=("fsdp", "tp"), stack=stack, dtype=dtype, rngs=rngs
        )
        self.down_proj = ExpertLinear(experts, width, hidden, axes=("tp", "fsdp"), stack=stack, dtype=dtype, rngs=rngs)

    def dense(self, x: jax.Array, weights: jax.Array) -> jax.Array:
        """x: [T, C], weights [T, E] (0 for experts not chosen) -> [T, C]."""
        h = self.gate_up_proj.dense(x)
        y = self.down_proj.dense(swiglu(h[..., : self.width], h[..., self.width :]))
        return einsum("te,tec->tc", weights.astype(y.dtype), y)

    def ragged(self, x: jax.Array, top_w: jax.Array, top_i: jax.Array) -> jax.Array:
        """x: [T, C], top_w / top_i: [T, k] chosen weights and experts -> [T, C]."""
        t, k = top_i.shape
        flat = top_i.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        tokens = order // k
        group_sizes = jnp.bincount(flat, length=self.num_experts).astype(jnp.int32)
        xs = jnp.take(x, tokens, axis=0)
        h = self.gate_up_proj.ragged(xs, group_sizes)
        y = self.down_proj.ragged(swiglu(h[:, : self.width], h[:, self.width :]), group_sizes)
        y = y * jnp.take(top_w.reshape(-1), order).astype(y.dtype)[:, None]
        return jnp.zeros((t, x.shape[-1]), y.dtype).at[tokens].add(y)


class MoE(nnx.Module):
    """Router + experts (+ Qwen2-MoE's gated shared expert). ``__call__``: x [B, S, C] -> [B, S, C]."""

    def __init__(self, cfg: ModelConfig, *, stack=(), dtype, rngs):
        moe = cfg.moe
        c = cfg.hidden_size
        self.top_k, self.norm_topk_prob, self.num_experts = moe.top_k, moe.norm_topk_prob, moe.num_experts
        self.router = Linear(c, moe.num_experts, bias=False, axes=("fsdp", None), stack=stack, dtype=dtype, rngs=rngs)
        self.experts = Experts(moe.num_experts, c, moe.expert_size, stack=stack, dtype=dtype, rngs=rngs)
        if moe.shared_expert_size:
            self.shared_expert = MLP(cfg, width=moe.shared_expert_size, stack=stack, dtype=dtype, rngs=rngs)
            self.shared_expert_gate = Linear(c, 1, bias=False, axes=("fsdp", None), stack=stack, dtype=dtype, rngs=rngs)
        else:
            self.shared_expert = self.shared_expert_gate = None

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x: [T, C] -> (router logits [T, E] fp32, chosen weights [T, k] in x's dtype, chosen experts [T, k])."""
        logits = self.router(x).astype(jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1)
        top_w, top_i = jax.lax.top_k(probs, self.top_k)
        if self.norm_topk_prob:
            top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
        return logits, top_w.astype(x.dtype), top_i

    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        _, top_w, top_i = self.route(flat)
        if formulation() == "dense":
            weights = jnp.zeros((flat.shape[0], self.num_experts), top_w.dtype)
            weights = weights.at[jnp.arange(flat.shape[0])[:, None], top_i].set(top_w)
            out = self.experts.dense(flat, weights)
        else:
            out = self.experts.ragged(flat, top_w, top_i)
        if self.shared_expert is not None:
            gate = jax.nn.sigmoid(self.shared_expert_gate(flat))
            out = out + gate * self.shared_expert(flat)
        return out.reshape(shape)
