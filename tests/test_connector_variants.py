"""Connector variants: mHC-lite (n! permutations), frac-connections (fracs = m) and connectors on chosen layers.

Unit level (tiny C, a few tokens), then on a real model: training steps, save / load, parameter counts.
"""

import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from fixtures_models import make_checkpoint
from fixtures_tokenizer import corpus, make_chatml_tokenizer
from flax import nnx

import tx
from tx.adapters.connector import (
    MAX_LITE_STREAMS,
    Connector,
    ConnectorConfig,
    ConnectorParam,
    StreamEdges,
    birkhoff,
    connector_layer,
    hyper_connections_values,
    permutation_matrices,
    set_layer_values,
)
from tx.errors import ConfigError
from tx.train.data import Dataset

B, S, C = 2, 5, 16


def _normal(seed, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _sublayer(seed):
    m = _normal(seed, (C, C), C**-0.5)
    b = _normal(seed + 1, (C,), 0.5)
    return lambda u: jnp.tanh(u @ m + b) * 1.5


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ------------------------------------------------------------------------------------------------ mHC-lite


@pytest.mark.parametrize("n", range(1, MAX_LITE_STREAMS + 1))
def test_permutation_matrices(n):
    perms = permutation_matrices(n)
    assert perms.shape == (math.factorial(n), n, n)
    np.testing.assert_array_equal(perms[0], np.eye(n))  # the identity is one of them (k = 0)
    np.testing.assert_array_equal(perms.sum(-1), 1.0)
    np.testing.assert_array_equal(perms.sum(-2), 1.0)
    assert len({p.tobytes() for p in perms}) == len(perms)  # all distinct
    for k, perm in enumerate(itertools.permutations(range(n))):  # P[k, i, perm[i]] = 1: input i -> output perm[i]
        x = np.arange(n) + 10.0
        out = x @ perms[k]  # x'[j] = sum_i P[i, j] x[i]
        np.testing.assert_array_equal(out[list(perm)], x)


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
def test_birkhoff_is_doubly_stochastic(scale):
    n = 4
    logits = _normal(0, (3, 7, math.factorial(n)), scale)
    h = np.asarray(birkhoff(logits, n))
    assert np.isfinite(h).all() and (h >= 0).all()
    np.testing.assert_allclose(h.sum(-1), 1.0, atol=1e-6, rtol=0)
    np.testing.assert_allclose(h.sum(-2), 1.0, atol=1e-6, rtol=0)
    # the paper's definition, written out: sum_k softmax(logits)_k P_k
    w = np.asarray(jax.nn.softmax(logits, -1), np.float64)
    ref = np.einsum("...k,kij->...ij", w, permutation_matrices(n).astype(np.float64))
    np.testing.assert_allclose(h, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("n", range(1, MAX_LITE_STREAMS + 1))
def test_mhc_lite_identity_at_init(n):
    conn = Connector(ConnectorConfig(expansion_rate=n, kind="mhc_lite"), C, 2, rngs=nnx.Rngs(0))
    edges = StreamEdges(n)
    h, f = _normal(1, (B, S, C)), _sublayer(2)
    layer = connector_layer(conn, 1)
    out = edges.reduce(layer(edges.expand(h), f))
    expected = h + f(h)
    if n == 1:
        np.testing.assert_array_equal(out, expected)
        return
    assert conn.proj.shape == (2, n * C, 2 * n + math.factorial(n))
    pre, post, res = layer.coefficients(edges.expand(h))
    np.testing.assert_array_equal(res, np.broadcast_to(np.eye(n), res.shape))
    np.testing.assert_array_equal(post, 1.0)
    np.testing.assert_allclose(pre, 1.0 / n, rtol=1e-7, atol=0)
    assert _rel_err(out, expected) <= 1e-6


def test_mhc_lite_refuses_too_many_streams():
    ConnectorConfig(expansion_rate=MAX_LITE_STREAMS, kind="mhc_lite")
    with pytest.raises(ConfigError) as info:
        ConnectorConfig(expansion_rate=MAX_LITE_STREAMS + 1, kind="mhc_lite")
    message = str(info.value)
    assert f"1..{MAX_LITE_STREAMS}" in message and "n!" in message and "720" in message and "'mhc'" in message


def _lite_loss(n=4, layers=2):
    conn = Connector(ConnectorConfig(expansion_rate=n, kind="mhc_lite"), C, layers, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(conn, ConnectorParam, ...)
    ms = _normal(11, (layers, C, C), C**-0.5)
    target = _normal(12, (B, S, C))

    def run(params, x):
        def body(x, xs):
            st, m = xs
            return nnx.merge(graphdef, st, rest)(x, lambda u: jnp.tanh(u @ m)), None

        x, _ = jax.lax.scan(body, x, (params, ms))
        return x

    def loss(params, x, w):
        return jnp.mean((jnp.einsum("...jc,j->...c", run(params, x), w) - target) ** 2)

    return graphdef, params, rest, loss


def test_mhc_lite_trains_from_the_first_steps_and_stays_doubly_stochastic():
    n = 4
    graphdef, params, rest, loss = _lite_loss(n)
    x = jnp.broadcast_to(_normal(13, (B, S, 1, C)), (B, S, n, C))  # equal streams, as the model starts
    w = jnp.asarray([0.4, 0.3, 0.2, 0.1])
    opt = optax.adam(3e-2)
    state = opt.init(params)
    grad = jax.jit(jax.value_and_grad(loss))
    g0 = grad(params, x, w)[1]
    assert float(jnp.abs(g0["scale"][...]).max()) > 0  # the gates get a gradient at step 0
    losses = []
    for _ in range(12):
        value, g = grad(params, x, w)
        losses.append(float(value))
        updates, state = opt.update(g, state, params)
        params = optax.apply_updates(params, updates)
    assert losses[-1] < losses[0]
    conn = nnx.merge(graphdef, params, rest)
    assert float(jnp.abs(conn.res_gate[...]).max()) > 1e-3  # the permutation mixture is switched on
    for i in range(2):
        _, _, res = connector_layer(conn, i).coefficients(_normal(14, (B, S, n, C)))
        res = np.asarray(res)
        assert np.abs(res - np.eye(n)).max() > 1e-4
        assert (res >= 0).all()
        np.testing.assert_allclose(res.sum(-1), 1.0, atol=1e-6, rtol=0)
        np.testing.assert_allclose(res.sum(-2), 1.0, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------- frac-connections


@pytest.mark.parametrize("n, m", [(1, 2), (2, 2), (3, 2), (1, 4), (2, 4)])
@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_fracs_identity_at_init(kind, n, m):
    conn = Connector(ConnectorConfig(expansion_rate=n, kind=kind, fracs=m), C, 2, rngs=nnx.Rngs(0))
    edges = StreamEdges(n)
    h, f = _normal(1, (B, S, C)), _sublayer(2)
    layer = connector_layer(conn, 0)
    pre, post, res = layer.coefficients(edges.expand(h))
    assert pre.shape == (B, S, n * m, m) and post.shape == (B, S, m, n * m) and res.shape == (B, S, n * m, n * m)
    out = edges.reduce(layer(edges.expand(h), f))
    err = _rel_err(out, h + f(h))
    assert err <= 1e-6, err


@pytest.mark.parametrize("n, m", [(1, 2), (2, 2), (4, 2), (2, 4)])
def test_fracs_match_hyper_connections(n, m):
    torch = pytest.importorskip("torch")
    hc_mod = pytest.importorskip("hyper_connections")

    ref = hc_mod.HyperConnections(n, dim=C, tanh=True, layer_index=0, num_fracs=m)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim else 0.5))
    x = np.array(_normal(4, (B, S, n, C)))
    f = _sublayer(7)
    mat = np.asarray(_normal(7, (C, C), C**-0.5))
    bias = np.asarray(_normal(8, (C,), 0.5))
    branch = lambda u: torch.tanh(u @ torch.from_numpy(mat) + torch.from_numpy(bias)) * 1.5  # the same f
    to_ref = lambda a: torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, 2, 1).reshape(B * n, S, C)))
    branch_ref, add_residual = ref(to_ref(x))
    out_ref = np.moveaxis(add_residual(branch(branch_ref)).detach().numpy().reshape(B, n, S, C), 1, 2)

    names = ("static_alpha", "static_beta", "dynamic_alpha_fn", "dynamic_alpha_scale", "dynamic_beta_fn")
    values = hyper_connections_values(
        *(getattr(ref, name).detach().numpy() for name in names[:5]),
        ref.dynamic_beta_scale.detach().numpy(),
        norm_gamma=ref.norm.gamma.detach().numpy(),
        num_fracs=m,
    )
    conn = Connector(ConnectorConfig(expansion_rate=n, kind="dynamic", fracs=m), C, 2, rngs=nnx.Rngs(0))
    set_layer_values(conn, 1, values)
    out = connector_layer(conn, 1)(jnp.asarray(x), f)
    err = float(np.abs(np.asarray(out) - out_ref).max())
    print(f"hyper_connections num_fracs={m} n={n}: max abs error {err:.2e}")
    assert err < 1e-5, err


# ---------------------------------------------------------------------------------------- chosen layers (unit)


def test_layer_mask_plain_layers_carry_the_streams():
    n = 3
    full = Connector(ConnectorConfig(expansion_rate=n, kind="mhc"), C, 3, rngs=nnx.Rngs(0))
    masked = Connector(
        ConnectorConfig(expansion_rate=n, kind="mhc"), C, 3, rngs=nnx.Rngs(0), layer_mask=np.array([1, 0, 1])
    )
    for conn in (full, masked):  # open the gates so the connector differs from the plain residual
        conn.scale[...] = jnp.full((3, 3), 0.5)
        conn.res_gate[...] = jnp.full((3,), 0.7)
    x, f = _normal(1, (B, S, n, C)), _sublayer(2)
    # a chosen layer computes the connector (inside lax.cond, compiled: equal up to rounding)
    assert _rel_err(connector_layer(masked, 0)(x, f), connector_layer(full, 0)(x, f)) <= 1e-6
    plain = x + f(x.mean(-2))[..., None, :]  # the plain residual on every stream, input the streams' mean
    assert _rel_err(connector_layer(masked, 1)(x, f), plain) <= 1e-6  # 1/3-weighted sum vs mean: rounding only
    assert _rel_err(connector_layer(full, 1)(x, f), plain) > 1e-3
    # under jit / scan the mask is a traced value: same answers
    graphdef, state = nnx.split(masked)
    run = jax.jit(lambda st, i: nnx.merge(graphdef, jax.tree.map(lambda a: a[i], st))(x, f))
    assert _rel_err(run(state, 1), plain) <= 1e-6
    assert _rel_err(run(state, 2), connector_layer(full, 2)(x, f)) <= 1e-6


def test_layers_config_normalised_and_checked():
    assert ConnectorConfig(layers=[3, 1, 1]).layers == (1, 3)
    assert ConnectorConfig(layers=range(2)).layers == (0, 1)
    for bad in ([], [-1], ["0"], [True], "0,1", 3):
        with pytest.raises(ConfigError, match="layers must be"):
            ConnectorConfig(layers=bad)


# ------------------------------------------------------------------------------------------------ real model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    make_chatml_tokenizer(root / "tok")
    tok = tx.load_tokenizer(root / "tok")
    folder, _ = make_checkpoint("llama", root / "ckpt", vocab_size=tok.vocab_size)
    records = [{"text": t} for t in corpus(64, seed=0)]
    data = Dataset(records, tok, seq_len=48, batch_size=4, seed=0, vocab_size=tok.vocab_size)
    return folder, data


def _train(model, data, steps=6):
    trainer = tx.Trainer(
        model, tx.TrainConfig(steps=steps, lr=5e-3, schedule="constant", batch_size=4, seq_len=48, progress=False)
    )
    return [float(trainer.step(data.batch(i))["loss"]) for i in range(steps)]


def test_mhc_lite_on_a_model_after_training_steps(setup):
    folder, data = setup
    model = tx.load_model(folder)
    tx.attach(model, connector=tx.ConnectorConfig(expansion_rate=4, kind="mhc_lite"))
    x = model.streams.expand(model.embed(data.batch(0)["input_ids"]))
    losses = _train(model, data)
    assert losses[-1] != losses[0]
    conn = model.layers.attn_residual
    pre, post, res = connector_layer(conn, 0).coefficients(x)
    res = np.asarray(res)
    assert np.ptp(np.asarray(post), axis=-1).max() > 1e-4  # the streams separate
    assert np.abs(res - np.eye(4)).max() > 1e-5, np.abs(res - np.eye(4)).max()  # H_res left I
    np.testing.assert_allclose(res.sum(-1), 1.0, atol=1e-6, rtol=0)
    np.testing.assert_allclose(res.sum(-2), 1.0, atol=1e-6, rtol=0)
    assert (res >= 0).all()


def test_chosen_layers_train_and_the_others_stay_plain(setup):
    folder, data = setup
    model = tx.load_model(folder)
    num_layers = model.config.num_layers
    conn_cfg = tx.ConnectorConfig(expansion_rate=2, kind="dynamic", fracs=2, layers=[1])
    tx.attach(model, lora=tx.LoRAConfig(rank=4, alpha=8), connector=conn_cfg)
    counted = tx.trainable_parameters(model)
    full = tx.attach(
        tx.load_model(folder),
        lora=tx.LoRAConfig(rank=4, alpha=8),
        connector=conn_cfg.__class__(expansion_rate=2, kind="dynamic", fracs=2),
    )
    per_layer = (tx.trainable_parameters(full).trainable - counted.trainable) // (num_layers - 1)
    assert per_layer > 0 and counted.trainable + per_layer * (num_layers - 1) == tx.trainable_parameters(full).trainable
    ids = data.batch(0)["input_ids"]
    assert tx.verify_identity(model, ids).relative_diff <= 1e-6
    before = {
        k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model.layers.attn_residual, ConnectorParam))
    }
    _train(model, data, steps=3)
    after = {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model.layers.attn_residual, ConnectorParam))}
    moved = {k: np.abs(after[k] - before[k]).reshape(num_layers, -1).max(-1) for k in before}
    for k, delta in moved.items():  # layer 0's slots get no gradient; layer 1's move
        assert delta[0] == 0.0, (k, delta)
    assert max(delta[1] for delta in moved.values()) > 0


@pytest.mark.parametrize(
    "cfg",
    [
        dict(expansion_rate=4, kind="mhc_lite"),
        dict(expansion_rate=2, kind="dynamic", fracs=2),
        dict(expansion_rate=1, kind="static", fracs=4),
        dict(expansion_rate=3, kind="mhc", layers=[0]),
    ],
)
def test_save_load_round_trip(setup, tmp_path, cfg):
    folder, data = setup
    conn_cfg = tx.ConnectorConfig(**cfg)
    model = tx.attach(tx.load_model(folder), lora=tx.LoRAConfig(rank=4, alpha=8), connector=conn_cfg)
    _train(model, data, steps=2)
    ids = data.batch(0)["input_ids"]
    want = np.asarray(model(ids))
    tx.save_adapter(model, tmp_path / "a")
    side = json.loads((tmp_path / "a" / "tx_connector_config.json").read_text())
    assert ("fracs" in side) == (conn_cfg.fracs > 1) and ("layers" in side) == (conn_cfg.layers is not None)
    loaded = tx.load_adapter(tx.load_model(folder), tmp_path / "a")
    assert loaded.connector_config == conn_cfg
    np.testing.assert_array_equal(np.asarray(loaded(ids)), want)


def test_old_sidecar_without_new_fields_loads(setup, tmp_path):
    folder, data = setup
    model = tx.attach(tx.load_model(folder), connector=tx.ConnectorConfig(expansion_rate=2, kind="mhc"))
    tx.save_adapter(model, tmp_path / "a")
    side = json.loads((tmp_path / "a" / "tx_connector_config.json").read_text())
    # format 1 as the previous tx wrote it: exactly these fields
    assert set(side) == {
        "format_version",
        "tx_version",
        "expansion_rate",
        "kind",
        "trainable",
        "sinkhorn_iters",
        "sinkhorn_balance",
        "eps",
        "norm_eps",
    }
    loaded = tx.load_adapter(tx.load_model(folder), tmp_path / "a")
    assert loaded.connector_config == model.connector_config
