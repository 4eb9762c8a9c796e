"""One decoder block from parts: attention part (GQA or multi-head latent attention) + MLP part (dense or mixture of
experts), each in a residual module.

Each block calls a *residual* module around attention and around the MLP::

    x = self.attn_residual(x, lambda h: self.attn(self.attn_norm(h)))
    x = self.mlp_residual(x, lambda h: self.mlp(self.mlp_norm(h)))

The plain residual is ``x + f(x)``. Adapters (tx.adapters) swap these modules for connectors; the block does not
know about them. Which parts a block has comes from its :class:`~tx.models.config.BlockSpec`; where the norms sit
from the config's ``norm_placement``, and everything of a family's branch (a norm after the sublayer, Granite's
residual multiplier) stays inside ``f``, so a connector still wraps the whole branch:

- "pre" (Llama): ``f(h) = F(norm(h))``
- "sandwich" (Gemma): ``f(h) = post_norm(F(pre_norm(h)))``
- "post" (OLMo 2): ``f(h) = norm(F(h))``
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tx.models.compressed import CompressedAttention
from tx.models.config import BlockSpec, ModelConfig
from tx.models.layers import MLP, Attention, AttentionContext, norm
from tx.models.mla import MLAttention
from tx.models.moe import MoE


class Residual(nnx.Module):
    """The plain residual connection h <- h + f(h)."""

    def __call__(self, x: jax.Array, f) -> jax.Array:
        return x + f(x)


def scaled(x: jax.Array, m: float) -> jax.Array:
    """``x * m`` computed in fp32 and cast back (as torch multiplies a tensor by a Python float)."""
    return (x.astype(jnp.float32) * m).astype(x.dtype)


class Block(nnx.Module):
    """Decoder block: attention then an MLP part, each inside a residual module."""

    def __init__(self, cfg: ModelConfig, spec: BlockSpec | None = None, *, stack=(), dtype, rngs):
        spec = spec or cfg.layer_specs[0]
        self.spec = spec
        c, kw = cfg.hidden_size, dict(stack=stack, dtype=dtype, rngs=rngs)
        pre = cfg.norm_placement in ("pre", "sandwich")
        post = cfg.norm_placement in ("sandwich", "post")
        self.attn_norm = norm(cfg, c, **kw) if pre else None
        if cfg.compressed is not None:
            self.attn = CompressedAttention(cfg, spec, **kw)
        elif cfg.mla is not None:
            self.attn = MLAttention(cfg, **kw)
        else:
            self.attn = Attention(cfg, **kw)
        self.attn_post_norm = norm(cfg, c, **kw) if post else None
        self.mlp_norm = norm(cfg, c, **kw) if pre else None
        if spec.mlp == "moe":
            self.mlp = MoE(cfg, spec, **kw)
        else:
            self.mlp = MLP(cfg, **kw)
        self.mlp_post_norm = norm(cfg, c, **kw) if post else None
        self.residual_multiplier = cfg.residual_multiplier if cfg.residual_multiplier not in (None, 1.0) else None
        if cfg.hyper is None:
            self.attn_residual = Residual()
            self.mlp_residual = Residual()
        else:  # the checkpoint's own hyper-connections (DeepSeek-V4), run as tx's mhc connector
            from tx.adapters.connector import Connector, native_connector_config

            h = cfg.hyper
            native = native_connector_config(h.n, h.iters, h.eps, h.norm_eps)
            layers = stack[0] if stack else 1
            self.attn_residual = Connector(native, c, layers, rngs=rngs)
            self.mlp_residual = Connector(native, c, layers, rngs=rngs)

    def _branch(self, pre, f, post, h):
        if pre is not None:
            h = pre(h)
        out = f(h)
        if post is not None:
            out = post(out)
        if self.residual_multiplier is not None:
            out = scaled(out, self.residual_multiplier)
        return out

    def __call__(self, x: jax.Array, ctx: AttentionContext, kv=None):
        """-> (x, this layer's (k, v), :class:`~tx.models.moe.RouterSums` of an MoE part or None)."""
        new_kv, router = [], []
        ctx = ctx.for_layer(self.spec)

        def attn(h):
            out, kv_out = self.attn(h, ctx, kv)
            new_kv.append(kv_out)
            return out

        def mlp(h):
            if not isinstance(self.mlp, MoE):
                return self.mlp(h)
            out, sums = self.mlp(h, ctx.tokens, ctx.input_ids)
            router.append(sums)
            return out

        x = self.attn_residual(x, lambda h: self._branch(self.attn_norm, attn, self.attn_post_norm, h))
        x = self.mlp_residual(x, lambda h: self._branch(self.mlp_norm, mlp, self.mlp_post_norm, h))
        return x, new_kv[0], (router[0] if router else None)
