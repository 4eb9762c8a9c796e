"""LoRA around a stacked linear: ``y = W x + s * B (A x)`` with ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``).

A :class:`LoRALinear` holds the pretrained :class:`~tx.models.layers.Linear` (the same object: the base weight is never
copied) plus two fp32 :class:`LoRAParam` matrices with the base's leading layer axis::

    lora_a [L, r, in]      random at init (seeded), PEFT's layout of ``lora_A.weight`` per layer
    lora_b [L, out, r]     zero at init, so the adapted model equals the base model exactly

The model scans over the layer axis, so :meth:`LoRALinear.__call__` sees one layer's slice. Layers that are not
adapted (``LoRAConfig.layers``, or a regex target that skips them) keep their slots in the stack but are switched
off by a constant 0/1 :class:`LoRAMask` per layer that multiplies the scale; their gradients are exactly zero and
they are never saved.

Adapter state is marked by its type, never by its path: :class:`LoRAParam` (trainable), :class:`LoRAMask` and
:class:`LoRADropoutKey` (constants / random state). Base weights stay :class:`flax.nnx.Param`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tx.errors import ConfigError
from tx.models.layers import Linear, no_transpose_fold
from tx.models.matmul import acc32

INITS = ("default", "gaussian")
ALL_LINEAR = "all-linear"
_F32 = jnp.float32


class LoRAParam(nnx.Variable):
    """A trainable LoRA matrix. Deliberately not an ``nnx.Param``: ``nnx.Param`` means a frozen base weight in tx."""


class LoRAMask(nnx.Variable):
    """Constant per-layer 0/1 switch of a LoRA delta (``LoRAConfig.layers``); never trained, never saved."""


class LoRADropoutKey(nnx.RngState):
    """Per-layer raw PRNG key data of LoRA dropout, advanced on every training call."""


def _check_names(value, what: str) -> str | tuple[str, ...]:
    if isinstance(value, str):
        if value == ALL_LINEAR:
            return value
        try:
            re.compile(value)
        except re.error as exc:
            raise ConfigError(f"{what} {value!r} is not a valid regular expression: {exc}") from None
        return value
    if not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(
            f"{what} must be 'all-linear', a list of module names (e.g. ['q_proj', 'v_proj']) or a regex string, "
            f"got {value!r}"
        )
    return tuple(value)


class _Patterns(dict):
    """A read-only, hashable {regex: value}: the config is static data of the model's graph, so it must hash."""

    def __hash__(self):
        return hash(tuple(self.items()))

    def _read_only(self, *args, **kwargs):
        raise TypeError("LoRAConfig patterns are read-only; build a new LoRAConfig")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _read_only


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """Which linear projections get LoRA and how (names follow PEFT's ``LoraConfig``).

    Attributes:
        rank: r, the inner dimension of ``B A`` (>= 1).
        alpha: lora_alpha; the delta is scaled by ``alpha / rank`` (``alpha / sqrt(rank)`` with ``use_rslora``).
        targets: "all-linear" (every projection of every block, never the LM head), a list of module names
            (``q_proj``, ``down_proj``, ...; as in PEFT a name matches a module path equal to it or ending in
            ``.name``) or a regex that must match the whole HF module path, e.g. ``model.layers.3.self_attn.q_proj``.
        exclude: modules to leave out, in the same forms as ``targets`` (list or regex; not "all-linear").
        layers: layer indices that get LoRA (None = all), like PEFT's ``layers_to_transform``.
        dropout: lora_dropout on the LoRA branch input, in [0, 1); active unless the model is in ``eval()`` mode.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(rank)``.
        init: "default" (PEFT: kaiming-uniform A, i.e. U(-1/sqrt(in), 1/sqrt(in))) or "gaussian" (A ~ N(0, 1/r)).
        seed: seeds A (and the dropout keys).
        target_parameters: PEFT's ``target_parameters``: parameter paths (exact or ``.name`` suffix) adapted as
            weights, e.g. ``experts.gate_up_proj`` or ``gate.weight`` (a MoE router). ``targets`` reach the same
            tensors by module: ``experts`` (both expert tensors), ``gate_up_proj``, ``gate``.
        rank_pattern / alpha_pattern: PEFT's per-module rank and alpha: {regex: value}, a key matching the end of a
            module or parameter path (``.*\\.gate_up_proj``) sets that module's rank / alpha.
    """

    rank: int = 8
    alpha: float = 16
    targets: str | Sequence[str] = ALL_LINEAR
    exclude: str | Sequence[str] = ()
    layers: Sequence[int] | int | None = None
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "default"
    seed: int = 0
    target_parameters: Sequence[str] = ()
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int | np.integer) or self.rank < 1:
            raise ConfigError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not self.alpha > 0:
            raise ConfigError(f"LoRA alpha must be a number > 0, got {self.alpha!r}")
        if self.init not in INITS:
            raise ConfigError(f"unknown LoRA init {self.init!r}; use one of {', '.join(map(repr, INITS))}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer):
            raise ConfigError(f"LoRA seed must be an integer, got {self.seed!r}")
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "targets", _check_names(self.targets, "LoRA targets"))
        if self.exclude == ALL_LINEAR:
            raise ConfigError("LoRA exclude cannot be 'all-linear'")
        object.__setattr__(self, "exclude", _check_names(self.exclude, "LoRA exclude") if self.exclude else ())
        if self.targets == ():
            raise ConfigError("LoRA targets is empty; use 'all-linear' or name the modules")
        layers = self.layers
        if layers is not None:
            if isinstance(layers, int | np.integer) and not isinstance(layers, bool):
                layers = (layers,)
            if (
                isinstance(layers, str)
                or not isinstance(layers, Sequence)
                or not layers
                or not all(isinstance(i, int | np.integer) and not isinstance(i, bool) and i >= 0 for i in layers)
            ):
                raise ConfigError(f"LoRA layers must be None or a non-empty list of layer indices >= 0, got {layers!r}")
            object.__setattr__(self, "layers", tuple(sorted({int(i) for i in layers})))
        if isinstance(self.target_parameters, str) or not all(isinstance(t, str) and t for t in self.target_parameters):
            raise ConfigError(
                f"LoRA target_parameters must be a list of parameter names (e.g. ['experts.gate_up_proj']), got "
                f"{self.target_parameters!r}"
            )
        object.__setattr__(self, "target_parameters", tuple(self.target_parameters))
        for what, pattern, kind in (
            ("rank_pattern", self.rank_pattern, int),
            ("alpha_pattern", self.alpha_pattern, float),
        ):
            if not isinstance(pattern, Mapping) or not all(
                isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool) and v > 0
                for k, v in pattern.items()
            ):
                raise ConfigError(f"LoRA {what} must map regex strings to positive numbers, got {pattern!r}")
            if kind is int and not all(isinstance(v, int) for v in pattern.values()):
                raise ConfigError(f"LoRA rank_pattern values must be integers, got {pattern!r}")
            object.__setattr__(self, what, _Patterns(pattern))

    @property
    def scale(self) -> float:
        """The factor of ``B A``: alpha / r, or alpha / sqrt(r) for rsLoRA."""
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank

    def rank_and_scale(self, path: str) -> tuple[int, float]:
        """(rank, scale) of the module or parameter at HF ``path``, after ``rank_pattern`` / ``alpha_pattern`` (the
        first key whose regex matches the end of the path, as PEFT's ``get_pattern_key``)."""
        rank = _pattern_value(self.rank_pattern, path, self.rank)
        alpha = _pattern_value(self.alpha_pattern, path, self.alpha)
        return rank, (alpha / math.sqrt(rank) if self.use_rslora else alpha / rank)


def _pattern_value(pattern: Mapping, path: str, default):
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def init_lora_a(key: jax.Array, shape: tuple[int, ...], init: str) -> jax.Array:
    """A [..., r, in] in fp32: PEFT's kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), or N(0, (1/r)^2)."""
    r, d_in = shape[-2:]
    if init == "gaussian":
        return jax.random.normal(key, shape, _F32) / r
    bound = 1.0 / math.sqrt(d_in)
    return jax.random.uniform(key, shape, _F32, -bound, bound)


def _place_like(value: jax.Array, like: jax.Array, axes) -> jax.Array:
    """Put a new adapter array on the mesh of the weight it adapts (replicated on one device: a no-op)."""
    sharding = getattr(like, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        from tx.sharding import sharding_for

        return jax.device_put(value, sharding_for(sharding.mesh, axes, value.shape))
    return value


class LoRALinear(nnx.Module):
    """A :class:`~tx.models.layers.Linear` plus a low-rank delta: ``y = base(x) + s * m * (x A^T) B^T``.

    ``base.weight`` is ``[*stack, out, in]``; ``lora_a [*stack, r, in]`` and ``lora_b [*stack, out, r]`` are fp32 and
    cast to the activation dtype in compute; ``m`` is the per-layer :class:`LoRAMask` (absent when every layer is
    adapted). ``name`` is the module's short name (``q_proj``...), used for the PEFT key layout.

    Example:
        >>> from tx.models.layers import Linear
        >>> base = Linear(6, 4, bias=False, axes=("fsdp", "tp"), dtype=jnp.float32, rngs=nnx.Rngs(0))
        >>> lora = LoRALinear(base, name="q_proj", rank=2, scale=2.0, key=jax.random.key(0))
        >>> x = jnp.ones((3, 6))
        >>> bool(jnp.array_equal(lora(x), base(x)))  # B = 0 at init
        True
        >>> lora.lora_a.shape, lora.lora_b.shape
        ((2, 6), (4, 2))
    """

    def __init__(
        self,
        base: Linear,
        *,
        name: str,
        rank: int,
        scale: float,
        key: jax.Array,
        init: str = "default",
        mask: np.ndarray | None = None,
        dropout: float = 0.0,
    ):
        self.base = base
        self.name = name
        self.rank = rank
        self.scale = float(scale)
        self.dropout = float(dropout)
        self.enabled = True
        self.deterministic = False  # nnx convention: model.eval() sets True, model.train() sets False
        weight = base.weight
        stack, (d_out, d_in) = weight.shape[:-2], weight.shape[-2:]
        w_axes = weight.get_metadata().get("axes") or (None,) * weight.ndim
        lead, out_axis, in_axis = tuple(w_axes[:-2]), w_axes[-2], w_axes[-1]
        a_key, drop_key = jax.random.split(key)
        a_axes, b_axes = (*lead, "lora", in_axis), (*lead, out_axis, "lora")
        a = init_lora_a(a_key, (*stack, rank, d_in), init)
        b = jnp.zeros((*stack, d_out, rank), _F32)
        self.lora_a = LoRAParam(_place_like(a, weight[...], a_axes), axes=a_axes)
        self.lora_b = LoRAParam(_place_like(b, weight[...], b_axes), axes=b_axes)
        if mask is not None and not np.all(mask == 1):
            mask = np.asarray(mask, np.float32)
            if mask.shape != tuple(stack):
                raise ConfigError(f"LoRA layer mask has shape {mask.shape}, expected {tuple(stack)}")
            self.lora_mask = LoRAMask(jnp.asarray(mask), axes=lead)
        else:
            self.lora_mask = None
        if self.dropout > 0:
            keys = jax.random.split(drop_key, int(np.prod(stack, dtype=int)))
            data = jax.random.key_data(keys)
            self.dropout_key = LoRADropoutKey(data.reshape(*stack, *data.shape[1:]))
        else:
            self.dropout_key = None

    @property
    def layer_mask(self) -> np.ndarray:
        """0/1 per layer [*stack] (all ones when every layer is adapted)."""
        if self.lora_mask is None:
            return np.ones(self.base.weight.shape[:-2], np.float32)
        return np.asarray(self.lora_mask[...], np.float32)

    def delta_weight(self) -> jax.Array:
        """``s * m * B A`` in fp32, [*stack, out, in]: what :func:`merge` adds to the base weight."""
        delta = jnp.einsum(
            "...or,...ri->...oi", self.lora_b[...], self.lora_a[...], precision=jax.lax.Precision.HIGHEST
        )
        scale = self.scale * jnp.asarray(self.layer_mask)
        return delta * scale[..., None, None]

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        if not self.enabled:
            return y
        h = x
        if self.dropout > 0 and not self.deterministic:
            key, sub = jax.random.split(jax.random.wrap_key_data(self.dropout_key[...]))
            self.dropout_key.set_value(jax.random.key_data(key))
            keep = jax.random.bernoulli(sub, 1.0 - self.dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - self.dropout), jnp.zeros((), h.dtype)).astype(x.dtype)
        scale = self.scale if self.lora_mask is None else self.scale * self.lora_mask[...]
        d = lora_delta(h, self.lora_a[...], self.lora_b[...], jnp.asarray(scale, _F32))
        return y + d.astype(y.dtype)


@jax.custom_vjp
def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """``scale * (x A^T) B^T``: x ``[..., in]``, a ``[r, in]``, b ``[out, r]``, scalar scale -> ``[..., out]``.

    ``a``, ``b`` and ``scale`` are fp32 and cast to x's dtype for the matmuls, which accumulate in fp32
    (:mod:`tx.models.matmul`); the gradients of ``a`` and ``b`` come out in fp32, never rounded to x's dtype.

    The same product as two einsums, with a hand-written backward pass: every gradient is a matmul whose large
    operand is already laid out as the matmul wants it. Left to autodiff, the gradient of ``b`` is computed as
    ``g^T d`` in b's ``[out, r]`` layout, and XLA on CPU transposes the ``[tokens, out]`` cotangent to get there,
    fusing the transpose into the preceding elementwise ops; those strided fusions cost more than the whole
    forward pass of the model on CPU.
    """
    return _lora_delta_fwd(x, a, b, scale)[0]


def _lora_delta_fwd(x, a, b, scale):
    xt = x.reshape(-1, x.shape[-1])
    d = acc32("ti,ri->tr", xt, a.astype(x.dtype), x.dtype)
    y = acc32("tr,or->to", d * scale.astype(x.dtype), b.astype(x.dtype), x.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1]), (x, a, b, scale, d)


def _lora_delta_bwd(res, g):
    x, a, b, scale, d = res
    dt = x.dtype
    xt, gt = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]).astype(dt)
    gd = acc32("to,or->tr", gt, b.astype(dt), _F32)  # [T, r]: cotangent of the unscaled d, before the scale
    # [r, out], then a transpose of the small result; the no-op reduce_precision (to the same precision) keeps
    # XLA from folding the transpose into the matmul, which would then read the large cotangent transposed
    gb_t = no_transpose_fold(acc32("tr,to->ro", d * scale.astype(dt), gt, _F32))
    gds = (gd * scale).astype(dt)
    ga = acc32("tr,ti->ri", gds, xt, _F32)
    gx = acc32("tr,ri->ti", gds, a.astype(dt), dt)
    gscale = jnp.sum(gd * d.astype(_F32)).astype(scale.dtype).reshape(scale.shape)
    return gx.reshape(x.shape), ga.astype(a.dtype), gb_t.T.astype(b.dtype), gscale


lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


def merge(lora: LoRALinear) -> Linear:
    """Fold ``s * m * B A`` into the base weight (in fp32, then cast to the weight's dtype); returns the base Linear."""
    weight = lora.base.weight
    merged = weight[...].astype(_F32) + lora.delta_weight()
    weight.set_value(merged.astype(weight.dtype))
    return lora.base
