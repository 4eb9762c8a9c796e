"""Decoding benchmark: greedy generation with the KV cache, tokens per second per dtype, on step.py's shapes.

``--preset stress`` (default) or ``wide``, with the same shape flags as step.py.

Prints one JSON object. Each dtype is warmed up (compiled) on a short generation first; the timed run is
``--rounds`` generations of ``--new`` tokens for ``--batch`` prompts of ``--prompt`` tokens, best round reported.

Usage: python benchmarks/generate.py [--dtypes float32,bfloat16] [--new 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
from flax import nnx
from step import add_shape_args, model_config, resolve_shape


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    add_shape_args(ap)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    resolve_shape(a)
    from tx.generate import generate_ids
    from tx.host_memory import keep_freed_memory
    from tx.models.decoder import CausalLM

    keep_freed_memory()
    prompts = [list(range(1, a.prompt + 1))] * a.batch
    out = {"device": str(jax.devices()[0].device_kind), "shape": vars(a), "dtypes": {}}
    for name in a.dtypes.split(","):
        model = CausalLM(model_config(a), dtype=jnp.dtype(name), rngs=nnx.Rngs(0))
        generate_ids(model, prompts, max_new_tokens=a.new)  # compile prefill and decode
        best = float("inf")
        for _ in range(a.rounds):
            t = time.perf_counter()
            generate_ids(model, prompts, max_new_tokens=a.new)
            best = min(best, time.perf_counter() - t)
        out["dtypes"][name] = {"seconds": round(best, 4), "new_tokens_per_s": round(a.batch * a.new / best, 1)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
