"""Building blocks of the dense decoder: linear, RMSNorm, rotary embeddings, GQA attention, gated MLP.

Every module takes ``stack``: a tuple of leading axes for its parameters (``(num_layers,)`` for the
layers that :class:`tx.models.decoder.CausalLM` runs under ``jax.lax.scan``). Inside the scan each
module sees one layer's slice. Linear weights keep Hugging Face's ``[out, in]`` layout.
Each parameter carries ``axes``: logical names of its dimensions, used by :mod:`tx.sharding`.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tx.models.config import ModelConfig
from tx.models.matmul import einsum
from tx.models.rope import apply_rope

NEG_INF = -1e30  # finite, so fully masked rows (padding queries) give no NaN


def _param(rngs: nnx.Rngs, shape, axes, dtype, init: str = "normal") -> nnx.Param:
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, axes=tuple(axes))


def no_transpose_fold(a: jax.Array) -> jax.Array:
    """``a`` unchanged, as a value XLA will not fold a later transpose into.

    For a gradient computed as a small ``[r, big]`` matmul result and returned transposed, XLA otherwise rewrites
    ``transpose(dot(a, b))`` as ``dot(b^T, a^T)``, reading the large operand transposed (several times slower on
    CPU). A ``reduce_precision`` to the array's own precision changes no value and stops that rewrite.
    """
    info = jnp.finfo(a.dtype)
    return jax.lax.reduce_precision(a, exponent_bits=info.nexp, mantissa_bits=info.nmant)


class Linear(nnx.Module):
    """y = x W^T (+ b) with W: [*stack, out, in] as in PyTorch / Hugging Face."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, axes: tuple[str, str], stack=(), dtype, rngs):
        lead = ("layers",) * len(stack)
        self.weight = _param(rngs, (*stack, d_out, d_in), (*lead, axes[1], axes[0]), dtype)
        self.bias = _param(rngs, (*stack, d_out), (*lead, axes[1]), dtype, "zeros") if bias else None

    def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
        """``out_dtype`` (default: x's) is the result's dtype; the matmul accumulates in fp32 either way."""
        out_dtype = out_dtype or x.dtype
        lead = "abcdefgh"[: x.ndim - 1]  # x itself, not a reshaped copy, is what the backward pass keeps
        y = einsum(f"{lead}i,oi->{lead}o", x, self.weight[...].astype(x.dtype), out_dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(out_dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table [vocab, C]."""

    def __init__(self, vocab: int, dim: int, *, dtype, rngs):
        self.embedding = _param(rngs, (vocab, dim), ("vocab", "fsdp"), dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)


class RMSNorm(nnx.Module):
    """HF's RMSNorm: normalise in fp32, cast back to the input dtype, then scale.

    ``offset`` 1.0: the scale is ``1 + w`` (Gemma; its weights start at 0). ``fp32_scale``: scale in fp32, then cast
    (Gemma, OLMo 2), instead of casting first (Llama).
    """

    def __init__(self, dim: int, *, eps: float, stack=(), dtype, rngs, offset: float = 0.0, fp32_scale: bool = False):
        init = "zeros" if offset else "ones"  # the identity scale either way
        self.scale = _param(rngs, (*stack, dim), (*("layers",) * len(stack), None), dtype, init)
        self.eps = eps
        self.offset = offset
        self.fp32_scale = fp32_scale

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        if self.fp32_scale:
            w = self.scale[...].astype(jnp.float32)
            return (((w + self.offset) if self.offset else w) * h).astype(x.dtype)
        w = self.scale[...].astype(x.dtype)
        return ((w + self.offset) if self.offset else w) * h.astype(x.dtype)


def norm(cfg: ModelConfig, dim: int, *, stack=(), dtype, rngs) -> RMSNorm:
    """An RMSNorm with the family's offset and scale precision."""
    return RMSNorm(
        dim,
        eps=cfg.rms_norm_eps,
        stack=stack,
        dtype=dtype,
        rngs=rngs,
        offset=cfg.norm_offset,
        fp32_scale=cfg.norm_fp32_scale,
    )


class AttentionContext(NamedTuple):
    """What every layer's attention shares: rotary tables and the boolean mask [B, S_q, S_kv].

    ``masks`` holds one mask per attention window the model's layers use (:func:`window_key`); each block picks
    its own into ``mask``.
    """

    cos: jax.Array | None
    sin: jax.Array | None
    mask: jax.Array | None
    cache_index: jax.Array | None = None  # scalar int: where new keys are written in the KV cache
    masks: dict | None = None
    ropes: dict | None = None  # rope key -> (cos, sin), one per rope the model's layers use
    tokens: jax.Array | None = None  # [B, S] bool: the real (non-padding) tokens; what router statistics count
    positions: jax.Array | None = None  # [B, S] int: the queries' positions (DeepSeek-V4's compressed entries)
    input_ids: jax.Array | None = None  # [B, S] int: the token ids (DeepSeek-V4's hash routing)

    def for_window(self, window: int | None) -> AttentionContext:
        return self._replace(mask=self.masks[window_key(window)]) if self.masks else self

    def for_layer(self, spec) -> AttentionContext:
        """The context of a layer of :class:`~tx.models.config.BlockSpec` ``spec``: its window's mask and its rope
        tables (None for a layer without rope)."""
        ctx = self.for_window(spec.window)
        if self.ropes is None:
            return ctx
        cos, sin = self.ropes[spec.rope] if spec.rope is not None else (None, None)
        return ctx._replace(cos=cos, sin=sin)


def window_key(window: int | None) -> str:
    """Key of a window's mask in :attr:`AttentionContext.masks` ("full" for full attention)."""
    return "full" if window is None else f"window{window}"


class Attention(nnx.Module):
    """Causal grouped-query attention with a KV cache; optional q/k RMSNorm per head (Qwen3, Gemma 3) or over the
    whole projection (OLMo 2), a fused ``qkv_proj`` (Phi-3), a logit scale and soft-cap (Gemma, Granite)."""

    def __init__(self, cfg: ModelConfig, *, stack=(), dtype, rngs):
        c, h, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, k, d
        self.scale, self.softcap = cfg.attn_scale, cfg.attn_softcap
        lin = dict(stack=stack, dtype=dtype, rngs=rngs)
        if cfg.fused_qkv:
            self.qkv_proj = Linear(c, (h + 2 * k) * d, bias=cfg.qkv_bias, axes=("fsdp", "tp"), **lin)
        else:
            self.q_proj = Linear(c, h * d, bias=cfg.qkv_bias, axes=("fsdp", "tp"), **lin)
            self.k_proj = Linear(c, k * d, bias=cfg.qkv_bias, axes=("fsdp", "tp"), **lin)
            self.v_proj = Linear(c, k * d, bias=cfg.qkv_bias, axes=("fsdp", "tp"), **lin)
        self.o_proj = Linear(h * d, c, bias=cfg.o_bias, axes=("tp", "fsdp"), **lin)
        self.norm_whole = cfg.qk_norm_scope == "proj"
        if cfg.qk_norm:
            q_dim, k_dim = (h * d, k * d) if self.norm_whole else (d, d)
            self.q_norm = norm(cfg, q_dim, **lin)
            self.k_norm = norm(cfg, k_dim, **lin)
        else:
            self.q_norm = self.k_norm = None
        if cfg.attn_sinks:  # gpt-oss: one logit per head that joins the softmax
            lead = ("layers",) * len(stack)
            self.sinks = _param(rngs, (*stack, h), (*lead, "tp"), dtype)
        else:
            self.sinks = None

    def project_qkv(self, x: jax.Array):
        if hasattr(self, "qkv_proj"):
            qkv = self.qkv_proj(x)
            q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            return qkv[..., :q_size], qkv[..., q_size : q_size + kv_size], qkv[..., q_size + kv_size :]
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def __call__(self, x: jax.Array, ctx: AttentionContext, kv=None):
        """x: [B, S, C] -> ([B, S, C], (k, v)); kv is this layer's cache [B, T, K, D] each, or None."""
        b, s, _ = x.shape
        q, k, v = self.project_qkv(x)
        if self.q_norm is not None and self.norm_whole:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(b, s, self.num_heads, self.head_dim)
        k = k.reshape(b, s, self.num_kv_heads, self.head_dim)
        v = v.reshape(b, s, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and not self.norm_whole:
            q, k = self.q_norm(q), self.k_norm(k)
        if ctx.cos is not None:
            q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if kv is not None:
            kv = k, v = write_cache(kv, (k, v), ctx.cache_index)
        sinks = None if self.sinks is None else self.sinks[...]
        out = attend(
            q, k.astype(q.dtype), v.astype(q.dtype), ctx.mask, scale=self.scale, softcap=self.softcap, sinks=sinks
        )
        return self.o_proj(out.reshape(b, s, -1)), kv


def write_cache(kv: tuple, new: tuple, index) -> tuple:
    """One layer's cache entries [B, T, ...] with ``new`` [B, S, ...] written from slot ``index``."""
    return tuple(
        jax.lax.dynamic_update_slice(c, x.astype(c.dtype), (0, index) + (0,) * (c.ndim - 2)) for c, x in zip(kv, new)
    )


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale=None, softcap=None, sinks=None
) -> jax.Array:
    """Softmax attention in fp32. q / k: [B, S, H, D] / [B, T, K, D] with H = K * G, v: [B, T, K, Dv] (Dv may differ
    from D: multi-head latent attention), mask: [B, S, T] -> [B, S, H, Dv].

    ``scale``: the logit scale (None: 1 / sqrt(D)); ``softcap``: logits become ``softcap * tanh(logits / softcap)``
    before the mask (Gemma 2); ``sinks [H]``: a logit per head in every softmax whose probability is dropped
    (gpt-oss).

    On CPU, and with a soft-cap: :func:`attend_einsum` (its backward keeps only the probabilities; measured faster
    there than ``jax.nn.dot_product_attention``). On GPU/TPU: :func:`attend_fused`.
    """
    if jax.default_backend() == "cpu" or softcap is not None or sinks is not None or v.shape[-1] != q.shape[-1]:
        return attend_einsum(q, k, v, mask, scale, softcap, sinks)
    return attend_fused(q, k, v, mask, scale=scale)


def attend_fused(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, implementation=None, scale=None
) -> jax.Array:
    """``jax.nn.dot_product_attention`` with the same arguments as :func:`attend` (fp32 logits and softmax).

    On GPU with bf16/fp16 inputs it first asks for cuDNN's fused (flash) attention and falls back to XLA's
    when cuDNN refuses the configuration (head size, mask, GPU generation); elsewhere XLA's.
    ``TX_CUDNN_ATTENTION=0`` skips cuDNN.
    """
    cudnn = os.environ.get("TX_CUDNN_ATTENTION", "1") != "0" and jax.default_backend() == "gpu"
    if implementation is None and cudnn and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale, implementation="cudnn")
        except Exception:  # noqa: BLE001 - any refusal at trace time means: use XLA's implementation
            pass
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask[:, None], scale=scale, implementation=implementation or "xla"
    )


def attend_einsum(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale=None, softcap=None, sinks=None
) -> jax.Array:
    """:func:`attend` as two einsums around :func:`masked_softmax`, grouped query heads without repeating k/v."""
    b, s, h, d = q.shape
    kh = k.shape[2]
    q = q.reshape(b, s, kh, h // kh, d)
    scores = einsum("bskgd,btkd->bkgst", q, k, out_dtype=jnp.float32)
    scores = scores / math.sqrt(d) if scale is None else scores * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    if sinks is None:
        probs = masked_softmax(scores, mask[:, None, None]).astype(v.dtype)
    else:
        probs = sink_softmax(scores, mask[:, None, None], sinks.astype(jnp.float32).reshape(1, kh, h // kh, 1, 1))
        probs = probs.astype(v.dtype)
    out = einsum("bkgst,btkd->bskgd", probs, v)
    return out.reshape(b, s, h, v.shape[-1])


def sink_softmax(scores: jax.Array, mask: jax.Array, sink: jax.Array) -> jax.Array:
    """The softmax over ``[masked scores, sink]`` without the sink's own column: the rows sum to less than 1."""
    scores = jnp.where(mask, scores, NEG_INF)
    peak = jax.lax.stop_gradient(jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sink))
    exp = jnp.exp(scores - peak)
    return exp / (jnp.sum(exp, axis=-1, keepdims=True) + jnp.exp(sink - peak))


@jax.custom_vjp
def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """``softmax(where(mask, scores, NEG_INF))`` over the last axis; mask broadcasts against scores.

    The backward pass keeps only the probabilities (and the mask, shared by every layer): autodiff of the same
    expression keeps the masked scores, their exponentials and the probabilities, three [B, H, S, T] arrays per
    layer for the layer scan to store.
    """
    return jax.nn.softmax(jnp.where(mask, scores, NEG_INF), axis=-1)


def _masked_softmax_fwd(scores, mask):
    probs = masked_softmax(scores, mask)
    return probs, (probs, mask)


def _masked_softmax_bwd(res, g):
    probs, mask = res
    ds = probs * (g - jnp.sum(g * probs, axis=-1, keepdims=True))
    return jnp.where(mask, ds, 0.0).astype(probs.dtype), None  # masked scores are constants: no gradient


masked_softmax.defvjp(_masked_softmax_fwd, _masked_softmax_bwd)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``silu(gate) * up``, keeping only gate and up for the backward pass (autodiff keeps three more arrays of
    the MLP's width per layer: sigmoid(gate), silu(gate) and the product)."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, g):
    gate, up = res
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    return g * up * (sig + silu * (1 - sig)), g * silu


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


@jax.custom_vjp
def swiglu_halves(h: jax.Array) -> jax.Array:
    """``swiglu(gate, up)`` of ``h = [gate | up]`` (a fused gate-up projection's output, gate first). Its gradient
    is one array like ``h``: through two slices, autodiff pads each half's gradient to ``h``'s width and adds them
    (a MoE layer's slowest elementwise pass on XLA:CPU, benchmarks/profile_step.py)."""
    w = h.shape[-1] // 2
    return jax.nn.silu(h[..., :w]) * h[..., w:]


def _swiglu_halves_fwd(h):
    return swiglu_halves(h), h


def _swiglu_halves_bwd(h, g):
    w = h.shape[-1] // 2
    return (jnp.concatenate(_swiglu_bwd((h[..., :w], h[..., w:]), g), axis=-1),)


swiglu_halves.defvjp(_swiglu_halves_fwd, _swiglu_halves_bwd)


def geglu(gate: jax.Array, up: jax.Array, approximate: bool = True) -> jax.Array:
    """``gelu(gate) * up`` (tanh approximation: Gemma's ``gelu_pytorch_tanh``)."""
    return jax.nn.gelu(gate, approximate=approximate) * up


def gated(act: str):
    """The gated activation ``act(gate) * up`` of a config's ``hidden_act``."""
    if act == "silu":
        return swiglu
    if act == "gelu_tanh":
        return geglu
    return lambda gate, up: geglu(gate, up, approximate=False)


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); ``width`` defaults to the config's intermediate size. With
    ``fused_gate_up`` one ``gate_up_proj`` [2I, C] holds gate then up (Phi-3)."""

    def __init__(
        self, cfg: ModelConfig, *, width: int | None = None, limit: float | None = None, stack=(), dtype, rngs
    ):
        c, i, bias = cfg.hidden_size, width or cfg.intermediate_size, cfg.mlp_bias
        lin = dict(stack=stack, dtype=dtype, rngs=rngs)
        self.act = cfg.hidden_act
        self.width = i
        self.limit = limit  # DeepSeek-V4: gate clamped to <= limit and up to [-limit, limit] before the activation
        if cfg.fused_gate_up and width is None:
            self.gate_up_proj = Linear(c, 2 * i, bias=bias, axes=("fsdp", "tp"), **lin)
        else:
            self.gate_proj = Linear(c, i, bias=bias, axes=("fsdp", "tp"), **lin)
            self.up_proj = Linear(c, i, bias=bias, axes=("fsdp", "tp"), **lin)
        self.down_proj = Linear(i, c, bias=bias, axes=("tp", "fsdp"), **lin)

    def __call__(self, x: jax.Array) -> jax.Array:
        if hasattr(self, "gate_up_proj"):
            h = self.gate_up_proj(x)
            gate, up = h[..., : self.width], h[..., self.width :]
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if self.limit is not None:
            gate, up = jnp.minimum(gate, self.limit), jnp.clip(up, -self.limit, self.limit)
        return self.down_proj(gated(self.act)(gate, up))
