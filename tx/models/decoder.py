"""One decoder for every dense family: blocks stacked on a layer axis, run with ``jax.lax.scan`` or unrolled.

Each block calls a *residual* module around attention and around the MLP::

    x = self.attn_residual(x, lambda h: self.attn(self.attn_norm(h)))

The plain residual is ``x + f(x)``. Adapters (tx.adapters) swap these modules for connectors and the
model's ``streams`` edges for expand / reduce; the model code does not know about them.

``model.scan_layers`` (default True) picks how the stacked layers run. The scan compiles one layer whatever
the depth. Without a KV cache it is :func:`tx.models.layer_scan.scan`, whose backward pass stores each layer's
residuals itself (bf16 ones as raw bits: XLA:CPU would move them through fp32); decoding moves the weights and
the cache as bits too. Unrolled (False), compilation grows with the depth but a train step on CPU is ~7% (fp32) to
~12% (bf16) faster at 8 layers: a scan writes every saved activation into [layers, ...] buffers and slices
each layer's weights out with dynamic slices (see ``benchmarks/step.py``, ``lora+unrolled``). All compute the
same.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tx.models import layer_scan
from tx.models.config import ModelConfig
from tx.models.layers import MLP, Attention, AttentionContext, Embed, Linear, RMSNorm, rope_inv_freq, rope_tables
from tx.models.matmul import einsum


class Residual(nnx.Module):
    """The plain residual connection h <- h + f(h)."""

    def __call__(self, x: jax.Array, f) -> jax.Array:
        return x + f(x)


class Streams(nnx.Module):
    """Model edges of the residual stream; plain models have one stream, so both are the identity."""

    def expand(self, h: jax.Array) -> jax.Array:
        return h

    def reduce(self, x: jax.Array) -> jax.Array:
        return x


class Block(nnx.Module):
    """Pre-norm decoder block: attention then gated MLP, each inside a residual module."""

    def __init__(self, cfg: ModelConfig, *, stack=(), dtype, rngs):
        eps = cfg.rms_norm_eps
        self.attn_norm = RMSNorm(cfg.hidden_size, eps=eps, stack=stack, dtype=dtype, rngs=rngs)
        self.attn = Attention(cfg, stack=stack, dtype=dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, eps=eps, stack=stack, dtype=dtype, rngs=rngs)
        self.mlp = MLP(cfg, stack=stack, dtype=dtype, rngs=rngs)
        self.attn_residual = Residual()
        self.mlp_residual = Residual()

    def __call__(self, x: jax.Array, ctx: AttentionContext, kv=None):
        new_kv = []

        def attn_fn(h):
            out, kv_out = self.attn(self.attn_norm(h), ctx, kv)
            new_kv.append(kv_out)
            return out

        x = self.attn_residual(x, attn_fn)
        x = self.mlp_residual(x, lambda h: self.mlp(self.mlp_norm(h)))
        return x, new_kv[0]


class KVCache(NamedTuple):
    """Stacked KV cache: k, v [L, B, T, K, D]; valid [B, T] marks written, non-padding slots; index: next slot."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array

    @classmethod
    def create(cls, cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> KVCache:
        shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
        zeros = jnp.zeros(shape, dtype)
        return cls(zeros, zeros, jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32))


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids that count only real tokens (left padding starts at 0 on the first real token)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def attention_mask_matrix(q_index, k_index, k_valid, q_segment=None, k_segment=None, window=None):
    """Boolean [B, S, T]: causal by absolute index, keys valid, same segment, inside the sliding window."""
    mask = (k_index[None, None, :] <= q_index[None, :, None]) & k_valid[:, None, :]
    if q_segment is not None:
        mask = mask & (q_segment[:, :, None] == k_segment[:, None, :]) & (q_segment[:, :, None] > 0)
    if window is not None:
        mask = mask & (q_index[None, :, None] - k_index[None, None, :] < window)
    return mask


class CausalLM(nnx.Module):
    """A dense decoder-only language model.

    ``model(input_ids [B, S], attention_mask=None, positions=None, segment_ids=None)`` returns logits
    [B, S, vocab]. ``attention_mask`` (1 = token, 0 = padding) handles left and right padding;
    ``segment_ids`` (packed documents, 0 = padding) keeps attention inside each document.
    """

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = dtype
        stack = (cfg.num_layers,)
        self.embed = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = Block(cfg, stack=stack, dtype=dtype, rngs=rngs)
        self.streams = Streams()
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(
                cfg.hidden_size, cfg.vocab_size, bias=False, axes=("fsdp", "vocab"), dtype=dtype, rngs=rngs
            )
        self.remat = False  # gradient checkpointing of each layer
        self.scan_layers = True  # False: a Python loop over the layers (see the module docstring)

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        hidden, _ = self.hidden_states(input_ids, attention_mask, positions, segment_ids)
        return self.project(hidden)

    def project(self, hidden: jax.Array, out_dtype=None) -> jax.Array:
        """Final hidden states [..., C] -> logits [..., vocab] (tied or separate head) in ``out_dtype`` (default:
        the hidden states' dtype; the loss asks for fp32, which costs no rounding pass over the logits)."""
        if self.lm_head is None:
            lead = "abcdefgh"[: hidden.ndim - 1]
            return einsum(f"{lead}c,vc->{lead}v", hidden, self.embed.embedding[...].astype(hidden.dtype), out_dtype)
        return self.lm_head(hidden, out_dtype)

    def hidden_states(self, input_ids, attention_mask=None, positions=None, segment_ids=None, cache=None):
        """Run the stack; returns (final-normed hidden [B, S, C], updated KVCache or None)."""
        b, s = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, s), jnp.int32) if segment_ids is None else segment_ids > 0
        attention_mask = attention_mask.astype(bool)
        if positions is None:
            positions = positions_from_mask(attention_mask)
            if cache is not None:  # continue counting from the tokens already in the cache
                positions = positions + jnp.sum(cache.valid, axis=-1, keepdims=True)
        cos, sin = rope_tables(positions, rope_inv_freq(self.config.rope, self.config.head_dim))
        window = self.config.sliding_window
        if cache is None:
            idx = jnp.arange(s)
            mask = attention_mask_matrix(idx, idx, attention_mask, segment_ids, segment_ids, window)
            ctx = AttentionContext(cos, sin, mask)
        else:
            t = cache.k.shape[2]
            q_idx = cache.index + jnp.arange(s)
            valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, cache.index))
            mask = attention_mask_matrix(q_idx, jnp.arange(t), valid, window=window)
            ctx = AttentionContext(cos, sin, mask, cache.index)

        x = self.streams.expand(self.embed(input_ids).astype(self.dtype))
        if self.scan_layers and cache is None:
            # training and scoring: the scan with a written-out backward pass (see tx.models.layer_scan)
            graphdef, frozen, trained = nnx.split(self.layers, nnx.Param, ...)

            def step(x, frozen, trained, ctx):
                layer = nnx.merge(graphdef, frozen, trained)
                return layer(x, ctx)[0], nnx.state(layer, nnx.RngState)  # random state it advanced

            if self.remat:
                step = jax.checkpoint(step, policy=jax.checkpoint_policies.nothing_saveable)
            x, rng_state = layer_scan.scan(step, x, frozen, trained, ctx)
            nnx.update(self.layers, rng_state)
            return self.norm(self.streams.reduce(x)), None
        graphdef, state = nnx.split(self.layers)

        def body(x, xs):
            layer_state, kv = xs
            layer = nnx.merge(graphdef, layer_state)
            x, kv = layer(x, ctx, kv)
            return x, (kv, nnx.state(layer, nnx.RngState))  # random state a layer advanced (e.g. LoRA dropout)

        if self.remat:
            body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
        kv = None if cache is None else (cache.k, cache.v)
        if self.scan_layers:
            # decoding: weights and the KV cache cross the scan as uint16 bits, as XLA:CPU would move bf16
            # slices and updates through fp32, converting the whole cache on every token (see layer_scan)
            x, (kv, rng_state) = layer_scan.scan_as_bits(body, x, (state, kv))
        else:
            outs = []
            for i in range(self.config.num_layers):
                x, out = body(x, jax.tree.map(lambda a, i=i: a[i], (state, kv)))
                outs.append(out)
            kv, rng_state = jax.tree.map(lambda *a: jnp.stack(a), *outs)
        nnx.update(self.layers, rng_state)
        hidden = self.norm(self.streams.reduce(x))
        if cache is None:
            return hidden, None
        return hidden, KVCache(kv[0], kv[1], valid, cache.index + s)
