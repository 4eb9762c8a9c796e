"""Mixture-of-experts MLP: a top-k router and gated experts, dropless (every routed token is computed).

Parameters keep transformers 5's in-memory layout (PEFT's ``target_parameters`` layout for expert LoRA)::

    router.weight               [*stack, E, C]
    experts.gate_up_proj.weight [*stack, E, 2I, C]    gate rows first, then up
    experts.down_proj.weight    [*stack, E, C, I]

Three formulations compute the same function:

- ``dense`` (CPU, for calls where it computes fewer rows than ``blocked``: few tokens per expert, as in
  decoding): every expert runs on every token and the outputs are summed with the routing weights, zero for the
  experts a token did not choose. ``E / k`` times the routed FLOPs, in plain batched matmuls; ``jax.lax.ragged_dot``
  runs at a small fraction of XLA:CPU's matmul peak (``benchmarks/moe.py``).
- ``blocked`` (CPU): the (token, choice) pairs sorted by expert, each expert's rows padded to a multiple of
  ``BLOCK`` rows, and a loop over the blocks in use, each multiplied by its expert's weights: the routed FLOPs plus
  at most ``E * (BLOCK - 1)`` padding rows, at XLA:CPU's matmul speed (``benchmarks/moe.py``). The arrays have
  the static bound's number of blocks; the loop stops at the blocks in use.
- ``ragged`` (GPU / TPU): the (token, choice) pairs sorted by expert and multiplied with ``jax.lax.ragged_dot``,
  the routed FLOPs only.

``TX_MOE=dense``, ``TX_MOE=blocked`` or ``TX_MOE=ragged`` overrides the choice by backend.

Every call also returns :class:`RouterSums` over its real tokens: what the trainer reports (tokens per expert,
dropped tokens) and what the load-balancing loss needs (:func:`load_balancing_loss`, transformers'
``load_balancing_loss_func`` over the concatenated layers).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tx.models.config import BlockSpec, ModelConfig, MoEConfig
from tx.models.layers import MLP, Linear, _param, swiglu, swiglu_halves
from tx.models.matmul import acc32, einsum

_F32 = jnp.float32

# rows per block of the blocked formulation: a Qwen3-MoE-shaped LoRA step (benchmarks/step.py --model, 16 experts
# top-4, hidden 512, expert width 256) ran 1.01x PEFT's speed at 128, 1.03-1.11x at 64, 1.01-1.05x at 32, 0.87x at 16
BLOCK = 64
FORMULATIONS = ("dense", "blocked", "ragged")


def formulation(tokens: int | None = None, experts: int | None = None, top_k: int | None = None) -> str:
    """The expert formulation: ``TX_MOE`` if set, ``ragged`` off CPU; on CPU ``blocked``, or ``dense`` for a call
    of ``tokens`` tokens where that computes fewer rows (few tokens per expert: decoding, tiny batches)."""
    choice = os.environ.get("TX_MOE")
    if choice in FORMULATIONS:
        return choice
    if jax.default_backend() != "cpu":
        return "ragged"
    if tokens is not None and blocked_rows(tokens * top_k, experts, BLOCK) >= tokens * experts:
        return "dense"
    return "blocked"


def blocked_rows(pairs: int, experts: int, block: int) -> int:
    """Rows the blocked formulation lays out for ``pairs`` (token, choice) pairs: the static bound on the blocks in
    use (the loop computes only those)."""
    return (pairs + experts * (block - 1)) // block * block


class Blocks(NamedTuple):
    """The (token, choice) pairs laid out in blocks of one expert each: ``token [NB, B]`` the source row (T: a
    padding row), ``weight [NB, B]`` its routing weight (0 for padding), ``expert [NB]`` the block's expert,
    ``runs [E]`` each expert's number of blocks (in expert order; the blocks after them hold padding rows only)."""

    token: jax.Array
    weight: jax.Array
    expert: jax.Array
    runs: jax.Array


def plan_blocks(top_w: jax.Array, top_i: jax.Array, experts: int, block: int) -> Blocks:
    """Sort the pairs by expert and pad each expert's run of rows to a multiple of ``block``. The number of blocks
    is static: sum_e ceil(n_e / B) <= (T * k + E * (B - 1)) / B."""
    t, k = top_i.shape
    n = t * k
    flat = top_i.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    chosen = flat[order]
    sizes = jnp.bincount(flat, length=experts).astype(jnp.int32)
    padded = (sizes + block - 1) // block * block
    ends_p = jnp.cumsum(padded)
    starts_p, starts = ends_p - padded, jnp.cumsum(sizes) - sizes
    pos = starts_p[chosen] + jnp.arange(n, dtype=jnp.int32) - starts[chosen]
    nb = blocked_rows(n, experts, block) // block
    token = jnp.full((nb * block,), t, jnp.int32).at[pos].set((order // k).astype(jnp.int32))
    weight = jnp.zeros((nb * block,), top_w.dtype).at[pos].set(top_w.reshape(-1)[order])
    first_row = jnp.arange(nb, dtype=jnp.int32) * block
    expert = jnp.minimum(jnp.searchsorted(ends_p, first_row, side="right"), experts - 1).astype(jnp.int32)
    return Blocks(token.reshape(nb, block), weight.reshape(nb, block), expert, padded // block)


class RouterSums(NamedTuple):
    """Routing totals over real tokens, summed over the MoE layers: ``counts [E]`` choices per expert, ``probs [E]``
    router probabilities, ``tokens`` (token, layer) pairs, ``routed`` choices made (tokens x top_k)."""

    counts: jax.Array
    probs: jax.Array
    tokens: jax.Array
    routed: jax.Array

    @classmethod
    def zeros(cls, experts: int) -> RouterSums:
        z = jnp.zeros((), jnp.float32)
        return cls(jnp.zeros((experts,), jnp.float32), jnp.zeros((experts,), jnp.float32), z, z)

    def __add__(self, other: RouterSums) -> RouterSums:  # type: ignore[override]
        return RouterSums(*(a + b for a, b in zip(self, other)))


def load_balancing_loss(sums: RouterSums) -> jax.Array:
    """Switch-style auxiliary loss ``E * sum_e f_e * P_e`` (f: share of the choices per token, P: mean router
    probability), over every (token, MoE layer) pair as transformers computes it; 0 without tokens."""
    n = jnp.maximum(sums.tokens, 1.0)
    return sums.counts.shape[0] * jnp.sum((sums.counts / n) * (sums.probs / n))


def router_metrics(sums: RouterSums) -> dict[str, jax.Array]:
    """Scalars for the trainer's log: the busiest and idlest expert's share relative to an even split (1.0 = even),
    the load-balancing loss and the dropped choices (routed - computed; 0, the layer is dropless)."""
    mean = jnp.maximum(jnp.mean(sums.counts), 1e-9)
    return {
        "router_max_load": jnp.max(sums.counts) / mean,
        "router_min_load": jnp.min(sums.counts) / mean,
        "router_aux_loss": load_balancing_loss(sums),
        "router_dropped": sums.routed - jnp.sum(sums.counts),
    }


@jax.custom_vjp
def _block_matmul(weight: jax.Array, x: jax.Array, runs: jax.Array) -> jax.Array:
    """``y[n] = x[n] @ weight[e].T`` for the blocks in use, expert ``e``'s ``runs[e]`` blocks one after another in
    expert order; zero for the blocks after them (padding blocks).

    A loop over the experts, each slicing its weight in place once, and within it a loop over its blocks, each one
    matmul. The earlier batched form (every block's weight gathered into one ``[NB, out, in]`` stack, then one
    batched matmul) computed every block the static bound allows, ~20% of them padding at a Qwen3-MoE-like shape,
    and its gather ran at ~1.5 GB/s on XLA:CPU: the loop takes about half its time, forward + backward
    (benchmarks/moe.py). The backward pass loops the same way; the weight's gradient is accumulated per expert and
    removed by XLA when nothing uses it (LoRA).
    """
    return _block_matmul_fwd(weight, x, runs)[0]


def _expert_weight(weight: jax.Array, e, dtype) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(weight, e, 0, keepdims=False).astype(dtype)


def _block_matmul_fwd(weight, x, runs):
    starts = jnp.cumsum(runs) - runs

    def per_expert(e, y):
        w = _expert_weight(weight, e, x.dtype)

        def per_block(n, y):
            return jax.lax.dynamic_update_index_in_dim(y, acc32("bi,oi->bo", x[n], w, x.dtype), n, 0)

        return jax.lax.fori_loop(starts[e], starts[e] + runs[e], per_block, y)

    y = jax.lax.fori_loop(0, weight.shape[0], per_expert, jnp.zeros((*x.shape[:-1], weight.shape[-2]), x.dtype))
    return y, (weight, x, runs)


def _block_matmul_bwd(res, dy):
    weight, x, runs = res
    starts = jnp.cumsum(runs) - runs

    def per_expert(e, carry):
        dx, dw = carry
        w = _expert_weight(weight, e, x.dtype)

        def per_block(n, c):
            dx, dw_e = c
            dx = jax.lax.dynamic_update_index_in_dim(dx, acc32("bo,oi->bi", dy[n], w, x.dtype), n, 0)
            return dx, dw_e + acc32("bo,bi->oi", dy[n], x[n], _F32)

        dw_e = jnp.zeros(weight.shape[1:], _F32)
        dx, dw_e = jax.lax.fori_loop(starts[e], starts[e] + runs[e], per_block, (dx, dw_e))
        return dx, jax.lax.dynamic_update_index_in_dim(dw, dw_e, e, 0)

    dx, dw = jax.lax.fori_loop(0, weight.shape[0], per_expert, (jnp.zeros_like(x), jnp.zeros(weight.shape, _F32)))
    return dw.astype(weight.dtype), dx, None


_block_matmul.defvjp(_block_matmul_fwd, _block_matmul_bwd)


class ExpertLinear(nnx.Module):
    """Per-expert projections ``y_e = W_e x (+ b_e)``: ``weight [*stack, E, out, in]``, ``bias [*stack, E, out]``."""

    def __init__(self, experts: int, d_in: int, d_out: int, *, axes, bias=False, stack=(), dtype, rngs):
        lead = ("layers",) * len(stack)
        self.weight = _param(rngs, (*stack, experts, d_out, d_in), (*lead, "expert", axes[1], axes[0]), dtype)
        self.bias = _param(rngs, (*stack, experts, d_out), (*lead, "expert", axes[1]), dtype) if bias else None

    def dense(self, x: jax.Array) -> jax.Array:
        """x: [T, in] (every expert sees the token) or [T, E, in] -> [T, E, out]."""
        w = self.weight[...].astype(x.dtype)
        y = einsum("ti,eoi->teo", x, w) if x.ndim == 2 else einsum("tei,eoi->teo", x, w)
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)

    def blocked(self, x: jax.Array, expert: jax.Array, runs: jax.Array) -> jax.Array:
        """x: [NB, B, in], block ``n``'s rows for expert ``expert[n]``, expert ``e``'s ``runs[e]`` blocks in a row
        -> [NB, B, out] (zero in the padding blocks after them, before the bias)."""
        y = _block_matmul(self.weight[...], x, runs)
        return y if self.bias is None else y + jnp.take(self.bias[...], expert, axis=0).astype(y.dtype)[:, None]

    def ragged(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """x: [N, in] rows sorted by expert, ``group_sizes [E]`` rows each -> [N, out]."""
        w = jnp.swapaxes(self.weight[...].astype(x.dtype), -1, -2)
        y = jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32).astype(x.dtype)
        if self.bias is None:
            return y
        return y + jnp.repeat(self.bias[...].astype(y.dtype), group_sizes, axis=0, total_repeat_length=x.shape[0])


def clamped_swiglu(gate: jax.Array, up: jax.Array, alpha: float, limit: float) -> jax.Array:
    """gpt-oss's gated unit: ``(clip(up, -l, l) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, l)``."""
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
    return (up + 1) * (gate * jax.nn.sigmoid(gate * alpha))


class Experts(nnx.Module):
    """``E`` gated experts of width ``I``, fused as ``gate_up_proj`` and ``down_proj``.

    The gated unit is SiLU (Qwen-MoE, Mixtral; gate rows first, then up) or gpt-oss's clamped SwiGLU (gate and up
    rows interleaved, as its checkpoints store them), per :class:`~tx.models.config.MoEConfig`.
    """

    def __init__(self, moe: MoEConfig, hidden: int, *, stack=(), dtype, rngs):
        experts, width = moe.num_experts, moe.expert_size
        self.num_experts, self.width = experts, width
        self.activation, self.alpha, self.limit = moe.activation, moe.swiglu_alpha, moe.swiglu_limit
        bias = moe.expert_bias
        self.gate_up_proj = ExpertLinear(
            experts, hidden, 2 * width, axes=("fsdp", "tp"), bias=bias, stack=stack, dtype=dtype, rngs=rngs
        )
        self.down_proj = ExpertLinear(
            experts, width, hidden, axes=("tp", "fsdp"), bias=bias, stack=stack, dtype=dtype, rngs=rngs
        )

    def _gated(self, h: jax.Array) -> jax.Array:
        if self.activation == "clamped_swiglu":
            return clamped_swiglu(h[..., 0::2], h[..., 1::2], self.alpha, self.limit)
        if self.activation != "clamped_silu":
            return swiglu_halves(h)
        gate, up = h[..., : self.width], h[..., self.width :]  # DeepSeek-V4
        return swiglu(jnp.minimum(gate, self.limit), jnp.clip(up, -self.limit, self.limit))

    def dense(self, x: jax.Array, weights: jax.Array) -> jax.Array:
        """x: [T, C], weights [T, E] (0 for experts not chosen) -> [T, C]."""
        h = self.gate_up_proj.dense(x)
        y = self.down_proj.dense(self._gated(h))
        return einsum("te,tec->tc", weights.astype(y.dtype), y)

    def blocked(self, x: jax.Array, top_w: jax.Array, top_i: jax.Array) -> jax.Array:
        """x: [T, C], top_w / top_i: [T, k] chosen weights and experts -> [T, C] (see :func:`plan_blocks`)."""
        t, c = x.shape
        plan = plan_blocks(top_w, top_i, self.num_experts, BLOCK)
        xs = jnp.take(jnp.concatenate([x, jnp.zeros((1, c), x.dtype)]), plan.token, axis=0)  # [NB, B, C]
        h = self.gate_up_proj.blocked(xs, plan.expert, plan.runs)
        y = self.down_proj.blocked(self._gated(h), plan.expert, plan.runs) * plan.weight[..., None].astype(x.dtype)
        return jnp.zeros((t + 1, c), y.dtype).at[plan.token.reshape(-1)].add(y.reshape(-1, c))[:t]

    def ragged(self, x: jax.Array, top_w: jax.Array, top_i: jax.Array) -> jax.Array:
        """x: [T, C], top_w / top_i: [T, k] chosen weights and experts -> [T, C]."""
        t, k = top_i.shape
        flat = top_i.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        tokens = order // k
        group_sizes = jnp.bincount(flat, length=self.num_experts).astype(jnp.int32)
        xs = jnp.take(x, tokens, axis=0)
        h = self.gate_up_proj.ragged(xs, group_sizes)
        y = self.down_proj.ragged(self._gated(h), group_sizes)
        y = y * jnp.take(top_w.reshape(-1), order).astype(y.dtype)[:, None]
        return jnp.zeros((t, x.shape[-1]), y.dtype).at[tokens].add(y)


class MoE(nnx.Module):
    """Router + experts (+ Qwen2-MoE's gated shared expert, DeepSeek's ungated shared experts). ``__call__``:
    x [B, S, C] -> [B, S, C]. Routers: "softmax_topk", "topk_softmax", "grouped" (DeepSeek)."""

    def __init__(self, cfg: ModelConfig, spec: BlockSpec | None = None, *, stack=(), dtype, rngs):
        moe = cfg.moe
        c = cfg.hidden_size
        self.hash = spec is not None and spec.router == "hash"
        self.top_k, self.norm_topk_prob, self.num_experts = moe.top_k, moe.norm_topk_prob, moe.num_experts
        self.router_kind = moe.router
        self.router = Linear(
            c, moe.num_experts, bias=moe.router_bias, axes=("fsdp", None), stack=stack, dtype=dtype, rngs=rngs
        )
        self.moe = moe
        lead = ("layers",) * len(stack)
        if moe.correction_bias and not self.hash:  # DeepSeek's e_score_correction_bias: shifts the choice only
            self.score_correction_bias = _param(rngs, (*stack, moe.num_experts), (*lead, None), dtype, "zeros")
        else:
            self.score_correction_bias = None
        if self.hash:  # DeepSeek-V4's hash layers: the experts of a token id, tid2eid [vocab, k], fixed
            table = jnp.zeros((*stack, cfg.vocab_size, moe.top_k), jnp.int32)
            self.tid2eid = nnx.Param(table, axes=(*lead, None, None))
        self.experts = Experts(moe, c, stack=stack, dtype=dtype, rngs=rngs)
        shared = gate = None
        if moe.shared_expert_size:
            limit = moe.swiglu_limit if moe.activation == "clamped_silu" else None
            shared = MLP(cfg, width=moe.shared_expert_size, limit=limit, stack=stack, dtype=dtype, rngs=rngs)
            if moe.shared_expert_gate:  # Qwen2-MoE's sigmoid gate; DeepSeek's shared experts have none
                gate = Linear(c, 1, bias=False, axes=("fsdp", None), stack=stack, dtype=dtype, rngs=rngs)
        self.shared_expert, self.shared_expert_gate = shared, gate

    def route(self, x: jax.Array, ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x: [T, C] (ids [T]: the token ids, for hash routing) -> (router logits [T, E] fp32, chosen weights [T, k]
        in x's dtype, chosen experts [T, k])."""
        if self.router_kind == "grouped":
            return self._route_grouped(x)
        if self.router_kind == "v4":
            return self._route_v4(x, ids)
        logits = self.router(x).astype(jnp.float32)
        if self.router_kind == "topk_softmax":  # gpt-oss: the top-k logits, then a softmax over them
            top_logits, top_i = jax.lax.top_k(logits, self.top_k)
            return logits, jax.nn.softmax(top_logits, axis=-1).astype(x.dtype), top_i
        probs = jax.nn.softmax(logits, axis=-1)
        top_w, top_i = jax.lax.top_k(probs, self.top_k)
        if self.norm_topk_prob:
            top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
        return logits, top_w.astype(x.dtype), top_i

    def _route_grouped(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """DeepSeek's routing (see :class:`~tx.models.config.MoEConfig`), in fp32 as transformers computes it."""
        moe = self.moe
        logits = self.router(x.astype(jnp.float32)).astype(jnp.float32)
        scores = jax.nn.sigmoid(logits) if moe.scoring == "sigmoid" else jax.nn.softmax(logits, axis=-1)
        choice = scores
        if self.score_correction_bias is not None:
            choice = choice + self.score_correction_bias[...].astype(jnp.float32)
        if moe.topk_group < moe.n_group:
            t = choice.shape[0]
            grouped = choice.reshape(t, moe.n_group, moe.num_experts // moe.n_group)
            if moe.group_score == "max":
                group_scores = jnp.max(grouped, axis=-1)
            else:
                group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
            _, groups = jax.lax.top_k(group_scores, moe.topk_group)
            keep = jnp.zeros((t, moe.n_group), bool).at[jnp.arange(t)[:, None], groups].set(True)
            keep = jnp.repeat(keep, moe.num_experts // moe.n_group, axis=-1)
            choice = jnp.where(keep, choice, -jnp.inf)
        _, top_i = jax.lax.top_k(choice, self.top_k)
        top_w = jnp.take_along_axis(scores, top_i, axis=-1)
        if self.norm_topk_prob:
            top_w = top_w / (jnp.sum(top_w, axis=-1, keepdims=True) + 1e-20)
        top_w = top_w * moe.routed_scaling_factor
        return logits, top_w.astype(x.dtype), top_i

    def _route_v4(self, x: jax.Array, ids: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """DeepSeek-V4: scores of the fp32 logits, top-k of the scores plus the correction bias (hash layers: the
        token id's row of tid2eid), the chosen scores renormalised, times routed_scaling_factor."""
        moe = self.moe
        logits = self.router(x.astype(jnp.float32)).astype(jnp.float32)
        if moe.scoring == "sqrtsoftplus":
            scores = jnp.sqrt(jax.nn.softplus(logits))
        elif moe.scoring == "sigmoid":
            scores = jax.nn.sigmoid(logits)
        else:
            scores = jax.nn.softmax(logits, axis=-1)
        if self.hash:
            if ids is None:
                raise ValueError("a hash-routed MoE layer needs the token ids")
            top_i = jnp.take(self.tid2eid[...], ids.reshape(-1), axis=0).astype(jnp.int32)
        else:
            _, top_i = jax.lax.top_k(scores + self.score_correction_bias[...].astype(jnp.float32), self.top_k)
        top_w = jnp.take_along_axis(scores, top_i, axis=-1)
        top_w = top_w / (jnp.sum(top_w, axis=-1, keepdims=True) + 1e-20) * moe.routed_scaling_factor
        return logits, top_w.astype(x.dtype), top_i

    def __call__(
        self, x: jax.Array, tokens: jax.Array | None = None, ids: jax.Array | None = None
    ) -> tuple[jax.Array, RouterSums]:
        """x [B, S, C] (tokens: [B, S] bool, the real ones, None = all; ids [B, S]: the token ids, for hash routing)
        -> (out [B, S, C], this layer's sums)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits, top_w, top_i = self.route(flat, ids)
        kind = formulation(flat.shape[0], self.num_experts, self.top_k)
        if kind == "dense":
            weights = jnp.zeros((flat.shape[0], self.num_experts), top_w.dtype)
            weights = weights.at[jnp.arange(flat.shape[0])[:, None], top_i].add(top_w)  # add: a hash row may repeat
            out = self.experts.dense(flat, weights)
        elif kind == "blocked":
            out = self.experts.blocked(flat, top_w, top_i)
        else:
            out = self.experts.ragged(flat, top_w, top_i)
        if self.shared_expert_gate is not None:
            gate = jax.nn.sigmoid(self.shared_expert_gate(flat))
            out = out + gate * self.shared_expert(flat)
        elif self.shared_expert is not None:
            out = out + self.shared_expert(flat)
        real = jnp.ones((flat.shape[0],), jnp.float32) if tokens is None else tokens.reshape(-1).astype(jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1)
        sums = RouterSums(
            counts=jnp.einsum("t,tke->e", real, jax.nn.one_hot(top_i, self.num_experts, dtype=jnp.float32)),
            probs=jnp.einsum("t,te->e", real, probs),
            tokens=jnp.sum(real),
            routed=jnp.sum(real) * self.top_k,
        )
        return out.reshape(shape), sums
