"""Rotary position embeddings as data: a :class:`RopeConfig` per rope kind, parsed from config.json.

Kinds (transformers' ``rope_type``): ``default``, ``linear`` (positions divided by ``factor``), ``llama3``
(wavelength-banded scaling), ``yarn`` (NTK-by-parts ramp between interpolated and extrapolated frequencies and an
attention factor on cos / sin), ``longrope`` (per-frequency short / long factors, the long ones once a sequence
reaches past ``original_max_position_embeddings``, and an attention factor) and ``dynamic`` (NTK-aware base that
grows with the sequence length past ``max_position_embeddings``). ``partial_rotary_factor`` < 1 rotates only the
first ``rotary_dim`` channels of each head (:func:`apply_rope` passes the rest through).

``dynamic`` and ``longrope`` depend on the longest position of the call (as transformers' rotary modules do in each
forward), selected with ``jnp.where`` so one compiled function serves every length.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from tx.errors import ConfigError

KINDS = ("default", "linear", "llama3", "yarn", "longrope", "dynamic")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """Rotary embedding parameters (hashable). ``rotary_dim``: channels rotated per head (0: the whole head)."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192
    max_positions: int = 4096
    rotary_dim: int = 0
    attention_factor: float = 1.0  # multiplies cos and sin (yarn, longrope)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()

    def dim(self, head_dim: int) -> int:
        return self.rotary_dim or head_dim


def _num(params: dict, key: str, default, path: str, kind=float):
    value = params.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{path}: rope parameter {key!r} must be a number, found {value!r}")
    return kind(value)


def parse_rope(params: dict, data: dict, head_dim: int, path: str) -> RopeConfig:
    """One rope parameter dict (transformers 5 ``rope_parameters`` or an older ``rope_scaling`` merged with the
    top-level ``rope_theta``) -> :class:`RopeConfig`. ``data``: the whole config (``max_position_embeddings``,
    ``original_max_position_embeddings``, ``partial_rotary_factor`` may sit there)."""
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind in ("su",):  # Phi-3's old name
        kind = "longrope"
    if kind not in KINDS:
        raise ConfigError(f"{path}: rope_parameters.rope_type {kind!r} is not supported; supported: {', '.join(KINDS)}")
    theta = _num(params, "rope_theta", _num(data, "rope_theta", 10000.0, path), path)
    max_positions = _num(data, "max_position_embeddings", 4096, path, int)
    original = _num(params, "original_max_position_embeddings", None, path, int)
    if original is None:
        original = _num(data, "original_max_position_embeddings", None, path, int)
    partial = _num(params, "partial_rotary_factor", _num(data, "partial_rotary_factor", 1.0, path), path)
    dim = int(head_dim * partial)
    if dim < 2 or dim > head_dim or dim % 2:
        raise ConfigError(
            f"{path}: partial_rotary_factor {partial} gives {dim} rotary channels of head_dim {head_dim}; "
            "it must give an even number between 2 and head_dim"
        )
    factor = _num(params, "factor", None, path)
    fields = dict(theta=theta, kind=kind, max_positions=max_positions, rotary_dim=0 if dim == head_dim else dim)
    need_original = kind in ("llama3", "yarn", "longrope")
    if need_original and original is None:
        raise ConfigError(f"{path}: rope type {kind!r} needs 'original_max_position_embeddings'")
    if kind in ("linear", "dynamic", "llama3") and factor is None:
        raise ConfigError(f"{path}: rope type {kind!r} needs 'factor'")
    if kind == "llama3":
        fields.update(
            low_freq_factor=_num(params, "low_freq_factor", 1.0, path),
            high_freq_factor=_num(params, "high_freq_factor", 4.0, path),
        )
    if kind in ("yarn", "longrope") and factor is None:
        factor = max_positions / original  # transformers: the ratio when the factor is not given
    attention = _num(params, "attention_factor", None, path)
    if kind == "yarn":
        mscale, mscale_all = _num(params, "mscale", None, path), _num(params, "mscale_all_dim", None, path)
        if attention is None:
            if mscale and mscale_all:
                attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
            else:
                attention = _yarn_mscale(factor)
        truncate = params.get("truncate", True)
        fields.update(
            beta_fast=float(params.get("beta_fast") or 32),
            beta_slow=float(params.get("beta_slow") or 1),
            truncate=True if truncate is None else bool(truncate),
        )
    if kind == "longrope":
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        for key in ("short_factor", "long_factor"):
            value = params.get(key)
            if (
                not isinstance(value, list)
                or len(value) != dim // 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            ):
                raise ConfigError(
                    f"{path}: longrope {key!r} must be a list of {dim // 2} numbers (rotary dim {dim} / 2), "
                    f"found {value!r}"
                )
            fields[key] = tuple(float(v) for v in value)
    return RopeConfig(
        **fields,
        factor=1.0 if factor is None else float(factor),
        original_max_positions=original if original is not None else 8192,
        attention_factor=1.0 if attention is None else float(attention),
    )


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _base_inv_freq(theta, dim: int) -> jax.Array:
    return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def inv_freq(rope: RopeConfig, head_dim: int, seq_len: jax.Array | None = None) -> jax.Array:
    """Inverse frequencies [rotary_dim // 2] in fp32. ``seq_len`` (scalar, the longest position + 1) picks
    dynamic NTK's base and longrope's factors; None: as for a sequence within the original length."""
    dim = rope.dim(head_dim)
    inv = _base_inv_freq(rope.theta, dim)
    if rope.kind == "linear":
        return inv / rope.factor
    if rope.kind == "llama3":
        low_wavelen = rope.original_max_positions / rope.low_freq_factor
        high_wavelen = rope.original_max_positions / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (rope.original_max_positions / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    if rope.kind == "yarn":
        return _yarn_inv_freq(rope, dim)
    if rope.kind == "longrope":
        shape = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
        short = 1.0 / (jnp.asarray(rope.short_factor, jnp.float32) * rope.theta**shape)
        if seq_len is None:
            return short
        long = 1.0 / (jnp.asarray(rope.long_factor, jnp.float32) * rope.theta**shape)
        return jnp.where(seq_len > rope.original_max_positions, long, short)
    if rope.kind == "dynamic" and seq_len is not None:
        grown = jnp.maximum(seq_len, rope.max_positions).astype(jnp.float32)
        base = rope.theta * ((rope.factor * grown / rope.max_positions) - (rope.factor - 1)) ** (dim / (dim - 2))
        return jnp.where(seq_len > rope.max_positions, 1.0 / (base ** (jnp.arange(0, dim, 2) / dim)), inv)
    return inv


def _yarn_inv_freq(rope: RopeConfig, dim: int) -> jax.Array:
    def correction_dim(rotations):
        return (dim * math.log(rope.original_max_positions / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as the reference: no division by zero
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    pos_freqs = rope.theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    extrapolation = 1 - ramp
    return (1.0 / (rope.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def rope_tables(rope: RopeConfig, head_dim: int, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin: [B, S, rotary_dim] in fp32 for integer positions [B, S], times the kind's attention factor."""
    seq_len = jnp.max(positions) + 1 if rope.kind in ("dynamic", "longrope") else None
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq(rope, head_dim, seq_len)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if rope.attention_factor != 1.0:
        cos, sin = cos * rope.attention_factor, sin * rope.attention_factor
    return cos, sin


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, S, heads, D]; rotate-half convention of Hugging Face on the first ``cos.shape[-1]`` channels."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        x1, x2 = jnp.split(x, 2, axis=-1)
        return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
    xr, rest = x[..., :rot], x[..., rot:]
    x1, x2 = jnp.split(xr, 2, axis=-1)
    return jnp.concatenate([xr * cos + jnp.concatenate([-x2, x1], axis=-1) * sin, rest], axis=-1)
