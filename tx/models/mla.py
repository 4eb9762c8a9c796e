"""Multi-head latent attention (DeepSeek-V2 / V3), an attention part next to :class:`~tx.models.layers.Attention`.

Per token, keys and values come from one compressed latent ``c`` (``kv_lora_rank`` numbers) and one rope key
``k_rot`` (``qk_rope_head_dim`` numbers) shared by all heads::

    q            = q_proj(x)                 or  q_b_proj(rms(q_a_proj(x)))          [B, S, H, nope + rope]
    c, k_rot     = split(kv_a_proj_with_mqa(x));  c = rms(c)                          [B, S, L], [B, S, rope]
    k_nope, v    = split(kv_b_proj(c))                                                [B, T, H, nope], [B, T, H, Dv]
    k            = [k_nope, rope(k_rot) for every head];  q = [q_nope, rope(q_rot)]

The KV cache holds ``c`` and ``rope(k_rot)`` (kv_lora_rank + qk_rope_head_dim numbers per token and layer), and
decoding absorbs ``kv_b_proj`` into the query and the output (:meth:`MLAttention.absorbed`) instead of expanding
keys and values for every head. Parameters keep Hugging Face's module names, so LoRA and PEFT's layout find them as
they find the other linears.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tx.models.config import ModelConfig
from tx.models.layers import AttentionContext, Linear, RMSNorm, attend, masked_softmax, write_cache
from tx.models.matmul import einsum
from tx.models.rope import apply_rope

ABSORB = True  # decoding with kv_b_proj absorbed (MLAttention.absorbed); False: keys and values expanded from the cache
LATENT_NORM_EPS = 1e-6  # transformers builds q_a_layernorm / kv_a_layernorm with the RMSNorm default, not rms_norm_eps


def deinterleave(x: jax.Array) -> jax.Array:
    """Channels (x0, x1), (x2, x3), ... -> (x0, x2, ..., x1, x3, ...): DeepSeek's interleaved rope pairs in the
    rotate-half layout. Applied to queries and keys alike, it leaves every q . k unchanged."""
    return jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


class MLAttention(nnx.Module):
    """Causal multi-head latent attention; ``__call__`` as :class:`~tx.models.layers.Attention`'s, its cache is
    (latent [B, T, 1, L], rope key [B, T, 1, rope])."""

    def __init__(self, cfg: ModelConfig, *, stack=(), dtype, rngs):
        m = cfg.mla
        c, h = cfg.hidden_size, cfg.num_heads
        self.num_heads = h
        self.nope, self.rope = m.qk_nope_head_dim, m.qk_rope_head_dim
        self.latent, self.v_dim = m.kv_lora_rank, m.v_head_dim
        self.interleave = m.rope_interleave
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else m.qk_head_dim**-0.5
        lin = dict(stack=stack, dtype=dtype, rngs=rngs)
        qk = h * m.qk_head_dim
        if m.q_lora_rank:
            self.q_a_proj = Linear(c, m.q_lora_rank, bias=m.bias, axes=("fsdp", None), **lin)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, eps=LATENT_NORM_EPS, **lin)
            self.q_b_proj = Linear(m.q_lora_rank, qk, bias=False, axes=(None, "tp"), **lin)
        else:
            self.q_proj = Linear(c, qk, bias=False, axes=("fsdp", "tp"), **lin)
        latent, kv_b = m.kv_lora_rank, h * (m.qk_nope_head_dim + m.v_head_dim)
        self.kv_a_proj_with_mqa = Linear(c, latent + m.qk_rope_head_dim, bias=m.bias, axes=("fsdp", None), **lin)
        self.kv_a_layernorm = RMSNorm(latent, eps=LATENT_NORM_EPS, **lin)
        self.kv_b_proj = Linear(latent, kv_b, bias=False, axes=(None, "tp"), **lin)
        self.o_proj = Linear(h * m.v_head_dim, c, bias=m.bias, axes=("tp", "fsdp"), **lin)

    def queries(self, x: jax.Array) -> jax.Array:
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def __call__(self, x: jax.Array, ctx: AttentionContext, kv=None):
        """x: [B, S, C] -> ([B, S, C], (latent, rope key)); kv is this layer's cache or None."""
        b, s, _ = x.shape
        q = self.queries(x).reshape(b, s, self.num_heads, self.nope + self.rope)
        q_nope, q_rot = q[..., : self.nope], q[..., self.nope :]
        ckv = self.kv_a_proj_with_mqa(x)
        latent = self.kv_a_layernorm(ckv[..., : self.latent]).reshape(b, s, 1, self.latent)
        k_rot = ckv[..., self.latent :].reshape(b, s, 1, self.rope)
        if self.interleave:
            q_rot, k_rot = deinterleave(q_rot), deinterleave(k_rot)
        q_rot, k_rot = apply_rope(q_rot, ctx.cos, ctx.sin), apply_rope(k_rot, ctx.cos, ctx.sin)
        if kv is not None:
            kv = latent, k_rot = write_cache(kv, (latent, k_rot), ctx.cache_index)
        latent, k_rot = latent.astype(q.dtype), k_rot.astype(q.dtype)
        if kv is not None and ABSORB:
            out = self.absorbed(q_nope, q_rot, latent, k_rot, ctx.mask)
            return self.o_proj(out.reshape(b, s, -1)), kv
        t = latent.shape[1]
        expanded = self.kv_b_proj(latent[:, :, 0]).reshape(b, t, self.num_heads, self.nope + self.v_dim)
        k_nope, v = expanded[..., : self.nope], expanded[..., self.nope :]
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rot, (b, t, self.num_heads, self.rope))], axis=-1)
        q = jnp.concatenate([q_nope, q_rot], axis=-1)
        out = attend(q, k, v, ctx.mask, scale=self.scale)
        return self.o_proj(out.reshape(b, s, -1)), kv

    def absorbed(self, q_nope, q_rot, latent, k_rot, mask) -> jax.Array:
        """Attention on the latent cache with ``kv_b_proj`` absorbed (decoding): the query's no-rope part goes into
        latent space through each head's key block of ``kv_b_proj``, the scores are taken against the cached latent
        and rope key, and the probability-weighted latent comes out through each head's value block; keys and
        values for every head are never built. q_nope [B, S, H, nope], q_rot [B, S, H, rope], latent [B, T, 1, L],
        k_rot [B, T, 1, rope], mask [B, S, T] -> [B, S, H, Dv].

        The blocks are read by applying ``kv_b_proj`` to the identity, so an adapted (LoRA) ``kv_b_proj`` is
        absorbed with its delta, as its forward computes it."""
        dt = q_nope.dtype
        w = self.kv_b_proj(jnp.eye(self.latent, dtype=dt)).reshape(self.latent, self.num_heads, self.nope + self.v_dim)
        w_k, w_v = w[..., : self.nope], w[..., self.nope :]
        c, r = latent[:, :, 0], k_rot[:, :, 0]
        q_lat = einsum("bshd,lhd->bshl", q_nope, w_k)
        scores = einsum("bshl,btl->bhst", q_lat, c, jnp.float32) + einsum("bshr,btr->bhst", q_rot, r, jnp.float32)
        probs = masked_softmax(scores * self.scale, mask[:, None]).astype(dt)
        return einsum("bshl,lhd->bshd", einsum("bhst,btl->bshl", probs, c), w_v)


def cache_shapes(cfg: ModelConfig, batch: int, length: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of one layer's cache entries: (latent, rope key) for MLA, (keys, values) otherwise."""
    if cfg.mla is not None:
        return (batch, length, 1, cfg.mla.kv_lora_rank), (batch, length, 1, cfg.mla.qk_rope_head_dim)
    shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
    return shape, shape


def cache_numbers_per_token(cfg: ModelConfig) -> dict[str, int]:
    """Numbers cached per token and layer: "latent" (what tx caches for MLA: kv_lora_rank + qk_rope_head_dim) and
    "full" (keys and values expanded for every head, as a plain K/V cache would hold them)."""
    if cfg.mla is None:
        n = 2 * cfg.num_kv_heads * cfg.head_dim
        return {"latent": n, "full": n}
    m = cfg.mla
    return {
        "latent": m.kv_lora_rank + m.qk_rope_head_dim,
        "full": cfg.num_heads * (m.qk_head_dim + m.v_head_dim),
    }
