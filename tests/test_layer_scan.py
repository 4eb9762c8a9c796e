"""tx.models.layer_scan.scan: the layer scan with a written-out backward pass, against jax.lax.scan's own autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx.models import layer_scan

L, T, C = 3, 6, 8


def step(x, weights, trained, consts):
    """A small layer with a bf16-able weight, an fp32 adapter, a shared table and a boolean mask."""
    h = jnp.tanh(jnp.einsum("ti,oi->to", x, weights["w"]) + consts["bias"].astype(x.dtype))
    h = jnp.where(consts["mask"][:, None], h, 0.0)
    # the adapter in fp32, as LoRA's are
    delta = jnp.einsum("ti,oi->to", h.astype(jnp.float32), trained["a"]) * trained["s"]
    return x + delta.astype(x.dtype) + jnp.sin(h * weights["g"])


def step_aux(x, weights, trained, consts):
    """``step`` in layer_scan's form: (x, what the layer reports besides x)."""
    return step(x, weights, trained, consts), None


def inputs(dtype):
    k = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(k[0], (T, C)).astype(dtype)
    weights = {"w": (0.3 * jax.random.normal(k[1], (L, C, C))).astype(dtype), "g": jnp.ones((L, C), dtype)}
    trained = {"a": 0.3 * jax.random.normal(k[2], (L, C, C)), "s": jnp.arange(1.0, L + 1.0)}
    consts = {"bias": jax.random.normal(k[3], (C,)), "mask": jnp.arange(T) % 3 != 1}
    return x, weights, trained, consts


def loss_with(scan_fn, dtype):
    x, weights, trained, consts = inputs(dtype)

    def loss(x, weights, trained):  # the base weights too: a model may be trained in full (recipes do)
        return jnp.sum(jnp.cos(scan_fn(x, weights, trained, consts).astype(jnp.float32)))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, weights, trained)


def lax_scan(x, weights, trained, consts):
    return jax.lax.scan(lambda x, xs: (step(x, xs[0], xs[1], consts), None), x, (weights, trained))[0]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_value_and_gradients_equal_lax_scan(dtype):
    got = loss_with(lambda *a: layer_scan.scan(step_aux, *a)[0], dtype)
    want = loss_with(lax_scan, dtype)
    # the same operations on the same values in a different program: equal up to XLA's fp32 reassociation (and,
    # in bf16, the rounding of that difference once)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)
    for grads in got[1][1:]:  # neither the weights' nor the adapter's gradients are trivially zero
        assert all(np.abs(np.asarray(g, np.float32)).max() > 1e-3 for g in jax.tree.leaves(grads))


def test_weights_are_resliced_and_bf16_residuals_stored_as_bits():
    x, weights, trained, consts = inputs(jnp.bfloat16)
    _, res = layer_scan._fwd(step_aux, x, weights, trained, consts)
    saved = res[3]  # (weight bits, trained leaves, consts, stored residuals, plan)
    assert saved, "the layer input at least must be stored"
    # nothing of the weight's or the adapter's shape is stored: the backward pass slices them again
    assert all(s.shape[1:] != (C, C) for s in saved), [s.shape for s in saved]
    # bf16 residuals (the layer input x among them) are kept as uint16 bits; no bf16 stack remains
    assert any(s.dtype == jnp.uint16 and s.shape == (L, T, C) for s in saved)
    assert all(s.dtype != jnp.bfloat16 for s in saved)
    assert all(s.shape[0] == L for s in saved)


def test_without_differentiation_it_is_the_plain_scan():
    x, weights, trained, consts = inputs(jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(lambda *a: layer_scan.scan(step_aux, *a)[0])(x, weights, trained, consts)),
        np.asarray(jax.jit(lax_scan)(x, weights, trained, consts)),
    )


def test_scan_as_bits_equals_lax_scan_bit_for_bit():
    # decoding's scan: bf16 weights and cache cross the loop as uint16 bits; the values are untouched
    x, weights, trained, consts = inputs(jnp.bfloat16)
    cache = jnp.zeros((L, T, C), jnp.bfloat16)

    def body(x, xs):
        w, t, c = xs
        y = step(x, w, t, consts)
        return y, (c.at[:, :].add(y), y.astype(jnp.float32))

    got = jax.jit(lambda *a: layer_scan.scan_as_bits(body, *a))(x, (weights, trained, cache))
    want = jax.jit(lambda *a: jax.lax.scan(body, *a))(x, (weights, trained, cache))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_random_state_in_trained_is_advanced_and_not_differentiated():
    # LoRA dropout's per-layer keys ride in ``trained`` as integers; the advanced keys come back as aux
    x, weights, trained, consts = inputs(jnp.float32)
    trained = {**trained, "key": jax.random.key_data(jax.random.split(jax.random.key(1), L))}

    def dropout_step(x, weights, trained, consts):
        key, sub = jax.random.split(jax.random.wrap_key_data(trained["key"]))
        keep = jax.random.bernoulli(sub, 0.7, x.shape)
        y = step(jnp.where(keep, x / 0.7, 0.0), weights, trained, consts)
        return y, jax.random.key_data(key)

    def run(scan_fn):
        def loss(x, trained):
            y, keys = scan_fn(x, weights, trained, consts)
            return jnp.sum(jnp.cos(y)), keys

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True, allow_int=True))(x, trained)

    (l1, k1), (gx1, gt1) = run(lambda *a: layer_scan.scan(dropout_step, *a))
    lax = lambda x, w, t, c: jax.lax.scan(lambda x, xs: dropout_step(x, xs[0], xs[1], c), x, (w, t))
    (l2, k2), (gx2, gt2) = run(lax)
    np.testing.assert_array_equal(np.asarray(k1), np.asarray(k2))
    assert not np.array_equal(np.asarray(k1), np.asarray(trained["key"]))  # the keys did advance
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gx1), np.asarray(gx2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gt1["a"]), np.asarray(gt2["a"]), rtol=1e-5, atol=1e-5)
    assert gt1["key"].dtype == jax.dtypes.float0
