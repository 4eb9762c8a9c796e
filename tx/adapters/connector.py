"""Hyper-connections as an adapter: a learned replacement for the residual connection of a pretrained block.

A pre-norm block computes ``h <- h + f(h)`` around attention and around the MLP (``f`` includes the sublayer's own
norm). A connector widens the residual stream to ``n`` streams ``x: [B, S, n, C]`` and computes, per token::

    u     = sum_i H_pre[i] x[i]                        collapse: the sublayer input, [B, S, C]
    y     = f(u)                                       the pretrained sublayer, unchanged
    x'[j] = sum_i H_res[i, j] x[i] + H_post[j] y       mix (DeepSeek convention: x' = H_res^T x + H_post y)

``H_res[i, j]`` is the weight of input stream ``i`` in output stream ``j``. This is the convention of DeepSeek-V4
(transformers ``DeepseekV4HyperConnection``, where ``comb`` is consumed as ``comb^T @ x``) and of the PyPI
``hyper_connections`` package (``static_alpha[:, 1:]``); the mHC paper writes ``H_res @ x``, the transpose.
:class:`StreamEdges` copies the embedding output into the ``n`` streams and reduces them by mean before the final
norm.

Every kind writes its raw coefficients as ``z = base + scale * d`` where ``d`` is the input-dependent (or, for
"static", random) part, ``scale = [a_pre, a_post, a_res]`` the gates, and order ``[pre (n), post (n), res (n*n)]``:

- ``static``  (HC eq. 1-5): ``d`` is a trainable random vector; ``H = z``.
- ``dynamic`` (HC eq. 10-13, tanh): ``d[i] = tanh(rmsnorm(x[i]) @ proj)`` per stream ``i``, ``proj: [C, 2 + n]``
  with columns ``[pre, post, res_0 .. res_{n-1}]``; ``H_pre[i] = z_pre[i]``, ``H_post[i] = z_post[i]``,
  ``H_res[i, j] = z_res[i, j]``.
- ``mhc`` (DeepSeek mHC): ``d = rmsnorm(flatten(x)) @ proj``, ``proj: [n * C, 2n + n*n]``;
  ``H_pre = sigmoid(z_pre) + eps``, ``H_post = 2 sigmoid(z_post)`` and
  ``H_res = (1 - g) I + g Sinkhorn(softmax(z_res) + eps)`` with a gate ``g = reflect_gate(res_gate)`` in [0, 1].

- ``mhc_lite`` (mHC-lite, arXiv 2601.05732): as mhc, with ``proj: [n * C, 2n + n!]`` and
  ``H_res = (1 - g) I + g sum_k softmax(z_res)_k P_k`` over the n! permutation matrices ``P_k``
  (:func:`permutation_matrices`, ``k = 0`` is ``I``): a convex combination of permutations is doubly stochastic
  exactly (Birkhoff-von Neumann), with no Sinkhorn iterations. ``n <= MAX_LITE_STREAMS`` (n! grows fast).

Frac-connections (arXiv 2503.14125, ``fracs = m > 1``, kinds static and dynamic): each stream's ``C`` channels are
``m`` fractions of ``d = C / m``, and the ``N = n m`` sub-streams ``x_k`` (``k = s m + f``: stream s, fraction f,
the memory order) are mixed: ``u[f2] = sum_k H_pre[k, f2] x_k`` (the sublayer input, fraction by fraction),
``x'_j = sum_k H_res[k, j] x_k + sum_f1 H_post[f1, j] y[f1]``; base ``[pre (N m), post (m N), res (N N)]``; dynamic
``d_k = tanh(rmsnorm(x_k) @ proj)``, ``proj: [d, 2m + N]`` with columns ``[pre (m), post (m), res (N)]``, and
``H_post[f1, (s, f2)]`` reads ``d_(s, f1)`` (as the ``hyper_connections`` package). ``m = 1`` is the layout above.

Chosen layers (``layers``): a block's stacked connector carries a 0/1 :class:`ConnectorLayers` mask; a masked-out
layer takes the plain coefficients (``H_pre = 1/n``, ``H_post = 1``, ``H_res = I``) in a ``lax.cond`` instead of
computing its own, so its streams pass through as ``x'[j] = x[j] + f(mean_i x[i])``.

Initialisation (every kind): ``scale = 0`` so the input-dependent part is exactly 0, ``H_pre = 1/n``,
``H_post = 1``, ``H_res = I``, and ``res_gate = 0`` for mhc and mhc_lite (Sinkhorn / a softmax cannot reach ``I``
from finite logits; the convex blend is exactly ``I`` at ``g = 0`` and doubly stochastic for every ``g`` in [0, 1];
``g`` reflects ``res_gate`` into [0, 1] with slope +-1, so it never sticks at 0 the way a clipped gate would).

Why the random ``proj`` behind zero gates (see ``shared/design/MHC.md``, symmetry): at init the ``n`` streams are
equal copies and every coefficient treats them alike, so a parameter that only sees per-stream gradients (``base``)
moves all streams alike forever. A zero gate keeps the forward pass exact while its gradient, summed against the
random ``d``, is non-zero and differs per stream: after one step ``H_pre`` and ``H_post`` differ between streams
and the streams separate. "static" coefficients do not see ``x``, so it uses the same device with a random
trainable ``d``. Zero at the very first step by design: the gradient of ``proj`` (behind a zero gate) and, for mhc,
of everything behind ``g = 0``. ``res_gate``'s own gradient is zero too while the stack is stream-symmetric:
``<dL/dH_res, P - I> = 0`` for every row-stochastic ``P`` then, so no doubly stochastic parametrisation can do
better; it is second order in the stream asymmetry (``sum_ij (P - I)[i, j] <dL/dx'_j - mean, x_i - mean>``) and
grows once the pre / post gates have separated the streams.

Coefficients, norms and Sinkhorn run in fp32 whatever the activation dtype; they are cast to ``x.dtype`` only for
the collapse and the mix. ``n = 1`` is the plain residual: no variables and ``x + f(x)`` bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tx.errors import AdapterError, ConfigError
from tx.models.layers import no_transpose_fold

KINDS = ("static", "dynamic", "mhc", "mhc_lite")
FRAC_KINDS = ("static", "dynamic")  # kinds that take ``fracs > 1`` (HC and frac-connections define them)
MAX_LITE_STREAMS = 5
"""Largest n for "mhc_lite": it mixes all n! permutation matrices, so its projection has n * C x (2n + n!) entries
(n = 4: 32 outputs per token, 5: 130, 6: 732, 7: 5052); past 5 that outgrows the sublayer it wraps."""
_F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConnectorConfig:
    """What kind of hyper-connection to attach and how.

    Attributes:
        expansion_rate: number of residual streams ``n`` (1 = the plain residual).
        kind: "static" (HC static), "dynamic" (HC dynamic, tanh) or "mhc" (DeepSeek manifold-constrained HC).
        trainable: connector variables are :class:`ConnectorParam` (trained) or :class:`FrozenConnectorParam`.
        sinkhorn_iters: Sinkhorn row/column iterations for mhc (DeepSeek counts ``2 * iters - 1`` normalisations).
        sinkhorn_balance: end Sinkhorn with an exact balancing step (see :func:`sinkhorn`); False is DeepSeek-V4.
        eps: mhc epsilon added to ``H_pre``, to the softmax and to the Sinkhorn denominators (DeepSeek ``hc_eps``);
            mhc_lite adds it to ``H_pre`` only.
        norm_eps: epsilon inside the square root of the RMS norms that feed the projections.
        fracs: frac-connections' ``m`` (arXiv 2503.14125): split each stream's hidden size into ``m`` fractions
            that are mixed as ``n * m`` sub-streams; 1 = whole streams. Kinds "static" and "dynamic" only.
        layers: global layer ids that get a connector (None = every layer); the other layers carry the ``n``
            streams through unchanged (``x'[j] = x[j] + f(mean_i x[i])``) without computing coefficients.
        native: the checkpoint's own hyper-connections (DeepSeek-V4), part of the base model: the gate fully open
            (``H_res`` is the Sinkhorn matrix, no ``res_gate``), ``H_pre = sigmoid(z) + eps`` with ``eps`` as given,
            and the model's learned reduce (:class:`HyperHead`). Made by :func:`native_connector_config`.
    """

    expansion_rate: int = 4
    kind: str = "mhc"
    trainable: bool = True
    sinkhorn_iters: int = 20
    sinkhorn_balance: bool = True
    eps: float = 1e-6
    norm_eps: float = 1e-6
    fracs: int = 1
    layers: tuple[int, ...] | None = None
    native: bool = False

    def __post_init__(self):
        if isinstance(self.expansion_rate, bool) or not isinstance(self.expansion_rate, int) or self.expansion_rate < 1:
            raise ConfigError(
                f"expansion_rate must be an integer >= 1 (1 = plain residual), got {self.expansion_rate!r}"
            )
        if self.kind not in KINDS:
            raise ConfigError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {self.kind!r}")
        if isinstance(self.sinkhorn_iters, bool) or not isinstance(self.sinkhorn_iters, int) or self.sinkhorn_iters < 1:
            raise ConfigError(f"sinkhorn_iters must be an integer >= 1, got {self.sinkhorn_iters!r}")
        for name in ("trainable", "sinkhorn_balance", "native"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("eps", "norm_eps"):  # > 0: they keep Sinkhorn and the norms finite on all-zero input
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0.0 < value < 0.1:
                raise ConfigError(f"{name} must be a float in (0, 0.1), got {value!r}")
        n = self.expansion_rate
        if self.kind in ("mhc", "mhc_lite") and n > 1 and not self.eps < 1.0 / n:
            raise ConfigError(f"eps must be below 1 / expansion_rate for kind {self.kind!r}, got {self.eps!r}")
        if self.kind == "mhc_lite" and n > MAX_LITE_STREAMS:
            raise ConfigError(
                f"kind 'mhc_lite' works for expansion_rate 1..{MAX_LITE_STREAMS}, got {n}: H_res mixes all n! "
                f"permutation matrices, so the projection has n * hidden x (2n + n!) entries ({n}! = "
                f"{math.factorial(n)} logits per token and site); use kind 'mhc' (Sinkhorn, n^2 logits) for more "
                "streams"
            )
        if isinstance(self.fracs, bool) or not isinstance(self.fracs, int) or self.fracs < 1:
            raise ConfigError(f"fracs must be an integer >= 1 (1 = whole streams), got {self.fracs!r}")
        if self.fracs > 1 and self.kind not in FRAC_KINDS:
            raise ConfigError(
                f"fracs > 1 works with kinds {', '.join(map(repr, FRAC_KINDS))} (frac-connections are defined for "
                f"hyper-connections), got kind {self.kind!r} with fracs={self.fracs}"
            )
        if self.layers is not None:
            layers = self.layers
            if isinstance(layers, str) or not isinstance(layers, list | tuple | range):
                raise ConfigError(f"layers must be a list of layer ids or None (every layer), got {layers!r}")
            bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or i < 0]
            if bad or not layers:
                raise ConfigError(
                    f"layers must be a non-empty list of layer ids >= 0 (None = every layer), got {list(layers)!r}"
                )
            object.__setattr__(self, "layers", tuple(sorted(set(layers))))

    @property
    def plain(self) -> bool:
        """True when nothing is installed: one whole stream (``expansion_rate == 1`` and ``fracs == 1``)."""
        return self.expansion_rate == 1 and self.fracs == 1

    @property
    def substreams(self) -> int:
        """``n * m``: the streams times the fractions each one is split into."""
        return self.expansion_rate * self.fracs

    def describe(self) -> str:
        """Short text for logs: ``mhc n=4``, ``dynamic n=2 fracs=2 layers=[0, 3]``."""
        text = f"{self.kind} n={self.expansion_rate}"
        if self.fracs > 1:
            text += f" fracs={self.fracs}"
        if self.layers is not None:
            text += f" layers={list(self.layers)}"
        return text


class ConnectorParam(nnx.Variable):
    """Trainable connector state; the trainer takes gradients of this type only."""


class FrozenConnectorParam(nnx.Variable):
    """Connector state kept fixed (``ConnectorConfig(trainable=False)``); neither a ConnectorParam nor an nnx.Param."""


class ConnectorLayers(nnx.Variable):
    """0/1 per stacked layer: which layers of a block's stack compute the connector (``ConnectorConfig.layers``).

    Never trained and not saved (the sidecar's ``layers`` rebuilds it); a stack whose layers are all chosen has none.
    """


# ----------------------------------------------------------------------------------------------- pure functions


def sinkhorn(logits: jax.Array, iters: int = 20, eps: float = 1e-6, *, balance: bool = True) -> jax.Array:
    """Doubly stochastic matrices ``[..., n, n]`` from logits, in fp32; DeepSeek-V4's algorithm plus a balancing step.

    ``P = softmax(logits, rows) + eps``, then a column normalisation followed by ``iters - 1`` pairs of row and
    column normalisations, each dividing by ``sum + eps`` (exactly DeepSeek-V4 with ``balance=False``). The
    max-subtracted softmax keeps logits of any size finite. The last step normalises columns, so column sums are
    exact up to ``eps``; row sums converge slowly for peaked logits (20 iterations leave errors of several percent
    at logits of +-5). ``balance`` then moves each excess row's surplus, proportionally to its entries, into the
    deficit rows of the same column: rows sum to 1, columns keep their sums, entries stay non-negative, and a
    converged matrix moves by no more than its row error.
    """
    p = jax.nn.softmax(logits.astype(_F32), axis=-1) + eps
    lead, n = p.shape[:-2], p.shape[-1]
    # tokens on the minor axis, p[i, j, t], and row / column sums as n - 1 vectorised adds over tokens: every step
    # is then one elementwise loop (a reduce over an axis of n numbers is a separate, slower kernel on CPU)
    p = jnp.moveaxis(p.reshape(-1, n, n), 0, -1)
    p = p / (_sum_keepdims(p, 0) + eps)

    def rows_then_columns(_, p):
        p = p / (_sum_keepdims(p, 1) + eps)
        return p / (_sum_keepdims(p, 0) + eps)

    # Unrolled, XLA fuses the iterations into a few kernels (GPU/TPU). On CPU the rolled loop is faster (unrolled:
    # ~4x slower forward + backward, measured) and compiles several times faster.
    unroll = jax.default_backend() != "cpu"
    p = jax.lax.fori_loop(0, iters - 1, rows_then_columns, p, unroll=unroll)
    if balance:
        rows = _sum_keepdims(p, 1)[:, 0]  # [n, T]
        surplus, deficit = jnp.maximum(rows - 1.0, 0.0), jnp.maximum(1.0 - rows, 0.0)
        take = surplus / rows  # fraction of each excess row that leaves it, < 1
        moved = _sum_keepdims(take[:, None] * p, 0)  # [1, n (columns), T]: mass leaving each column's excess rows
        give = deficit / jnp.maximum(_sum_keepdims(deficit, 0), 1e-30)  # deficit rows' shares, sum 1
        p = p - take[:, None] * p + give[:, None] * moved
    return jnp.moveaxis(p, -1, 0).reshape(*lead, n, n)


def _sum_keepdims(p: jax.Array, axis: int) -> jax.Array:
    """``p.sum(axis, keepdims=True)`` over a short axis, as a chain of adds."""
    out = jax.lax.slice_in_dim(p, 0, 1, axis=axis)
    for k in range(1, p.shape[axis]):
        out = out + jax.lax.slice_in_dim(p, k, k + 1, axis=axis)
    return out


@jax.custom_jvp
def reflect_gate(g: jax.Array) -> jax.Array:
    """``g`` folded into [0, 1] by reflection at 0 and 1 (a triangle wave of period 2), exact on [0, 1].

    The derivative is +-1 everywhere, +1 at the kinks, so a gate starting at exactly 0 has a full gradient and
    a step that overshoots below 0 comes back as a small positive gate instead of sticking (as a clip would).
    """
    m = jnp.mod(jnp.abs(g), 2.0)
    return jnp.where(m <= 1.0, m, 2.0 - m)


@reflect_gate.defjvp
def _reflect_gate_jvp(primals, tangents):
    (g,), (t,) = primals, tangents
    m = jnp.mod(jnp.abs(g), 2.0)
    slope = jnp.where(g >= 0, 1.0, -1.0) * jnp.where(m <= 1.0, 1.0, -1.0)
    return reflect_gate(g), slope.astype(t.dtype) * t


def collapse(x: jax.Array, h_pre: jax.Array) -> jax.Array:
    """``u = sum_i H_pre[i] x[i]``: x ``[B, S, n, C]``, h_pre ``[B, S, n]`` or ``[n]`` -> ``[B, S, C]`` (x.dtype)."""
    # fp32 weights and accumulation, one rounding to x.dtype: at init (equal streams, H_pre = 1/n) a bf16 input
    # comes back bit for bit, so bf16 identity holds as tightly as fp32's
    h_pre = jnp.broadcast_to(h_pre.astype(_F32), x.shape[:-1])
    return _collapse(x, h_pre)


def mix(x: jax.Array, y: jax.Array, h_post: jax.Array, h_res: jax.Array) -> jax.Array:
    """``x'[j] = sum_i H_res[i, j] x[i] + H_post[j] y``; x ``[B, S, n, C]``, y ``[B, S, C]`` -> ``[B, S, n, C]``.

    h_post ``[B, S, n]`` or ``[n]``, h_res ``[B, S, n, n]`` or ``[n, n]`` (fp32). Products and sums run in fp32 with
    one rounding to ``x.dtype``.
    """
    n = x.shape[-2]
    h_post = jnp.broadcast_to(h_post.astype(_F32), x.shape[:-1])
    h_res = jnp.broadcast_to(h_res.astype(_F32), (*x.shape[:-1], n))
    return _mix(x, y, h_post, h_res)


# Collapse and mix are a few multiply-adds per element of the n-wide stream, so their cost is memory traffic. Both
# are written as unrolled sums over the n streams (one fused loop over x, no batched [n, n] matmuls) with
# hand-written backward passes that keep only their inputs as residuals (x is shared with the rest of the site)
# and compute each gradient in one pass.


def _weighted_sum(w: jax.Array, x: jax.Array) -> jax.Array:
    """``sum_k w[..., k] x[..., k, :]`` in fp32: w ``[..., (m,) n]``, x ``[..., n, C]`` -> ``[..., (m,) C]``.

    With w ``[..., m, n]`` the result is ``[..., m, C]``: row ``r`` is ``sum_k w[..., r, k] x[..., k, :]``. Unrolled
    over the n streams as broadcast multiply-adds, so XLA emits one elementwise loop (no batched tiny matmul).
    """
    rows = w.ndim == x.ndim
    out = None
    for k in range(x.shape[-2]):
        xk = x[..., k, :].astype(_F32)
        term = w[..., k, None] * (xk[..., None, :] if rows else xk)
        out = term if out is None else out + term
    return out


@jax.custom_vjp
def _collapse(x, h_pre):
    # a (batched) dot rather than _weighted_sum: a dot's operand is materialised, so XLA cannot fuse the previous
    # site's mix into this one and recompute it per stream (it does so for elementwise consumers, e.g. "static")
    n = x.shape[-2]
    if n & (n - 1) == 0:  # 1/n exact in binary: equal streams come back exactly
        return jnp.einsum("...i,...ic->...c", h_pre, x, preferred_element_type=_F32).astype(x.dtype)
    # n = 3, 5, ...: S x0 + sum_i H_pre[i] (x[i] - x0) with S = sum_i H_pre[i] summed in stream order, the same sum
    # but exact when the streams are equal (at init: S is then exactly 1 in fp32 for n <= 8); the plain sum rounds
    # (fl(1/3) x, three times: ~1 ulp per layer, 1e-6 relative in a small model's logits)
    x0 = x[..., 0, :].astype(_F32)
    s = h_pre[..., 0]
    for i in range(1, n):
        s = s + h_pre[..., i]
    dev = jnp.einsum("...i,...ic->...c", h_pre, x.astype(_F32) - x0[..., None, :], preferred_element_type=_F32)
    return (s[..., None] * x0 + dev).astype(x.dtype)


def _collapse_fwd(x, h_pre):
    return _collapse(x, h_pre), (x, h_pre)


def _collapse_bwd(res, g):
    x, h_pre = res
    gf = g.astype(_F32)
    dx = (h_pre[..., None] * gf[..., None, :]).astype(x.dtype)
    dh = jnp.einsum("...ic,...c->...i", x, g, preferred_element_type=_F32)
    return dx, dh


_collapse.defvjp(_collapse_fwd, _collapse_bwd)


@jax.custom_vjp
def _mix(x, y, h_post, h_res):
    out = h_post[..., None] * y.astype(_F32)[..., None, :] + _weighted_sum(jnp.swapaxes(h_res, -1, -2), x)
    return out.astype(x.dtype)


def _mix_fwd(x, y, h_post, h_res):
    return _mix(x, y, h_post, h_res), (x, y, h_post, h_res)


def _mix_bwd(res, g):
    x, y, h_post, h_res = res
    dx = _weighted_sum(h_res, g).astype(x.dtype)
    dy = _weighted_sum(h_post, g).astype(y.dtype)
    dh_res = jnp.einsum("...ic,...jc->...ij", x, g, preferred_element_type=_F32)
    dh_post = jnp.einsum("...c,...jc->...j", y, g, preferred_element_type=_F32)
    return dx, dy, dh_post, dh_res


_mix.defvjp(_mix_fwd, _mix_bwd)


def _rms_scale(x: jax.Array, eps: float, axes=(-1,)) -> jax.Array:
    """``1 / sqrt(mean(x^2) + eps)`` over ``axes``, fp32; the norm is applied after the (linear) projection."""
    xf = x.astype(_F32)
    return jax.lax.rsqrt(jnp.mean(xf * xf, axis=axes) + eps)


@jax.custom_vjp
def _project(x: jax.Array, proj: jax.Array) -> jax.Array:
    """Streams times a projection, in fp32: x ``[..., n, C]`` and proj ``[n*C, p]`` (flattened streams, mhc) ->
    ``[..., p]``, or proj ``[C, p]`` (each stream, dynamic) -> ``[..., n, p]``.

    A plain matmul with a hand-written backward pass: it keeps x itself as the residual (a flattened copy would be
    one more n-wide array for the layer scan to store) and computes ``d proj`` as ``(g^T x)^T``, so that the large
    operand is read in its own layout (XLA would otherwise read x transposed, ~4x slower on CPU).
    """
    k = proj.shape[0]
    lead = x.shape[:-1] if k == x.shape[-1] else x.shape[:-2]
    return jnp.matmul(x.reshape(*lead, k).astype(_F32), proj, precision=_HIGHEST)


def _project_fwd(x, proj):
    return _project(x, proj), (x, proj)


def _project_bwd(res, g):
    x, proj = res
    k, p = proj.shape
    dx = jnp.matmul(g, proj.T, precision=_HIGHEST).reshape(x.shape).astype(x.dtype)
    # x in its own [..., n, C] shape, as the site's other gradients read it: in the layer scan's backward pass XLA
    # then copies it out of the stacked residuals once instead of once per shape
    if k == x.shape[-1]:
        dproj_t = jnp.einsum("...p,...c->pc", g, x, precision=_HIGHEST, preferred_element_type=_F32)
    else:
        dproj_t = jnp.einsum("...p,...ic->pic", g, x, precision=_HIGHEST, preferred_element_type=_F32).reshape(p, k)
    return dx, no_transpose_fold(dproj_t).T


_project.defvjp(_project_fwd, _project_bwd)


def _split(z: jax.Array, n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``[..., 2n + r]`` in order [pre, post, res] -> (``[..., n]``, ``[..., n]``, res): ``r = n*n`` gives res
    ``[..., n, n]``; mhc_lite's ``r = n!`` permutation logits stay ``[..., n!]``."""
    res = z[..., 2 * n :]
    if res.shape[-1] == n * n:
        res = res.reshape(*z.shape[:-1], n, n)
    return z[..., :n], z[..., n : 2 * n], res


def _split_fracs(z: jax.Array, n: int, m: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``[..., 2 N m + N*N]`` (``N = n m``) in order [pre, post, res] -> (``[..., N, m]``, ``[..., m, N]``,
    ``[..., N, N]``), each row-major."""
    big, lead = n * m, z.shape[:-1]
    pre = z[..., : big * m].reshape(*lead, big, m)
    post = z[..., big * m : 2 * big * m].reshape(*lead, m, big)
    return pre, post, z[..., 2 * big * m :].reshape(*lead, big, big)


def identity_coefficients(n: int, m: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The plain residual's coefficients: ``H_pre = 1/n``, ``H_post = 1``, ``H_res = I`` (fp32 numpy).

    ``m = 1``: ``([n], [n], [n, n])``. ``m > 1`` over the sub-streams ``k = s m + f``: ``H_pre[k, f2] = [f = f2] / n``
    (input fraction f2 is the mean of the streams' fraction f2), ``H_post[f1, (s, f2)] = [f1 = f2]`` and ``I``.
    """
    if m == 1:
        return np.full(n, 1.0 / n, np.float32), np.ones(n, np.float32), np.eye(n, dtype=np.float32)
    eye = np.eye(m, dtype=np.float32)
    return np.tile(eye, (n, 1)) / np.float32(n), np.tile(eye, (1, n)), np.eye(n * m, dtype=np.float32)


def pre_logit(n: int, eps: float) -> np.float32:
    """``b_pre`` of mhc / mhc_lite at init: ``logit(1/n - eps)`` in fp32, so ``sigmoid(b_pre) + eps = 1/n``."""
    return np.float32(math.log((1.0 / n - eps) / (1.0 - 1.0 / n + eps)))


@functools.cache
def pre_eps(n: int, eps: float) -> float:
    """The ``eps`` of ``H_pre = sigmoid(z) + eps`` adjusted (by at most an ulp of 1/n) so that fp32 gives exactly
    ``1/n`` at init.

    fp32 ``sigmoid(pre_logit)`` lands up to an ulp off ``1/n - eps`` (no fp32 logit hits it: ``n = 4`` gives
    ``H_pre`` one ulp below 1/4), and that scale error, repeated over the layers, brings the identity error of a
    small model to ~1e-6. ``fp32(1/n - fl(sigmoid(b)))`` instead makes the sum round to ``1/n`` exactly.
    """
    with jax.ensure_compile_time_eval():  # a constant, also when first asked for inside a trace
        s0 = float(np.asarray(jax.nn.sigmoid(jnp.float32(pre_logit(n, eps))), np.float64))
    return float(np.float32(np.float64(np.float32(1.0 / n)) - s0))


@functools.cache
def permutation_matrices(n: int) -> np.ndarray:
    """``[n!, n, n]``: ``P[k, i, perm_k[i]] = 1`` for ``itertools.permutations(range(n))`` (k = 0 is ``I``)."""
    perms = list(itertools.permutations(range(n)))
    out = np.zeros((len(perms), n, n), np.float32)
    for k, perm in enumerate(perms):
        out[k, np.arange(n), perm] = 1.0
    return out


def birkhoff(logits: jax.Array, n: int) -> jax.Array:
    """mHC-lite's ``H_res = sum_k softmax(logits)_k P_k``: ``[..., n!] -> [..., n, n]``, fp32.

    A convex combination of permutation matrices (Birkhoff-von Neumann), so rows and columns sum to exactly
    ``sum_k w_k = 1`` (to float rounding) with no iterations; ``P_k`` as :func:`permutation_matrices`.
    """
    w = jax.nn.softmax(logits.astype(_F32), axis=-1)
    perms = jnp.asarray(permutation_matrices(n).reshape(-1, n * n))
    return jnp.matmul(w, perms, precision=_HIGHEST).reshape(*w.shape[:-1], n, n)


def mix_fracs(x: jax.Array, f, h_pre: jax.Array, h_post: jax.Array, h_res: jax.Array, m: int) -> jax.Array:
    """Frac-connections' collapse, sublayer and mix: x ``[B, S, n, C]`` as ``N = n m`` sub-streams of ``C / m``.

    ``u[f2] = sum_k H_pre[k, f2] x_k``; ``y = f(u)`` split into fractions ``y[f1]``;
    ``x'_j = sum_k H_res[k, j] x_k + sum_f1 H_post[f1, j] y[f1]`` (fp32 sums, one rounding to ``x.dtype``).
    """
    lead, n, c = x.shape[:-2], x.shape[-2], x.shape[-1]
    xs = x.reshape(*lead, n * m, c // m)
    u = _weighted_sum(jnp.swapaxes(h_pre, -1, -2), xs).reshape(*lead, c).astype(x.dtype)
    y = f(u).reshape(*lead, m, c // m)
    out = _weighted_sum(jnp.swapaxes(h_res, -1, -2), xs) + _weighted_sum(jnp.swapaxes(h_post, -1, -2), y)
    return out.reshape(x.shape).astype(x.dtype)


# ---------------------------------------------------------------------------------------------------- modules


class Connector(nnx.Module):
    """Replaces one residual connection ``h <- h + f(h)`` of a pretrained pre-norm block (see the module docstring).

    Variables carry a leading layer axis of size ``num_layers``; the model scans over it, so ``__call__`` and
    :meth:`coefficients` see one layer's slice. For ``n >= 2`` (``p = 2n + n*n``):

    - ``base [L, p]``: static part in order [pre, post, res] (res row-major, ``[i, j]``).
    - ``scale [L, 3]``: gates ``[a_pre, a_post, a_res]`` of the input-dependent part, 0 at init.
    - ``proj``: static ``[L, p]``, dynamic ``[L, C, 2 + n]``, mhc ``[L, n*C, p]``; random at init.
    - ``res_gate [L]`` (mhc only): ``g`` of ``H_res = (1 - g) I + g Sinkhorn(...)``, 0 at init.

    Example:
        >>> conn = Connector(ConnectorConfig(expansion_rate=2, kind="mhc"), 8, 3, rngs=nnx.Rngs(0))
        >>> layer = connector_layer(conn, 0)
        >>> x = jnp.ones((1, 5, 2, 8))
        >>> layer(x, jnp.tanh).shape
        (1, 5, 2, 8)
    """

    def __init__(
        self,
        config: ConnectorConfig,
        hidden_size: int,
        num_layers: int,
        *,
        rngs: nnx.Rngs,
        layer_mask: np.ndarray | None = None,
    ):
        self.config = config
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.enabled = True
        n, m, c, layers = config.expansion_rate, config.fracs, hidden_size, num_layers
        if config.plain:  # the plain residual: nothing to learn
            return
        if c % m:
            raise ConfigError(
                f"fracs={m} must divide the hidden size {c} (each stream is split into {m} equal fractions); "
                f"try one of {[k for k in range(2, min(c, 16) + 1) if c % k == 0]}"
            )
        param = ConnectorParam if config.trainable else FrozenConnectorParam
        kind = config.kind
        if kind in ("mhc", "mhc_lite"):
            r = n * n if kind == "mhc" else math.factorial(n)
            base = np.concatenate([np.full(n, pre_logit(n, config.eps)), np.zeros(n), np.zeros(r)])  # 2 sigmoid(0) = 1
        else:
            base = np.concatenate([a.ravel() for a in identity_coefficients(n, m)])
        p = base.shape[0]
        self.base = param(jnp.broadcast_to(jnp.asarray(base, _F32), (layers, p)))
        self.scale = param(jnp.zeros((layers, 3), _F32))
        key = rngs.params()
        d = c // m
        shape, fan_in = {
            "static": ((layers, p), 1),
            "dynamic": ((layers, d, 2 * m + n * m), d),
            "mhc": ((layers, n * c, p), n * c),
            "mhc_lite": ((layers, n * c, p), n * c),
        }[kind]
        self.proj = param(jax.random.normal(key, shape, _F32) / math.sqrt(fan_in))  # d ~ N(0, 1) per entry
        if kind in ("mhc", "mhc_lite") and not config.native:
            self.res_gate = param(jnp.zeros((layers,), _F32))
        if layer_mask is not None:
            mask = np.asarray(layer_mask, np.float32).reshape(layers)
            if not mask.all():
                self.layer_mask = ConnectorLayers(jnp.asarray(mask))

    @property
    def n(self) -> int:
        return self.config.expansion_rate

    @property
    def m(self) -> int:
        return self.config.fracs

    @property
    def mask(self) -> ConnectorLayers | None:
        """The 0/1 layer mask, or None when every layer of the stack computes the connector."""
        return getattr(self, "layer_mask", None)

    def _raw(self, x: jax.Array):
        """Raw coefficients ``z = base + scale * d`` (fp32) as (pre, post, res); static kind without [B, S]."""
        n, m, kind = self.n, self.m, self.config.kind
        base, scale, proj = self.base[...], self.scale[...], self.proj[...]
        if m > 1:
            return self._raw_fracs(x, base, scale, proj)
        if kind == "static":
            d_pre, d_post, d_res = _split(proj, n)
        elif kind == "dynamic":
            d = _project(x, proj)
            d = jnp.tanh(d * _rms_scale(x, self.config.norm_eps)[..., None])  # [B, S, n, 2 + n]
            d_pre, d_post, d_res = d[..., 0], d[..., 1], d[..., 2:]
        else:
            d = _project(x, proj)
            d_pre, d_post, d_res = _split(d * _rms_scale(x, self.config.norm_eps, axes=(-2, -1))[..., None], n)
        b_pre, b_post, b_res = _split(base, n)
        return b_pre + scale[0] * d_pre, b_post + scale[1] * d_post, b_res + scale[2] * d_res

    def _raw_fracs(self, x, base, scale, proj):
        """``fracs = m > 1``: (pre ``[N, m]``, post ``[m, N]``, res ``[N, N]``) over the ``N = n m`` sub-streams."""
        n, m = self.n, self.m
        big = n * m
        b_pre, b_post, b_res = _split_fracs(base, n, m)
        if self.config.kind == "static":
            d_pre, d_post, d_res = _split_fracs(proj, n, m)
        else:
            xs = x.reshape(*x.shape[:-2], big, x.shape[-1] // m)  # sub-stream k = s * m + f
            d = _project(xs, proj)
            d = jnp.tanh(d * _rms_scale(xs, self.config.norm_eps)[..., None])  # [B, S, N, 2m + N]
            d_pre, d_res = d[..., :m], d[..., 2 * m :]
            # post: y's fraction f1 into sub-stream (s, f2) reads sub-stream (s, f1)'s projection, column f2
            d_post = d[..., m : 2 * m].reshape(*d.shape[:-2], n, m, m)  # [s, f1, f2]
            d_post = jnp.swapaxes(d_post, -3, -2).reshape(*d.shape[:-2], m, big)  # [f1, (s, f2)]
        return b_pre + scale[0] * d_pre, b_post + scale[1] * d_post, b_res + scale[2] * d_res

    def _coefficients(self, x: jax.Array):
        z_pre, z_post, z_res = self._raw(x)
        kind = self.config.kind
        if kind not in ("mhc", "mhc_lite"):
            return z_pre, z_post, z_res
        eps = self.config.eps
        h_post = 2.0 * jax.nn.sigmoid(z_post)
        sk = jax.checkpoint(
            functools.partial(sinkhorn, iters=self.config.sinkhorn_iters, eps=eps, balance=self.config.sinkhorn_balance)
        )
        if self.config.native:  # the pretrained hyper-connection exactly: its eps, the gate fully open
            return jax.nn.sigmoid(z_pre) + eps, h_post, sk(z_res)
        h_pre = jax.nn.sigmoid(z_pre) + pre_eps(self.n, eps)  # = eps to within an ulp of 1/n
        g = reflect_gate(self.res_gate[...])
        if kind == "mhc_lite":
            h_res = (1.0 - g) * jnp.eye(self.n, dtype=_F32) + g * birkhoff(z_res, self.n)
            return h_pre, h_post, h_res
        # sk is recomputed in the backward pass: the iterations are cheap, while storing them would add
        # 6 x (iters - 1) small arrays per site to what the layer scan keeps for the backward pass
        h_res = (1.0 - g) * jnp.eye(self.n, dtype=_F32) + g * sk(z_res)
        return h_pre, h_post, h_res

    def _shapes(self, lead: tuple) -> tuple[tuple, tuple, tuple]:
        n, m = self.n, self.m
        if m == 1:
            return (*lead, n), (*lead, n), (*lead, n, n)
        return (*lead, n * m, m), (*lead, m, n * m), (*lead, n * m, n * m)

    def coefficients(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Per-token fp32 ``(h_pre [B, S, n], h_post [B, S, n], h_res [B, S, n, n])`` for streams x ``[B, S, n, C]``.

        Call it on one layer (``connector_layer(conn, i)``); ``h_res[..., i, j]`` weighs input stream i in output j.
        With ``fracs = m > 1`` over the ``N = n m`` sub-streams (``k = s m + f``: stream s, fraction f):
        ``h_pre [B, S, N, m]`` (sub-stream k into input fraction f), ``h_post [B, S, m, N]`` (output fraction f
        into sub-stream k), ``h_res [B, S, N, N]``. A layer outside ``ConnectorConfig.layers`` gives the plain
        coefficients (``H_pre = 1/n``, ``H_post = 1``, ``H_res = I``) without computing the connector's.
        """
        lead = x.shape[:-2]
        shapes = self._shapes(lead)
        if self.config.plain:
            one = jnp.ones((*lead, 1), _F32)
            return one, one, one[..., None]

        def computed(x):
            return tuple(jnp.broadcast_to(h.astype(_F32), s) for h, s in zip(self._coefficients(x), shapes))

        if self.mask is None:
            return computed(x)

        def plain(x):
            return tuple(
                jnp.broadcast_to(jnp.asarray(h, _F32), s) for h, s in zip(identity_coefficients(self.n, self.m), shapes)
            )

        return jax.lax.cond(self.mask[...] > 0, computed, plain, x)

    def __call__(self, x: jax.Array, f: Callable[[jax.Array], jax.Array]) -> jax.Array:
        """Streams x ``[B, S, n, C]`` and sublayer f ``[B, S, C] -> [B, S, C]`` -> ``[B, S, n, C]``.

        Disabled (``enabled = False``): the plain residual ``x + f(x)`` on ``x [B, S, C]``.
        """
        if not self.enabled:
            return x + f(x)
        if self.config.plain:
            return x + f(x[..., 0, :])[..., None, :]
        # per-token coefficients for every kind (collapse and mix take them per token; "static" broadcasts)
        h_pre, h_post, h_res = self.coefficients(x)
        if self.m == 1:
            return mix(x, f(collapse(x, h_pre)), h_post, h_res)
        return mix_fracs(x, f, h_pre, h_post, h_res, self.m)


class StreamEdges(nnx.Module):
    """Model edges: expand the embedding output to n streams; reduce them (mean) before the final norm.

    The mean makes the widened model equal to the base model at init (a sum would give ``n * h``, equal only up to
    the final RMSNorm's eps). When ``enabled`` is False both are the identity on ``[B, S, C]``.
    """

    def __init__(self, n: int):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"expansion_rate must be an integer >= 1, got {n!r}")
        self.n = n
        self.enabled = True

    def expand(self, h: jax.Array) -> jax.Array:
        """``[B, S, C] -> [B, S, n, C]``: n copies of h."""
        if not self.enabled:
            return h
        return jnp.broadcast_to(h[..., None, :], (*h.shape[:-1], self.n, h.shape[-1]))

    def reduce(self, x: jax.Array) -> jax.Array:
        """``[B, S, n, C] -> [B, S, C]``: mean over the streams (accumulated in fp32)."""
        if not self.enabled:
            return x
        if self.n == 1:
            return x[..., 0, :]
        # x0 + mean_i (x[i] - x0): the mean, but exact when the streams are equal (at init) for every n; a plain
        # fp32 mean of three equal streams rounds (3 x is inexact, then / 3)
        x0 = x[..., :1, :].astype(_F32)
        return (x0[..., 0, :] + jnp.mean(x.astype(_F32) - x0, axis=-2)).astype(x.dtype)


def native_connector_config(
    n: int, iters: int, eps: float, norm_eps: float, trainable: bool = False
) -> ConnectorConfig:
    """The "mhc" connector that computes a checkpoint's own hyper-connections (DeepSeek-V4's ``hc_mult``,
    ``hc_sinkhorn_iters``, ``hc_eps``, ``rms_norm_eps``): Sinkhorn without the balancing step, the gate open."""
    return ConnectorConfig(
        expansion_rate=n,
        kind="mhc",
        trainable=trainable,
        sinkhorn_iters=iters,
        sinkhorn_balance=False,
        eps=eps,
        norm_eps=norm_eps,
        native=True,
    )


class HyperHead(nnx.Module):
    """Model edges of a checkpoint with native hyper-connections (DeepSeek-V4's ``hc_head``): expand copies the
    embedding output into the n streams; reduce is learned, ``sum_i H[i] x[i]`` with
    ``H = sigmoid(rmsnorm(flatten(x)) @ proj * scale + base) + eps`` (``proj [n*C, n]``, ``base [n]``, ``scale [1]``).
    Part of the base model: ``enabled`` stays True under :func:`~tx.adapters.attach.adapters_disabled`."""

    def __init__(self, config: ConnectorConfig, hidden_size: int):
        n = config.expansion_rate
        param = ConnectorParam if config.trainable else FrozenConnectorParam
        self.config = config
        self.n = n
        self.enabled = True
        self.proj = param(jnp.zeros((n * hidden_size, n), _F32))
        self.base = param(jnp.zeros((n,), _F32))
        self.scale = param(jnp.ones((1,), _F32))

    def expand(self, h: jax.Array) -> jax.Array:
        return jnp.broadcast_to(h[..., None, :], (*h.shape[:-1], self.n, h.shape[-1]))

    def reduce(self, x: jax.Array) -> jax.Array:
        d = _project(x, self.proj[...]) * _rms_scale(x, self.config.norm_eps, axes=(-2, -1))[..., None]
        weights = jax.nn.sigmoid(d * self.scale[...][0] + self.base[...]) + self.config.eps
        return collapse(x, weights)


# ------------------------------------------------------------------------------------ layers and reference weights


def connector_layer(connector: Connector, i: int) -> Connector:
    """Layer ``i`` of a stacked connector as a standalone module (variables without the layer axis), as in the scan."""
    graphdef, state = nnx.split(connector)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def set_layer_values(connector: Connector, i: int, values: Mapping[str, np.ndarray]) -> None:
    """Write one layer's variables (names as in :class:`Connector`, shapes without the layer axis) into slot ``i``."""
    for name, value in values.items():
        var = getattr(connector, name, None)
        if not isinstance(var, nnx.Variable):
            raise AdapterError(f"connector has no variable {name!r} (kind {connector.config.kind!r})")
        value = jnp.asarray(value, _F32)
        if value.shape != var.shape[1:]:
            raise AdapterError(f"connector variable {name!r}: expected shape {var.shape[1:]}, got {value.shape}")
        var[...] = var[...].at[i].set(value)


def _streams_from_size(p: int) -> int:
    n = round(math.sqrt(1 + p) - 1)
    if 2 * n + n * n != p:
        raise AdapterError(f"a projection of {p} outputs is not 2n + n*n for any n")
    return n


def deepseek_v4_values(fn: np.ndarray, base: np.ndarray, scale: np.ndarray) -> dict[str, np.ndarray]:
    """One ``DeepseekV4HyperConnection`` (``fn [2n+n*n, n*C]``, ``base [2n+n*n]``, ``scale [3]``) as mhc values.

    The layout and the H_res convention are the same (DeepSeek consumes ``comb^T @ x``), so only ``fn`` is
    transposed; ``res_gate = 1`` opens the gate fully so ``H_res`` is the pure Sinkhorn matrix.
    """
    fn, base, scale = (np.asarray(a, np.float32) for a in (fn, base, scale))
    _streams_from_size(base.shape[0])
    return {"proj": fn.T, "base": base, "scale": scale, "res_gate": np.float32(1.0)}


def hyper_connections_values(
    static_alpha: np.ndarray,
    static_beta: np.ndarray,
    dynamic_alpha_fn: np.ndarray,
    dynamic_alpha_scale: float,
    dynamic_beta_fn: np.ndarray,
    dynamic_beta_scale: float,
    norm_gamma: np.ndarray | None = None,
    *,
    num_fracs: int = 1,
) -> dict[str, np.ndarray]:
    """``hyper_connections.HyperConnections`` (tanh, one branch input, ``num_fracs = m``) as dynamic-kind values.

    With ``m = 1``: ``static_alpha [n, 1 + n]`` holds ``[H_pre | H_res]`` in our convention
    (``H_res[i, j] = alpha[i, 1 + j]``), ``static_beta [n]`` holds ``H_post``. With ``m > 1`` its rows are the
    sub-streams in (fraction, stream) order and its columns (output fraction, [branch | streams]):
    ``alpha[f1 n + s, f2 (1 + n) + t]``; ``static_beta[s m + f2]`` weighs every fraction ``f1`` of the branch output
    into sub-stream (s, f2), and ``dynamic_beta_fn [d, m]`` is read through sub-stream (s, f1). tx's sub-streams are
    ``k = s m + f`` (stream-major, the memory order of both). Its norm ``x / rms(x) * (1 + gamma)`` is folded into
    the projection; the alpha scale gates pre and res.
    """
    alpha, beta = np.asarray(static_alpha, np.float32), np.asarray(static_beta, np.float32)
    a_fn, b_fn = np.asarray(dynamic_alpha_fn, np.float32), np.asarray(dynamic_beta_fn, np.float32)
    m = num_fracs
    big = alpha.shape[0]
    n = big // m
    b_fn = b_fn.reshape(b_fn.shape[0], -1)
    if (
        big % m
        or alpha.shape != (big, m * (n + 1))
        or beta.shape != (big,)
        or a_fn.shape[1:] != (m * (n + 1),)
        or b_fn.shape != (a_fn.shape[0], m)
    ):
        raise AdapterError(
            f"unexpected HyperConnections shapes for num_fracs={m}: static_alpha {alpha.shape}, static_beta "
            f"{beta.shape}, dynamic_alpha_fn {a_fn.shape}, dynamic_beta_fn {np.shape(dynamic_beta_fn)} "
            "(need one branch input)"
        )
    # alpha as [f1, s, f2, t] -> ours, rows k = (s, f1)
    a4 = alpha.reshape(m, n, m, n + 1).transpose(1, 0, 2, 3).reshape(big, m, n + 1)  # [k, f2, t]
    pre = a4[:, :, 0]  # [k, f2]
    res = a4[:, :, 1:].transpose(0, 2, 1).reshape(big, big)  # [k, (s', f2)]
    post = np.broadcast_to(beta[None, :], (m, big))  # [f1, (s, f2)]
    fn4 = a_fn.reshape(-1, m, n + 1)  # [d, f2, t]
    proj = np.concatenate([fn4[:, :, 0], b_fn, fn4[:, :, 1:].transpose(0, 2, 1).reshape(-1, big)], axis=1)
    if norm_gamma is not None:
        proj = proj * (1.0 + np.asarray(norm_gamma, np.float32))[:, None]
    base = np.concatenate([pre.ravel(), post.ravel(), res.ravel()])
    scale = np.asarray([dynamic_alpha_scale, dynamic_beta_scale, dynamic_alpha_scale], np.float32)
    return {"proj": proj, "base": base, "scale": scale}
