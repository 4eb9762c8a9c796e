"""Two-operand einsum that accumulates bf16 / fp16 operands in fp32, forward and backward.

A bf16 x bf16 matmul whose result is bf16 runs on XLA:CPU's generic path (~250 GFLOP/s on the 2-core test
machine, no faster than fp32). Asked for an fp32 result (``preferred_element_type``), the same matmul goes to
the AMX / AVX512-BF16 kernels (~1500 GFLOP/s there) and accumulates in fp32, as PyTorch does for bf16.
Left to autodiff, the gradient matmuls of such an einsum get an fp32 cotangent and a bf16 operand, and run in
fp32. :func:`einsum` rounds the cotangent to the operands' dtype first, so every pass takes the fast path.

fp32 operands (and every backend but CPU, where a bf16 matmul already accumulates in fp32) get plain
``jnp.einsum``: nothing changes there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_F32 = jnp.float32
LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def einsum(spec: str, a: jax.Array, b: jax.Array, out_dtype=None) -> jax.Array:
    """``jnp.einsum(spec, a, b)`` in ``out_dtype`` (default: ``a``'s dtype), accumulated in fp32.

    ``spec`` is explicit (``"ab,bc->ac"``), without ellipsis, and every index of an operand appears in the other
    operand or in the output (so both gradients are einsums of the same kind).

    Example:
        >>> x = jnp.ones((2, 3), jnp.bfloat16)
        >>> w = jnp.ones((4, 3), jnp.bfloat16)
        >>> einsum("ti,oi->to", x, w).dtype, einsum("ti,oi->to", x, w, out_dtype=jnp.float32).dtype
        (dtype(bfloat16), dtype('float32'))
    """
    out_dtype = jnp.dtype(out_dtype or a.dtype)
    if a.dtype != b.dtype or a.dtype not in LOW_PRECISION or jax.default_backend() != "cpu":
        if out_dtype == jnp.result_type(a, b):
            return jnp.einsum(spec, a, b)
        return jnp.einsum(spec, a, b, preferred_element_type=_F32).astype(out_dtype)
    _check(spec)
    return _einsum_acc32(spec, out_dtype, a, b)


def _check(spec: str) -> None:
    ins, arrow, out = spec.partition("->")
    sa, comma, sb = ins.partition(",")
    if not arrow or not comma or "," in sb or "." in spec or len(set(sa)) != len(sa) or len(set(sb)) != len(sb):
        raise ValueError(f"einsum spec {spec!r}: need 'lhs,rhs->out' without ellipsis or repeated indices")
    for own, other in ((sa, sb), (sb, sa)):
        if set(own) - set(other) - set(out):
            raise ValueError(f"einsum spec {spec!r}: an index of {own!r} is in neither {other!r} nor {out!r}")


def acc32(spec: str, a: jax.Array, b: jax.Array, out_dtype) -> jax.Array:
    """The einsum with fp32 accumulation and the result cast to ``out_dtype``; for use inside custom VJPs."""
    return jnp.einsum(spec, a, b, preferred_element_type=_F32).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _einsum_acc32(spec, out_dtype, a, b):
    return acc32(spec, a, b, out_dtype)


def _fwd(spec, out_dtype, a, b):
    return acc32(spec, a, b, out_dtype), (a, b)


def _bwd(spec, out_dtype, res, g):
    a, b = res
    ins, _, out = spec.partition("->")
    sa, _, sb = ins.partition(",")
    g = g.astype(a.dtype)
    return acc32(f"{out},{sb}->{sa}", g, b, a.dtype), acc32(f"{out},{sa}->{sb}", g, a, b.dtype)


_einsum_acc32.defvjp(_fwd, _bwd)
