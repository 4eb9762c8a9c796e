"""One decoder for every family: segments of stacked blocks (:mod:`tx.models.segments`), each segment run with the
layer scan or unrolled; a block (:mod:`tx.models.block`) is attention + a dense or MoE MLP part.

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

from tx.models import compressed, layer_scan
from tx.models.block import Block, Residual  # noqa: F401 - Residual: the plain residual module, imported from here
from tx.models.config import ModelConfig
from tx.models.layers import AttentionContext, Embed, Linear, norm, window_key
from tx.models.matmul import einsum
from tx.models.mla import cache_shapes
from tx.models.moe import RouterSums
from tx.models.rope import rope_tables
from tx.models.segments import SegmentPlan, plan_segments


class Streams(nnx.Module):
    """Model edges of the residual stream; plain models have one stream, so both are the identity."""

    def expand(self, h: jax.Array) -> jax.Array:
        return h

    def reduce(self, x: jax.Array) -> jax.Array:
        return x


class Segment(nnx.Module):
    """A unit of blocks repeated ``repeats`` times (see :mod:`tx.models.segments`).

    ``blocks[u]`` holds unit position ``u`` of every repeat, its parameters stacked on a leading ``[repeats]``
    axis; ``layer_ids[u]`` are the global layer indices of that stack, in order.
    """

    def __init__(self, cfg: ModelConfig, plan: SegmentPlan, *, dtype, rngs):
        self.repeats = plan.repeats
        self.layer_ids = tuple(plan.layer_ids(u) for u in range(len(plan.unit)))
        self.blocks = nnx.List([Block(cfg, spec, stack=(plan.repeats,), dtype=dtype, rngs=rngs) for spec in plan.unit])

    def __call__(self, x: jax.Array, ctx: AttentionContext, kv=None):
        """One repeat of the unit (inside the scan every block sees one layer's slice); kv: a tuple per block.
        Returns (x, new kv per block, the unit's summed :class:`~tx.models.moe.RouterSums` or None)."""
        new_kv, router = [], None
        for u, block in enumerate(self.blocks):
            x, out, sums = block(x, ctx, None if kv is None else kv[u])
            new_kv.append(out)
            if sums is not None:
                router = sums if router is None else router + sums
        return x, tuple(new_kv), router

    @property
    def num_experts(self) -> int:
        """Experts of the unit's MoE blocks (0: no MoE block)."""
        return max((b.mlp.num_experts for b in self.blocks if b.spec.mlp == "moe"), default=0)


class KVCache(NamedTuple):
    """KV cache: ``layers[s][u] = (k, v)``, each [repeats, B, T, K, D], for unit position u of segment s (multi-head
    latent attention: (latent, rope key), see :mod:`tx.models.mla`); valid [B, T] marks written, non-padding slots;
    index: next slot."""

    layers: tuple
    valid: jax.Array
    index: jax.Array

    @classmethod
    def create(cls, cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> KVCache:
        layers = []
        for plan in plan_segments(cfg.layer_specs):
            r = plan.repeats
            unit = []
            for spec in plan.unit:
                if cfg.compressed is not None:  # DeepSeek-V4: per attention kind (tx.models.compressed)
                    shapes = compressed.cache_shapes(cfg, spec, batch, length)
                else:
                    shapes = cache_shapes(cfg, batch, length)
                unit.append(tuple(jnp.zeros((r, *shape), dtype) for shape in shapes))
            layers.append(tuple(unit))
        return cls(tuple(layers), jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32))


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
        self.embed = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.segments = nnx.List(
            [Segment(cfg, plan, dtype=dtype, rngs=rngs) for plan in plan_segments(cfg.layer_specs)]
        )
        if cfg.hyper is None:
            self.streams = Streams()
        else:  # DeepSeek-V4's hc_head: the learned reduce of its native hyper-connections
            from tx.adapters.connector import HyperHead, native_connector_config

            h = cfg.hyper
            self.streams = HyperHead(native_connector_config(h.n, h.iters, h.eps, h.norm_eps), cfg.hidden_size)
        self.norm = norm(cfg, cfg.hidden_size, dtype=dtype, rngs=rngs)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(
                cfg.hidden_size, cfg.vocab_size, bias=False, axes=("fsdp", "vocab"), dtype=dtype, rngs=rngs
            )
        self.remat = False  # gradient checkpointing of each layer
        self.scan_layers = True  # False: a Python loop over the layers (see the module docstring)

    @property
    def layers(self) -> Block:
        """The stacked block of a model whose layers are all alike (one segment of one block)."""
        if len(self.segments) == 1 and len(self.segments[0].blocks) == 1:
            return self.segments[0].blocks[0]
        raise AttributeError(
            f"this {self.config.architecture} has {len(self.segments)} segments of different blocks; "
            "use model.segments[s].blocks[u] (tx.models.decoder.blocks(model) lists them with their layer ids)"
        )

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        hidden, _ = self.hidden_states(input_ids, attention_mask, positions, segment_ids)
        return self.project(hidden)

    def hidden_states(self, input_ids, attention_mask=None, positions=None, segment_ids=None, cache=None):
        """Run the stack; returns (final-normed hidden [B, S, C], updated KVCache or None)."""
        hidden, cache, _ = self.forward(input_ids, attention_mask, positions, segment_ids, cache)
        return hidden, cache

    def project(self, hidden: jax.Array, out_dtype=None) -> jax.Array:
        """Final hidden states [..., C] -> logits [..., vocab] (tied or separate head) in ``out_dtype`` (default:
        the hidden states' dtype; the loss asks for fp32, which costs no rounding pass over the logits).
        Granite's ``logits_divisor`` and Gemma 2's final soft-cap apply here."""
        if self.lm_head is None:
            lead = "abcdefgh"[: hidden.ndim - 1]
            logits = einsum(f"{lead}c,vc->{lead}v", hidden, self.embed.embedding[...].astype(hidden.dtype), out_dtype)
        else:
            logits = self.lm_head(hidden, out_dtype)
        cfg = self.config
        if cfg.logits_divisor not in (None, 1.0):
            logits = logits / jnp.asarray(cfg.logits_divisor, logits.dtype)
        if cfg.final_softcap is not None:
            cap = jnp.asarray(cfg.final_softcap, logits.dtype)
            logits = jnp.tanh(logits / cap) * cap
        return logits

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """Embeddings [B, S, C] in the compute dtype, times the family's scale (Gemma, Granite)."""
        x = self.embed(input_ids).astype(self.dtype)
        scale = self.config.embed_scale
        if scale is None or scale == 1.0:
            return x
        if self.config.embed_scale_in_dtype:  # Gemma: sqrt(hidden) rounded to the compute dtype first
            return x * jnp.asarray(scale, x.dtype)
        return (x.astype(jnp.float32) * scale).astype(x.dtype)

    def forward(self, input_ids, attention_mask=None, positions=None, segment_ids=None, cache=None):
        """:meth:`hidden_states` plus the routing totals of the MoE layers over the real tokens
        (:class:`~tx.models.moe.RouterSums`, None for a model without MoE layers, and while decoding)."""
        b, s = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, s), jnp.int32) if segment_ids is None else segment_ids > 0
        attention_mask = attention_mask.astype(bool)
        if positions is None:
            positions = positions_from_mask(attention_mask)
            if cache is not None:  # continue counting from the tokens already in the cache
                positions = positions + jnp.sum(cache.valid, axis=-1, keepdims=True)
        kinds = {spec.rope for spec in self.config.layer_specs}
        used = kinds - {None}
        ropes = {
            key: rope_tables(rope, self.config.head_dim, positions) for key, rope in self.config.ropes if key in used
        }
        cos, sin = next(iter(ropes.values())) if len(ropes) == 1 else (None, None)
        if len(kinds) == 1:  # every layer alike: the tables in cos / sin, as one layer kind needs them
            ropes = None
        windows = sorted({spec.window for spec in self.config.layer_specs}, key=lambda w: (w is not None, w or 0))
        if cache is None:
            idx = jnp.arange(s)
            masks = {
                window_key(w): attention_mask_matrix(idx, idx, attention_mask, segment_ids, segment_ids, w)
                for w in windows
            }
            ctx = AttentionContext(
                cos,
                sin,
                None,
                masks=masks,
                ropes=ropes,
                tokens=attention_mask,
                positions=positions,
                input_ids=input_ids,
            )
        else:
            t = cache.valid.shape[1]
            q_idx = cache.index + jnp.arange(s)
            valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, cache.index))
            masks = {window_key(w): attention_mask_matrix(q_idx, jnp.arange(t), valid, window=w) for w in windows}
            ctx = AttentionContext(
                cos,
                sin,
                None,
                cache.index,
                masks=masks,
                ropes=ropes,
                tokens=attention_mask,
                positions=positions,
                input_ids=input_ids,
            )

        x = self.streams.expand(self.embed_tokens(input_ids))
        new_layers, router = [], None
        for k, segment in enumerate(self.segments):
            x, kv, sums = self._run_segment(segment, x, ctx, None if cache is None else cache.layers[k])
            new_layers.append(kv)
            if sums is not None:
                router = sums if router is None else router + sums
        hidden = self.norm(self.streams.reduce(x))
        if cache is None:
            return hidden, None, router
        return hidden, KVCache(tuple(new_layers), valid, cache.index + s), None

    def _run_segment(self, segment: Segment, x, ctx, kv):
        """Run one segment's repeats: the layer scan, or unrolled (``scan_layers`` False). Returns (x, kv, router
        sums): without a cache, a segment with MoE blocks carries its routing totals with x, so the load-balancing
        loss is differentiable through the scan."""
        experts = segment.num_experts
        if self.scan_layers and kv is None:
            # training and scoring: the scan with a written-out backward pass (see tx.models.layer_scan)
            graphdef, frozen, trained = nnx.split(segment, nnx.Param, ...)

            def step(carry, frozen, trained, ctx):
                unit = nnx.merge(graphdef, frozen, trained)
                x, _, sums = unit(carry[0], ctx)
                carry = (x,) if sums is None else (x, carry[1] + sums)
                return carry, nnx.state(unit, nnx.RngState)  # random state it advanced

            if self.remat:
                step = jax.checkpoint(step, policy=jax.checkpoint_policies.nothing_saveable)
            carry = (x, RouterSums.zeros(experts)) if experts else (x,)
            carry, rng_state = layer_scan.scan(step, carry, frozen, trained, ctx)
            nnx.update(segment, rng_state)
            return carry[0], None, (carry[1] if experts else None)
        graphdef, state = nnx.split(segment)

        decoding = kv is not None

        def body(x, xs):
            unit_state, kv = xs
            unit = nnx.merge(graphdef, unit_state)
            x, kv, sums = unit(x, ctx, kv)
            sums = None if decoding else sums  # routing totals are a training quantity: not kept while decoding
            return x, (kv, nnx.state(unit, nnx.RngState), sums)  # random state a layer advanced (LoRA dropout)

        if self.remat:
            body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
        if self.scan_layers:
            # decoding: weights and the KV cache cross the scan as uint16 bits, as XLA:CPU would move bf16
            # slices and updates through fp32, converting the whole cache on every token (see layer_scan)
            x, (kv, rng_state, sums) = layer_scan.scan_as_bits(body, x, (state, kv))
        else:
            outs = []
            for i in range(segment.repeats):
                x, out = body(x, jax.tree.map(lambda a, i=i: a[i], (state, kv)))
                outs.append(out)
            kv, rng_state, sums = jax.tree.map(lambda *a: jnp.stack(a), *outs)
        nnx.update(segment, rng_state)
        return x, kv, (None if sums is None else jax.tree.map(lambda a: jnp.sum(a, axis=0), sums))


def blocks(model) -> list[tuple[tuple, Block, tuple[int, ...]]]:
    """(tx path of the block, the block, its global layer ids in stack order) for every block of the model."""
    out = []
    for k, segment in enumerate(model.segments):
        for u, block in enumerate(segment.blocks):
            out.append((("segments", k, "blocks", u), block, segment.layer_ids[u]))
    return out
