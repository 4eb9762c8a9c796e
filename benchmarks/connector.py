"""Connector micro-benchmark: the residual connection alone, forward + backward, per site.

Runs what the model's layer scan runs around each sublayer, with the sublayer replaced by a cheap elementwise
stand-in, so that only the residual connection's own cost is timed: ``L`` stacked layers scanned with two sites each
(attention, MLP), gradients of the streams and of every trainable connector variable. Each kind at each ``n`` is
compared with the plain residual ``x + f(x)`` on ``[B, S, C]`` in the same process, interleaved, best of
``--repeats``.

A breakdown per site, each part jitted alone on one layer's variables (forward + backward), shows where the cost
goes: the coefficients (projection, norms, sigmoids; Sinkhorn included for mhc), Sinkhorn alone, the collapse and
the mix.

Prints one JSON object; times are milliseconds per site (fwd + bwd), overheads are ratios to the plain residual.

Usage: python benchmarks/connector.py [--kinds static,dynamic,mhc] [--n 2,4] [--batch 4 --seq 128 --hidden 512]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
from flax import nnx


def _timeit(fns: dict, repeats: int) -> dict[str, float]:
    """Best wall time of each zero-argument function, run interleaved so machine load hits all of them alike."""
    for f in fns.values():
        jax.block_until_ready(f())
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f())
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def _sublayer(u):
    """Stand-in for norm + attention / MLP: elementwise, so that it costs little next to the connection."""
    return jnp.tanh(u) * 0.5


def stack_step(kind: str | None, n: int, a):
    """A jitted fwd + bwd over ``a.layers`` layers x 2 sites; kind None is the plain residual."""
    from tx.adapters.connector import Connector, ConnectorConfig, StreamEdges

    key = jax.random.key(0)
    h = jax.random.normal(key, (a.batch, a.seq, a.hidden), jnp.float32)
    if kind is None:

        def loss(params, h):
            def body(x, _):
                x = x + _sublayer(x)
                return x + _sublayer(x), None

            x, _ = jax.lax.scan(body, h, None, length=a.layers)
            return jnp.sum(x * x)

        f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        return lambda: f({}, h)

    cfg = ConnectorConfig(expansion_rate=n, kind=kind)
    conns = [Connector(cfg, a.hidden, a.layers, rngs=nnx.Rngs(i)) for i in range(2)]
    # open the gates so every path of the coefficients is live (at init they are exactly 0)
    for conn in conns:
        conn.scale[...] = jnp.full_like(conn.scale[...], 0.1)
        if kind == "mhc":
            conn.res_gate[...] = jnp.full_like(conn.res_gate[...], 0.5)
    graphdef, state = nnx.split(conns)
    edges = StreamEdges(n)

    def loss(state, h):
        def body(x, layer_state):
            attn, mlp = nnx.merge(graphdef, layer_state)
            x = attn(x, _sublayer)
            return mlp(x, _sublayer), None

        x, _ = jax.lax.scan(body, edges.expand(h), state)
        x = edges.reduce(x)
        return jnp.sum(x * x)

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return lambda: f(state, h)


def parts(kind: str, n: int, a):
    """Per-site fwd + bwd of each part of one connector layer, jitted alone."""
    from tx.adapters.connector import Connector, ConnectorConfig, collapse, connector_layer, mix, sinkhorn

    cfg = ConnectorConfig(expansion_rate=n, kind=kind)
    conn = Connector(cfg, a.hidden, 1, rngs=nnx.Rngs(0))
    conn.scale[...] = jnp.full_like(conn.scale[...], 0.1)
    if kind == "mhc":
        conn.res_gate[...] = jnp.full_like(conn.res_gate[...], 0.5)
    layer = connector_layer(conn, 0)
    graphdef, state = nnx.split(layer)
    keys = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(keys[0], (a.batch, a.seq, n, a.hidden), jnp.float32)
    y = jax.random.normal(keys[1], (a.batch, a.seq, a.hidden), jnp.float32)

    def grad_of(fn, *args):
        g = jax.jit(jax.grad(lambda *xs: sum(jnp.sum(o * o) for o in jax.tree.leaves(fn(*xs))), argnums=0))
        return lambda: g(*args)

    def coefficients(state, x):
        return nnx.merge(graphdef, state).coefficients(x)

    h_pre, h_post, h_res = coefficients(state, x)
    out = {
        "coefficients": grad_of(coefficients, state, x),
        "collapse": grad_of(collapse, x, h_pre),
        "mix": grad_of(mix, x, y, h_post, h_res),
    }
    if kind == "mhc":
        logits = jax.random.normal(keys[2], (a.batch, a.seq, n, n), jnp.float32)
        out["sinkhorn"] = grad_of(lambda z: sinkhorn(z, cfg.sinkhorn_iters, cfg.eps), logits)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default="static,dynamic,mhc")
    ap.add_argument("--n", default="2,4")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-parts", action="store_true", help="skip the per-part breakdown")
    a = ap.parse_args()
    kinds = [k for k in a.kinds.split(",") if k]
    ns = [int(v) for v in a.n.split(",") if v]
    sites = 2 * a.layers

    fns = {"residual": stack_step(None, 1, a)}
    for kind in kinds:
        for n in ns:
            fns[f"{kind}{n}"] = stack_step(kind, n, a)
    best = _timeit(fns, a.repeats)
    base = best["residual"]
    out = {
        "device": str(jax.devices()[0].device_kind),
        "shape": {k: getattr(a, k) for k in ("batch", "seq", "hidden", "layers")},
        "stack_ms_per_site": {k: round(v / sites * 1e3, 3) for k, v in best.items()},
        "stack_ratio_to_residual": {k: round(v / base, 2) for k, v in best.items() if k != "residual"},
    }
    if not a.no_parts:
        breakdown = {}
        for kind in kinds:
            for n in ns:
                t = _timeit(parts(kind, n, a), a.repeats)
                breakdown[f"{kind}{n}"] = {k: round(v * 1e3, 3) for k, v in t.items()}
        out["parts_ms_per_site"] = breakdown
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
