"""DeepSeek-V4's attention part: one shared key/value head, sliding window, and compressed long-range entries.

Per token (``D = head_dim``, ``R`` rope channels at the end of each head, rotated as interleaved pairs)::

    q_res = rms(q_a_proj(x));  q = rms_unweighted(q_b_proj(q_res)) per head;  q = rope(q)      [B, S, H, D]
    kv    = rope(rms(kv_proj(x)))                                   one head, read as key and as value [B, S, D]
    out   = softmax-with-sinks(q . [kv | entries]) @ [kv | entries];  out = rope^-1(out)      [B, S, H, D]
    y     = o_b_proj(o_a_proj(out in o_groups groups))                                          grouped low rank

Every layer attends to the keys of its sliding window. An HCA layer ("heavily compressed") adds one entry per
``hca_rate`` tokens: the window's ``kv_proj`` rows pooled with a softmax over ``gate_proj + position_bias``, then
normalised and rotated at the window's first position; a query sees the entries of the windows it has passed. A CSA
layer ("compressed sparse") pools overlapping windows (each entry mixes the previous window's first half-width series
with its own second one, ``2 * csa_rate`` slots), and the Lightning indexer (its own smaller compressor, queries from
``q_res`` and per-head weights) keeps the ``index_topk`` best-scored entries per query.

Parameters keep transformers' in-memory module names (``compressor.indexer.scorer.weights_proj``, ...), so LoRA and
PEFT's layout find them as they find the other linears; ``o_a_proj`` is a grouped (block-diagonal) projection, not a
linear layer, and takes no LoRA (PEFT's LoRA cannot wrap it either: its forward is per group).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tx.models.config import BlockSpec, ModelConfig
from tx.models.layers import NEG_INF, AttentionContext, Linear, RMSNorm, _param, attend_einsum, write_cache
from tx.models.matmul import einsum
from tx.models.rope import rope_tables

_F32 = jnp.float32


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Interleaved rope on the trailing ``2 * cos.shape[-1]`` channels of ``x``: pair ``(x[2i], x[2i+1])`` turns by
    the angle of ``cos[i]`` / ``sin[i]`` (one per pair, broadcast against ``x[..., :R/2]``), in fp32."""
    r = 2 * cos.shape[-1]
    rest, rope = x[..., :-r], x[..., -r:]
    even, odd = rope[..., 0::2].astype(_F32), rope[..., 1::2].astype(_F32)
    turned = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1).reshape(rope.shape)
    return jnp.concatenate([rest, turned.astype(x.dtype)], axis=-1)


def half_tables(cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
    """tx's rope tables ``[..., R]`` (``[freqs, freqs]``) -> one entry per pair ``[..., R/2]``."""
    r = cos.shape[-1] // 2
    return cos[..., :r], sin[..., :r]


def unweighted_rms(x: jax.Array, eps: float) -> jax.Array:
    """``x / rms(x)`` over the last axis (fp32 statistics, the scale cast to x's dtype), no learned scale."""
    scale = jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(_F32)), axis=-1, keepdims=True) + eps)
    return x * scale.astype(x.dtype)


class GroupedLinear(nnx.Module):
    """Block-diagonal projection: ``weight [*stack, groups * d_out, d_in]`` (HF layout; group ``k`` owns rows
    ``k * d_out .. (k + 1) * d_out``); x ``[B, S, groups, d_in]`` -> ``[B, S, groups, d_out]``."""

    def __init__(self, d_in: int, d_out_total: int, groups: int, *, stack=(), dtype, rngs):
        lead = ("layers",) * len(stack)
        self.weight = _param(rngs, (*stack, d_out_total, d_in), (*lead, "tp", None), dtype)
        self.groups = groups

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.weight[...].astype(x.dtype)
        w = w.reshape(self.groups, w.shape[0] // self.groups, w.shape[1])
        return einsum("bsgi,gdi->bsgd", x, w)


class Compressor(nnx.Module):
    """Pools every ``rate`` tokens into one entry of ``dim`` numbers (``overlap``: CSA's two series, each entry over
    the previous window's first series and its own second one)."""

    def __init__(self, c: int, dim: int, rate: int, overlap: bool, eps: float, *, stack=(), dtype, rngs):
        lead = ("layers",) * len(stack)
        width = 2 * dim if overlap else dim
        lin = dict(bias=False, axes=("fsdp", None), stack=stack, dtype=dtype, rngs=rngs)
        self.kv_proj = Linear(c, width, **lin)
        self.gate_proj = Linear(c, width, **lin)
        self.position_bias = _param(rngs, (*stack, rate, width), (*lead, None, None), dtype, "zeros")
        self.kv_norm = RMSNorm(dim, eps=eps, stack=stack, dtype=dtype, rngs=rngs)
        self.dim, self.rate, self.overlap = dim, rate, overlap

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, S, C] -> the rows every entry is pooled from: (kv_proj(x), gate_proj(x)), each [B, S, width]; what
        the generation cache keeps per token."""
        return self.kv_proj(x), self.gate_proj(x)

    def entries(self, kv: jax.Array, gate: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """Projected rows [B, L, width] -> [B, L // rate, dim], each entry rotated by ``cos`` / ``sin``
        [1, L // rate, R/2] (its window's first position); a trailing part window makes no entry."""
        b, s, _ = kv.shape
        m, d = self.rate, self.dim
        w = s // m
        kv = kv[:, : w * m].reshape(b, w, m, -1)
        gate = gate[:, : w * m].reshape(b, w, m, -1) + self.position_bias[...].astype(gate.dtype)
        if self.overlap:  # slots [previous window's series a | this window's series b]; window 0 has no previous
            pad = ((0, 0), (1, 0), (0, 0), (0, 0))
            kv = jnp.concatenate([jnp.pad(kv[:, :-1, :, :d], pad), kv[..., d:]], axis=2)
            gate = jnp.concatenate([jnp.pad(gate[:, :-1, :, :d], pad, constant_values=NEG_INF), gate[..., d:]], axis=2)
        weights = jax.nn.softmax(gate.astype(_F32), axis=2)
        pooled = jnp.sum(kv.astype(_F32) * weights, axis=2).astype(kv.dtype)
        return rotate(self.kv_norm(pooled), cos, sin)


class Scorer(nnx.Module):
    def __init__(self, c: int, heads: int, *, stack=(), dtype, rngs):
        self.weights_proj = Linear(c, heads, bias=False, axes=("fsdp", None), stack=stack, dtype=dtype, rngs=rngs)


class Indexer(Compressor):
    """The Lightning indexer of a CSA layer: its own compressed keys, queries from the low-rank query ``q_res``;
    entry ``w``'s score for a query is ``sum_h weight_h relu(q_h . key_w) / sqrt(dim)``, weights from
    ``scorer.weights_proj(x) / sqrt(heads)``."""

    def __init__(self, cfg: ModelConfig, *, stack=(), dtype, rngs):
        v = cfg.compressed
        kw = dict(stack=stack, dtype=dtype, rngs=rngs)
        super().__init__(cfg.hidden_size, v.index_head_dim, v.csa_rate, True, cfg.rms_norm_eps, **kw)
        self.heads, self.topk = v.index_heads, v.index_topk
        self.q_b_proj = Linear(v.q_lora_rank, v.index_heads * v.index_head_dim, bias=False, axes=(None, "tp"), **kw)
        self.scorer = Scorer(cfg.hidden_size, v.index_heads, **kw)

    def select(self, x, q_res, rows, visible, cos_c, sin_c, cos_q, sin_q) -> jax.Array:
        """Boolean [B, S, W]: the top ``index_topk`` of the entries ``visible`` to each query; ``rows``: this
        indexer's projected rows the entries pool (:meth:`project`, of the whole sequence or the cache)."""
        b, s, _ = x.shape
        keys = self.entries(*rows, cos_c, sin_c)  # [B, W, dim]
        q = self.q_b_proj(q_res).reshape(b, s, self.heads, self.dim)
        q = rotate(q, cos_q[:, :, None], sin_q[:, :, None])
        scores = jax.nn.relu(einsum("bshd,bwd->bshw", q, keys, _F32)) * self.dim**-0.5
        weights = self.scorer.weights_proj(x).astype(_F32) * self.heads**-0.5
        total = jnp.where(visible, jnp.einsum("bshw,bsh->bsw", scores, weights), -jnp.inf)
        w = keys.shape[1]
        if self.topk >= w:
            return visible
        _, top = jax.lax.top_k(jax.lax.stop_gradient(total), self.topk)
        chosen = (
            jnp.zeros((b, s, w), bool).at[jnp.arange(b)[:, None, None], jnp.arange(s)[None, :, None], top].set(True)
        )
        return chosen & visible


class CompressedAttention(nnx.Module):
    """DeepSeek-V4's attention (see the module docstring); ``__call__`` as :class:`~tx.models.layers.Attention`'s."""

    def __init__(self, cfg: ModelConfig, spec: BlockSpec, *, stack=(), dtype, rngs):
        v = cfg.compressed
        c, h, d = cfg.hidden_size, cfg.num_heads, v.head_dim
        kw = dict(stack=stack, dtype=dtype, rngs=rngs)
        lead = ("layers",) * len(stack)
        self.num_heads, self.head_dim, self.groups = h, d, v.o_groups
        self.eps = cfg.rms_norm_eps
        self.q_a_proj = Linear(c, v.q_lora_rank, bias=False, axes=("fsdp", None), **kw)
        self.q_a_norm = RMSNorm(v.q_lora_rank, eps=cfg.rms_norm_eps, **kw)
        self.q_b_proj = Linear(v.q_lora_rank, h * d, bias=False, axes=(None, "tp"), **kw)
        self.kv_proj = Linear(c, d, bias=False, axes=("fsdp", None), **kw)
        self.kv_norm = RMSNorm(d, eps=cfg.rms_norm_eps, **kw)
        self.o_a_proj = GroupedLinear(h * d // v.o_groups, v.o_groups * v.o_lora_rank, v.o_groups, **kw)
        self.o_b_proj = Linear(v.o_groups * v.o_lora_rank, c, bias=False, axes=("tp", "fsdp"), **kw)
        self.sinks = _param(rngs, (*stack, h), (*lead, "tp"), dtype, "zeros")
        self.kind = spec.attn
        if spec.attn == "csa":
            self.compressor = Compressor(c, d, v.csa_rate, True, cfg.rms_norm_eps, **kw)
            self.compressor.indexer = Indexer(cfg, **kw)
        elif spec.attn == "hca":
            self.compressor = Compressor(c, d, v.hca_rate, False, cfg.rms_norm_eps, **kw)
        else:
            self.compressor = None
        self.compress_rope = cfg.rope_for("compress") if self.compressor is not None else None
        self.rope_head_dim = cfg.head_dim

    def __call__(self, x: jax.Array, ctx: AttentionContext, kv=None):
        """x: [B, S, C] -> ([B, S, C], this layer's cache). ``ctx.positions`` [B, S] place the queries.

        The cache (:func:`cache_shapes`) holds per slot the rotated key and, on CSA / HCA layers, the rows the
        compressor (and the indexer) pool: decoding pools the entries from them again, so every entry equals the
        full forward's; a slot is a position, so a cached sequence starts at slot 0 (no left padding)."""
        b, s, _ = x.shape
        h, d = self.num_heads, self.head_dim
        cos, sin = half_tables(ctx.cos, ctx.sin)  # this layer's rope ("main" or "compress")
        q_res = self.q_a_norm(self.q_a_proj(x))
        q = unweighted_rms(self.q_b_proj(q_res).reshape(b, s, h, d), self.eps)
        q = rotate(q, cos[:, :, None], sin[:, :, None])
        keys = rotate(self.kv_norm(self.kv_proj(x)), cos, sin)[:, :, None]  # [B, S, 1, D]
        rows = ()
        if self.compressor is not None:
            rows = self.compressor.project(x)
            if self.kind == "csa":
                rows += self.compressor.indexer.project(x)
        if kv is not None:
            kv = write_cache(kv, (keys, *rows), ctx.cache_index)
            keys, rows = kv[0].astype(q.dtype), tuple(r.astype(q.dtype) for r in kv[1:])
        mask = ctx.mask
        length = keys.shape[1]
        if self.compressor is not None and length >= self.compressor.rate:
            rate = self.compressor.rate
            w = length // rate
            cos_c, sin_c = half_tables(*rope_tables(self.compress_rope, self.rope_head_dim, jnp.arange(w)[None] * rate))
            entries = self.compressor.entries(*rows[:2], cos_c, sin_c)  # [B, W, D]
            visible = jnp.arange(w)[None, None, :] < ((ctx.positions + 1) // rate)[..., None]  # windows passed
            if self.kind == "csa":
                visible = self.compressor.indexer.select(x, q_res, rows[2:], visible, cos_c, sin_c, cos, sin)
            keys = jnp.concatenate([keys, entries[:, :, None]], axis=1)
            mask = jnp.concatenate([mask, visible], axis=-1)
        out = attend_einsum(q, keys, keys, mask, scale=d**-0.5, sinks=self.sinks[...])
        out = rotate(out, cos[:, :, None], -sin[:, :, None])  # undo the rotation the values carried
        out = self.o_a_proj(out.reshape(b, s, self.groups, h * d // self.groups))
        return self.o_b_proj(out.reshape(b, s, -1)), kv


def cache_shapes(cfg: ModelConfig, spec: BlockSpec, batch: int, length: int) -> tuple[tuple[int, ...], ...]:
    """One layer's cache entries: the rotated key [B, T, 1, D]; CSA / HCA add the compressor's kv and gate rows
    [B, T, width] (CSA: and the indexer's)."""
    v = cfg.compressed
    shapes = [(batch, length, 1, v.head_dim)]
    if spec.attn == "hca":
        shapes += [(batch, length, v.head_dim)] * 2
    elif spec.attn == "csa":
        shapes += [(batch, length, 2 * v.head_dim)] * 2 + [(batch, length, 2 * v.index_head_dim)] * 2
    return tuple(shapes)
