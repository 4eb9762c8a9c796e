"""Connector adapter: reference parity, identity at init, gradients, mHC invariants, dtypes and config errors.

Shapes are tiny (C = 16, n <= 4, a few tokens) so the file runs in seconds on a shared CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tx.adapters.connector import (
    KINDS,
    Connector,
    ConnectorConfig,
    ConnectorParam,
    FrozenConnectorParam,
    StreamEdges,
    collapse,
    connector_layer,
    deepseek_v4_values,
    hyper_connections_values,
    mix,
    reflect_gate,
    set_layer_values,
    sinkhorn,
)
from tx.errors import AdapterError, ConfigError

B, S, C = 2, 5, 16


def _normal(seed, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _sublayer(seed, dtype=jnp.float32):
    """A random nonlinear, non-symmetric stand-in for norm + attention / MLP: [..., C] -> [..., C]."""
    m = _normal(seed, (C, C), C**-0.5).astype(dtype)
    b = _normal(seed + 1, (C,), 0.5).astype(dtype)
    return lambda u: jnp.tanh(u @ m + b) * 1.5


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _run_stack(conn, x, ms):
    """Run a stacked connector as the model does: split, scan over the layer axis, merge the slice in the body."""
    graphdef, state = nnx.split(conn)

    def body(x, xs):
        layer_state, m = xs
        layer = nnx.merge(graphdef, layer_state)
        return layer(x, lambda u: jnp.tanh(u @ m)), None

    x, _ = jax.lax.scan(body, x, (state, ms))
    return x


# ------------------------------------------------------------------------------------------ 1. reference parity


@pytest.mark.parametrize("iters, hc_eps, balance", [(20, 1e-6, False), (3, 1e-4, False), (20, 1e-6, True)])
def test_mhc_matches_deepseek_v4(iters, hc_eps, balance):
    torch = pytest.importorskip("torch")
    dsv4 = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
    from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config

    n = 4
    cfg = DeepseekV4Config(hidden_size=C, hc_mult=n, hc_sinkhorn_iters=iters, hc_eps=hc_eps)
    ref = dsv4.DeepseekV4HyperConnection(cfg)
    gen = torch.Generator().manual_seed(0)
    # balance=True leaves a converged Sinkhorn unchanged only up to its row error: moderate logits there
    res_scale = 0.5 if balance else 1.5
    with torch.no_grad():
        ref.fn.copy_(torch.randn(ref.fn.shape, generator=gen) * (n * C) ** -0.5)
        ref.base.copy_(torch.randn(ref.base.shape, generator=gen) * 0.5)
        ref.scale.copy_(torch.tensor([0.7, -1.3, res_scale]))
    x = np.array(_normal(3, (B, S, n, C)))
    post_ref, comb_ref, collapsed_ref = (t.detach().numpy() for t in ref(torch.from_numpy(x)))

    config = ConnectorConfig(
        expansion_rate=cfg.hc_mult,
        kind="mhc",
        sinkhorn_iters=cfg.hc_sinkhorn_iters,
        eps=cfg.hc_eps,
        norm_eps=cfg.rms_norm_eps,
        sinkhorn_balance=balance,
    )
    conn = Connector(config, C, 2, rngs=nnx.Rngs(0))
    set_layer_values(
        conn, 1, deepseek_v4_values(ref.fn.detach().numpy(), ref.base.detach().numpy(), ref.scale.detach().numpy())
    )
    layer = connector_layer(conn, 1)
    pre, post, res = layer.coefficients(jnp.asarray(x))
    errs = {
        "post": float(np.abs(post - post_ref).max()),
        "comb": float(np.abs(res - comb_ref).max()),
        "collapsed": float(np.abs(collapse(jnp.asarray(x), pre) - collapsed_ref).max()),
    }
    # the whole step as the DeepSeek decoder layer combines it: post * f(collapsed) + comb^T @ x
    f = _sublayer(7)
    y_ref = np.asarray(f(jnp.asarray(collapsed_ref)))
    out_ref = post_ref[..., None] * y_ref[..., None, :] + np.matmul(np.swapaxes(comb_ref, -1, -2), x)
    errs["output"] = float(np.abs(layer(jnp.asarray(x), f) - out_ref).max())
    print(f"deepseek-v4 parity (iters={iters}, eps={hc_eps}, balance={balance}): max abs errors {errs}")
    assert max(errs.values()) < 1e-5, errs


def test_dynamic_matches_hyper_connections():
    torch = pytest.importorskip("torch")
    hc_mod = pytest.importorskip("hyper_connections")

    n = 4
    ref = hc_mod.HyperConnections(n, dim=C, tanh=True, layer_index=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim else 0.5))
    x = np.array(_normal(4, (B, S, n, C)))
    y = np.array(_normal(5, (B, S, C)))
    to_ref = lambda a: torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, 2, 1).reshape(B * n, S, C)))
    branch_ref, add_residual = ref(to_ref(x))
    out_ref = np.moveaxis(add_residual(torch.from_numpy(y)).detach().numpy().reshape(B, n, S, C), 1, 2)
    branch_ref = branch_ref.detach().numpy()

    values = hyper_connections_values(
        *(
            getattr(ref, name).detach().numpy()
            for name in (
                "static_alpha",
                "static_beta",
                "dynamic_alpha_fn",
                "dynamic_alpha_scale",
                "dynamic_beta_fn",
                "dynamic_beta_scale",
            )
        ),
        norm_gamma=ref.norm.gamma.detach().numpy(),
    )
    conn = Connector(ConnectorConfig(expansion_rate=n, kind="dynamic"), C, 3, rngs=nnx.Rngs(0))
    set_layer_values(conn, 2, values)
    layer = connector_layer(conn, 2)
    xj = jnp.asarray(x)
    pre, post, res = layer.coefficients(xj)
    branch = collapse(xj, pre)
    out = layer(xj, lambda u: jnp.asarray(y))
    errs = {
        "branch_input": float(np.abs(branch - branch_ref).max()),
        "output": float(np.abs(out - out_ref).max()),
        "output_via_mix": float(np.abs(mix(xj, jnp.asarray(y), post, res) - out_ref).max()),
    }
    print(f"hyper_connections parity: max abs errors {errs}")
    assert max(errs.values()) < 1e-5, errs


def test_set_layer_values_rejects_wrong_shapes():
    conn = Connector(ConnectorConfig(expansion_rate=2, kind="mhc"), C, 2, rngs=nnx.Rngs(0))
    with pytest.raises(AdapterError, match="proj"):
        set_layer_values(conn, 0, {"proj": np.zeros((3, 3))})
    with pytest.raises(AdapterError, match="nope"):
        set_layer_values(conn, 0, {"nope": np.zeros(3)})


# ------------------------------------------------------------------------------------------- 2. identity at init


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_identity_at_init(kind, n):
    conn = Connector(ConnectorConfig(expansion_rate=n, kind=kind), C, 3, rngs=nnx.Rngs(0))
    edges = StreamEdges(n)
    h, f = _normal(1, (B, S, C)), _sublayer(2)
    ms = _normal(3, (3, C, C), C**-0.5)
    graphdef, state = nnx.split(conn)

    @jax.jit
    def run(state):
        conn = nnx.merge(graphdef, state)
        layer = connector_layer(conn, 1)
        one = edges.reduce(layer(edges.expand(h), f))
        stacked = edges.reduce(_run_stack(conn, edges.expand(h), ms))  # three layers through lax.scan
        plain, _ = jax.lax.scan(lambda x, m: (x + jnp.tanh(x @ m), None), h, ms)  # the base model's stack
        return one, stacked, plain, layer.coefficients(edges.expand(h))

    out, stacked, plain, (pre, post, res) = run(state)
    expected = h + f(h)
    assert out.shape == h.shape
    assert pre.shape == (B, S, n) and post.shape == (B, S, n) and res.shape == (B, S, n, n)
    np.testing.assert_array_equal(post, 1.0)
    np.testing.assert_array_equal(res, np.broadcast_to(np.eye(n), res.shape))
    np.testing.assert_allclose(pre, 1.0 / n, rtol=1e-7, atol=0)
    if n == 1:
        assert not nnx.state(conn, nnx.Variable)  # the plain residual has no variables
        layer = connector_layer(conn, 1)
        np.testing.assert_array_equal(edges.reduce(layer(edges.expand(h), f)), expected)  # eager vs eager
        np.testing.assert_array_equal(stacked, plain)  # scanned vs scanned
    else:
        err, err_stack = _rel_err(out, expected), _rel_err(stacked, plain)
        print(f"{kind} n={n}: identity rel err {err:.2e}, 3-layer scan {err_stack:.2e}")
        assert err <= 1e-6 and err_stack <= 1e-6


def test_disabled_connector_and_edges_are_the_plain_residual():
    conn = Connector(ConnectorConfig(expansion_rate=4), C, 2, rngs=nnx.Rngs(0))
    layer = connector_layer(conn, 0)
    layer.enabled = False
    edges = StreamEdges(4)
    edges.enabled = False
    h, f = _normal(1, (B, S, C)), _sublayer(2)
    np.testing.assert_array_equal(edges.reduce(layer(edges.expand(h), f)), h + f(h))
    one = StreamEdges(1)
    assert one.expand(h).shape == (B, S, 1, C)
    np.testing.assert_array_equal(one.reduce(one.expand(h)), h)
    np.testing.assert_allclose(StreamEdges(3).reduce(StreamEdges(3).expand(h)), h, rtol=2**-23, atol=0)


# ----------------------------------------------------------------------------------------------- 3. gradients

LAYERS = 2


def _stack_loss_parts(kind, n=4, layers=LAYERS):
    """A stacked connector and ``loss(params, x, w)``: MSE of the stream combination ``sum_j w[j] x[j]``.

    ``w = 1/n`` is the model's mean reduce; an uneven ``w`` stands for a downstream that tells streams apart.
    """
    conn = Connector(ConnectorConfig(expansion_rate=n, kind=kind), C, layers, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(conn, ConnectorParam, ...)
    ms = _normal(11, (layers, C, C), C**-0.5)
    target = _normal(12, (B, S, C))

    def loss(params, x, w):
        out = jnp.einsum("...jc,j->...c", _run_stack(nnx.merge(graphdef, params, rest), x, ms), w)
        return jnp.mean((out - target) ** 2)

    return graphdef, params, rest, loss


def _grad_norms(grads):
    """Largest |gradient| per variable name (base, scale, proj, res_gate)."""
    return {path[0]: float(jnp.abs(leaf[...]).max()) for path, leaf in nnx.to_flat_state(grads)}


def _all_layer_coefficients(conn, x):
    """``coefficients(x)`` of every layer at once (vmapped over the layer axis): arrays ``[L, B, S, ...]``."""
    graphdef, state = nnx.split(conn)
    return jax.jit(jax.vmap(lambda st: nnx.merge(graphdef, st).coefficients(x)))(state)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_at_init_and_training_leaves_identity(kind):
    """Gradients at init, then a few Adam steps from the exact identity: streams differ and H_res leaves I.

    At init every group has a gradient except the ones that are zero by design:

    - ``proj`` sits behind gates that are exactly 0, so its gradient is 0 (product rule) until a gate opens.
    - mhc ``res_gate``: at init the whole stack is symmetric in the streams, so the downstream gradient is the same
      for every output stream j, and ``<dL/dH_res, P - I> = sum_i a_i (rowsum_i(P) - 1) = 0`` for every
      row-stochastic P. No doubly stochastic parametrisation can do better; the gradient appears as soon as the
      pre / post gates have opened (one step) and the streams are told apart, shown here by an uneven ``w``.
    """
    n = 4
    graphdef, params, rest, loss = _stack_loss_parts(kind, n)
    x0 = StreamEdges(n).expand(_normal(1, (B, S, C)))
    mean = jnp.full((n,), 1.0 / n)  # the model's mean reduce
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, x, w):
        value, grads = jax.value_and_grad(loss)(params, x, w)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, value, grads

    distinct = x0 + _normal(2, (B, S, n, C), 0.3)
    g_apart = _grad_norms(step(params, opt_state, distinct, jnp.asarray([0.7, 0.1, -0.3, 0.5]))[3])
    losses, grads = [], []
    for _ in range(8):
        params, opt_state, value, g = step(params, opt_state, x0, mean)
        losses.append(float(value))
        grads.append(_grad_norms(g))
    g_init = grads[0]
    print(f"{kind}: max |grad| at init {g_init}; distinct streams, uneven reduce {g_apart}; after 1 step {grads[1]}")
    for name in ("base", "scale"):
        assert g_init[name] > 1e-3 and g_apart[name] > 1e-3, name
    assert g_init["proj"] == 0.0 and g_apart["proj"] == 0.0
    if kind in ("mhc", "mhc_lite"):
        assert g_init["res_gate"] < 1e-4
        assert g_apart["res_gate"] > 1e-3
    assert grads[1]["proj"] > 1e-4  # non-zero from the second step
    if kind == "mhc_lite":
        # Here the first layer sees equal streams (x0) and the last one feeds the mean reduce, so with an exactly
        # doubly stochastic H_res the gate's gradient is exactly 0 in both (equal inputs: column sums 1; mean
        # reduce: row sums 1); mhc's is non-zero only through Sinkhorn's last-step row / column error. The gate
        # does train once inputs and downstream tell the streams apart (g_apart above, and
        # tests/test_connector_variants.py).
        assert grads[-1].pop("res_gate") < 1e-5
    assert all(v > 1e-6 for v in grads[-1].values()), grads[-1]
    assert losses[-1] < losses[0]

    conn = nnx.merge(graphdef, params, rest)
    streams = _run_stack(conn, x0, _normal(11, (LAYERS, C, C), C**-0.5))
    spread = float(jnp.abs(streams - streams.mean(axis=-2, keepdims=True)).max() / jnp.abs(streams).max())
    moved = float(jnp.abs(_all_layer_coefficients(conn, x0)[2] - jnp.eye(n)).max())
    print(f"{kind}: grads at step 8 {grads[-1]}")
    print(f"{kind}: loss {losses[0]:.4f} -> {losses[-1]:.4f}, stream spread {spread:.2e}, max |H_res - I| {moved:.2e}")
    assert spread > 1e-3 and moved > 1e-3


# ------------------------------------------------------------------------------------------- 4. mHC invariants


def _randomise(conn, seed, proj_scale=1.0, gates=None):
    """Random mhc parameters for every layer, the residual gate set to ``gates`` (one per layer)."""
    state = nnx.state(conn, ConnectorParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves)]
    state = jax.tree.unflatten(treedef, leaves)
    nnx.update(conn, state)
    conn.proj[...] = conn.proj[...] * proj_scale
    if gates is not None:
        conn.res_gate[...] = jnp.asarray(gates, jnp.float32)


def _check_doubly_stochastic(res, tol=1e-5):
    rows, cols = float(jnp.abs(res.sum(-1) - 1).max()), float(jnp.abs(res.sum(-2) - 1).max())
    assert rows < tol and cols < tol, (rows, cols)
    assert float(res.min()) >= 0.0
    return rows, cols


def test_mhc_invariants_random_parameters():
    n = 4
    cfg = ConnectorConfig(expansion_rate=n, kind="mhc")
    conn = Connector(cfg, C, 4, rngs=nnx.Rngs(0))
    # gates inside [0, 1], below 0 and above 1: reflect_gate folds them all into [0, 1]
    _randomise(conn, seed=5, proj_scale=(n * C) ** -0.5, gates=[0.0, 0.4, -0.3, 1.7])  # logits ~ N(0, 2)
    x = _normal(6, (B, S, n, C))
    pre, post, res = _all_layer_coefficients(conn, x)
    rows, cols = _check_doubly_stochastic(res)
    assert float(pre.min()) > 0 and float(pre.max()) < 1
    assert float(post.min()) > 0 and float(post.max()) < 2
    assert np.isfinite(np.asarray(connector_layer(conn, 1)(x, _sublayer(1)))).all()
    print(f"random mhc: max |row sum - 1| {rows:.2e}, max |col sum - 1| {cols:.2e}")
    gates = reflect_gate(jnp.asarray([0.0, 0.4, -0.3, 1.7, 2.5, -3.9]))
    np.testing.assert_allclose(gates, [0.0, 0.4, 0.3, 0.3, 0.5, 0.1], atol=1e-6)
    slopes = jax.vmap(jax.grad(reflect_gate))(jnp.asarray([0.0, 0.4, -0.3, 1.7]))
    np.testing.assert_array_equal(slopes, [1.0, 1.0, -1.0, -1.0])


def test_mhc_extreme_logits_stay_finite_and_doubly_stochastic():
    n = 4
    cfg = ConnectorConfig(expansion_rate=n, kind="mhc")
    conn = Connector(cfg, C, 1, rngs=nnx.Rngs(0))
    _randomise(conn, seed=7, gates=[0.5])
    conn.scale[...] = jnp.ones_like(conn.scale[...])
    # unit-rms input of n*C entries times proj ~ N(0, 1e8 / (n*C)): projection logits of order +-1e4
    conn.proj[...] = conn.proj[...] * 1e4 / np.sqrt(n * C)
    x = _normal(8, (B, S, n, C))
    layer = connector_layer(conn, 0)
    assert float(jnp.abs(layer._raw(x)[2]).max()) > 1e3
    graphdef, state = nnx.split(layer)

    @jax.jit
    def run(state):
        def loss(state):
            return jnp.sum(nnx.merge(graphdef, state)(x, _sublayer(1)) ** 2)

        return nnx.merge(graphdef, state).coefficients(x), jax.grad(loss)(state)

    (pre, post, res), grads = run(state)
    for a in (pre, post, res, *jax.tree.leaves(grads)):
        assert np.isfinite(np.asarray(a)).all()
    rows, cols = _check_doubly_stochastic(res)
    eps = np.float32(cfg.eps)
    assert float(pre.min()) >= eps and float(pre.max()) <= np.float32(1) + eps  # sigmoid + eps, DeepSeek-V4
    assert float(post.min()) >= 0 and float(post.max()) <= 2
    z = 1e4 * jnp.sign(_normal(9, (64, n, n)))
    rows_raw = float(jnp.abs(sinkhorn(z, balance=False).sum(-1) - 1).max())
    _check_doubly_stochastic(sinkhorn(z))
    print(f"logits +-1e4: rows {rows:.2e} cols {cols:.2e}; without the balancing step rows are off by {rows_raw:.2e}")


# ----------------------------------------------------------------------------------------------------- 5. bf16


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_activations_fp32_coefficients(kind):
    n = 4
    conn = Connector(ConnectorConfig(expansion_rate=n, kind=kind), C, 1, rngs=nnx.Rngs(0))
    _randomise(conn, seed=3, proj_scale=0.5, gates=[0.5] if kind in ("mhc", "mhc_lite") else None)
    layer = connector_layer(conn, 0)
    x32 = _normal(1, (B, S, n, C))
    x16 = x32.astype(jnp.bfloat16)
    coeffs = layer.coefficients(x16)
    assert all(a.dtype == jnp.float32 for a in coeffs)
    for a, b in zip(coeffs, layer.coefficients(x16.astype(jnp.float32))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)  # same fp32 math on the same (bf16) values
    out16 = layer(x16, _sublayer(2, jnp.bfloat16))
    assert out16.dtype == jnp.bfloat16
    out32 = layer(x32, _sublayer(2))
    assert _rel_err(out16, out32) < 5e-2


# ---------------------------------------------------------------------------------------------- 6, 7. config


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"expansion_rate": 0}, "expansion_rate"),
        ({"expansion_rate": 2.0}, "expansion_rate"),
        ({"kind": "mHC2"}, "kind"),
        ({"sinkhorn_iters": 0}, "sinkhorn_iters"),
        ({"eps": -1.0}, "eps"),
        ({"eps": 0.0}, "eps"),
        ({"sinkhorn_balance": "yes"}, "sinkhorn_balance"),
        ({"norm_eps": 1.0}, "norm_eps"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ConfigError, match=field) as info:
        ConnectorConfig(**kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value)
    if field == "kind":
        assert all(k in str(info.value) for k in KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_connector_has_no_trainable_state(kind):
    frozen = Connector(ConnectorConfig(expansion_rate=3, kind=kind, trainable=False), C, 2, rngs=nnx.Rngs(0))
    assert not issubclass(FrozenConnectorParam, ConnectorParam) and not issubclass(FrozenConnectorParam, nnx.Param)
    assert not nnx.state(frozen, ConnectorParam) and not nnx.state(frozen, nnx.Param)
    names = {path[0] for path, _ in nnx.to_flat_state(nnx.state(frozen, FrozenConnectorParam))}
    assert names >= {"base", "scale", "proj"}
    trainable = Connector(ConnectorConfig(expansion_rate=3, kind=kind), C, 2, rngs=nnx.Rngs(0))
    assert not nnx.state(trainable, FrozenConnectorParam)
    for path, var in nnx.to_flat_state(nnx.state(trainable, ConnectorParam)):
        assert var[...].shape[0] == 2, path  # leading layer axis
