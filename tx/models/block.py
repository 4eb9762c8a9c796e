"""One decoder block from parts: attention part + MLP part (dense or mixture of experts), each in a residual module.

Each block calls a *residual* module around attention and around the MLP::

    x = self.attn_residual(x, lambda h: self.attn(self.attn_norm(h)))
    x = self.mlp_residual(x, lambda h: self.mlp(self.mlp_norm(h)))

The plain residual is ``x + f(x)``. Adapters (tx.adapters) swap these modules for connectors; the block does not
know about them. Which parts a block has comes from its :class:`~tx.models.config.BlockSpec`.
"""

from __future__ import annotations

import jax
from flax import nnx

from tx.models.config import BlockSpec, ModelConfig
from tx.models.layers import MLP, Attention, AttentionContext, RMSNorm
from tx.models.moe import MoE


class Residual(nnx.Module):
    """The plain residual connection h <- h + f(h)."""

    def __call__(self, x: jax.Array, f) -> jax.Array:
        return x + f(x)


class Block(nnx.Module):
    """Pre-norm decoder block: attention then an MLP part, each inside a residual module."""

    def __init__(self, cfg: ModelConfig, spec: BlockSpec | None = None, *, stack=(), dtype, rngs):
        spec = spec or cfg.layer_specs[0]
        self.spec = spec
        eps = cfg.rms_norm_eps
        self.attn_norm = RMSNorm(cfg.hidden_size, eps=eps, stack=stack, dtype=dtype, rngs=rngs)
        self.attn = Attention(cfg, stack=stack, dtype=dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, eps=eps, stack=stack, dtype=dtype, rngs=rngs)
        if spec.mlp == "moe":
            self.mlp = MoE(cfg, stack=stack, dtype=dtype, rngs=rngs)
        else:
            self.mlp = MLP(cfg, stack=stack, dtype=dtype, rngs=rngs)
        self.attn_residual = Residual()
        self.mlp_residual = Residual()

    def __call__(self, x: jax.Array, ctx: AttentionContext, kv=None):
        """-> (x, this layer's (k, v), :class:`~tx.models.moe.RouterSums` of an MoE part or None)."""
        new_kv, router = [], []
        ctx = ctx.for_window(self.spec.window)

        def attn_fn(h):
            out, kv_out = self.attn(self.attn_norm(h), ctx, kv)
            new_kv.append(kv_out)
            return out

        def mlp_fn(h):
            if not isinstance(self.mlp, MoE):
                return self.mlp(self.mlp_norm(h))
            out, sums = self.mlp(self.mlp_norm(h), ctx.tokens)
            router.append(sums)
            return out

        x = self.attn_residual(x, attn_fn)
        x = self.mlp_residual(x, mlp_fn)
        return x, new_kv[0], (router[0] if router else None)
