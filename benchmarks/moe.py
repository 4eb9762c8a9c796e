"""MoE expert-layer micro-benchmark: the routed experts alone, forward + backward, per formulation.

One layer of ``E`` gated experts (``gate_up_proj [E, 2I, C]``, ``down_proj [E, C, I]``) on ``T`` tokens with
random top-``k`` routing, optionally with LoRA on both expert tensors, timed in one process for each formulation
of :mod:`tx.models.moe` (``dense``: every expert on every token; ``blocked``: sorted, padded to blocks of one
expert, batched matmuls; ``ragged``: ``jax.lax.ragged_dot``), interleaved, best of ``--repeats``. Gradients are
taken with respect to the input and the expert weights, or with ``--lora-rank`` the LoRA matrices (the expert
weights frozen, as the trainer's LoRA step).

Also reports each formulation's largest difference from ``dense`` (outputs and input gradients), so a speed figure
never comes from a wrong result, and the GFLOP/s of the routed work (``6 * T * k * 3 * C * I`` for fwd + bwd).

Prints one JSON object. Usage: python benchmarks/moe.py [--tokens 512 --experts 16 --top-k 4 --hidden 512
--width 256] [--lora-rank 0] [--formulations dense,blocked,ragged] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument("--formulations", default="dense,blocked,ragged")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--block", type=int, default=None, help="rows per block of the blocked formulation")
    a = p.parse_args(argv)

    from tx.adapters.lora_experts import LoRAExperts
    from tx.models import moe as M
    from tx.models.config import MoEConfig

    if a.block:
        M.BLOCK = a.block
    cfg = MoEConfig(num_experts=a.experts, top_k=a.top_k, expert_size=a.width)
    experts = M.Experts(cfg, a.hidden, dtype=jnp.float32, rngs=nnx.Rngs(0))
    if a.lora_rank:
        for i, name in enumerate(("gate_up_proj", "down_proj")):
            lora = LoRAExperts(getattr(experts, name), name=name, rank=a.lora_rank, scale=2.0, key=jax.random.key(i))
            lora.lora_b.set_value(0.02 * jax.random.normal(jax.random.key(9 + i), lora.lora_b.shape))
            setattr(experts, name, lora)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((a.tokens, a.hidden)), jnp.float32)
    logits = rng.standard_normal((a.tokens, a.experts))
    top_i = jnp.asarray(np.argsort(-logits, axis=-1)[:, : a.top_k], jnp.int32)
    top_w = jnp.asarray(rng.uniform(0.1, 1.0, (a.tokens, a.top_k)), jnp.float32)
    from tx.adapters.lora import LoRAParam

    # with LoRA, as the trainer: gradients of the LoRA matrices and the input only (the expert weights are frozen)
    graphdef, state, rest = nnx.split(experts, LoRAParam if a.lora_rank else nnx.Param, ...)

    def make(kind):
        def loss(state, x):
            m = nnx.merge(graphdef, state, rest)
            if kind == "dense":
                w = jnp.zeros((a.tokens, a.experts), x.dtype).at[jnp.arange(a.tokens)[:, None], top_i].set(top_w)
                y = m.dense(x, w)
            else:
                y = getattr(m, kind)(x, top_w, top_i)
            return jnp.sum(y * jnp.cos(y)), y

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        return lambda: step(state, x)

    kinds = a.formulations.split(",")
    fns = {k: make(k) for k in kinds}
    outs = {k: jax.block_until_ready(f()) for k, f in fns.items()}
    best = dict.fromkeys(kinds, float("inf"))
    for _ in range(a.repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f())
            best[k] = min(best[k], time.perf_counter() - t)
    ref = outs[kinds[0]]
    flops = 6 * a.tokens * a.top_k * 3 * a.hidden * a.width
    result = {
        "benchmark": "moe_experts",
        "cpu": platform.processor() or platform.machine(),
        "backend": jax.default_backend(),
        "shape": vars(a),
        "block": M.BLOCK,
        "ms": {k: round(1e3 * v, 3) for k, v in best.items()},
        "speedup_vs_" + kinds[0]: {k: round(best[kinds[0]] / v, 3) for k, v in best.items()},
        "routed_gflops": {k: round(flops / v / 1e9, 2) for k, v in best.items()},
        "max_diff_vs_" + kinds[0]: {
            k: {
                "out": float(jnp.max(jnp.abs(outs[k][0][1] - ref[0][1]))),
                "grad_x": float(jnp.max(jnp.abs(outs[k][1][1] - ref[1][1]))),
            }
            for k in kinds
        },
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
