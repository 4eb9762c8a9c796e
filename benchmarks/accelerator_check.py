"""One-shot accelerator check: on whatever backend JAX finds, the accelerator's paths against the CPU's, then the
step and generation benchmarks at both presets; prints one JSON object.

Checks (tiny random models, built from the same seed on both sides; the CPU side runs in a subprocess with
``JAX_PLATFORMS=cpu``, so it takes CPU's own code paths: einsum attention, dense experts, fp32-accumulating bf16):

- ``logits_fp32``: a Qwen3-shaped model's logits on a padded batch, at the backend's default matmul precision (TF32
  on recent NVIDIA GPUs: reported, loose bound) and at ``highest`` (bound 1e-4 relative to max |logits|);
- ``attention``: ``attend_fused`` (cuDNN when it takes the configuration, else XLA's) against ``attend_einsum`` on
  the same backend, fp32 and bf16;
- ``identity_bf16``: mhc n=4 + LoRA at init in bf16 (``tx.verify_identity``'s bound for bf16);
- ``train_fp32`` / ``train_bf16``: three train steps (LoRA + mhc2) against the CPU's fp32 steps (losses);
- ``moe``: a MoE model's logits with ``TX_MOE=ragged`` and ``TX_MOE=dense`` against each other and the CPU's;
- ``generation``: greedy tokens against the CPU's (fp32, highest precision).

Then ``benchmarks/step.py`` (LoRA, mhc4; PEFT off) and ``benchmarks/generate.py`` at ``stress`` and ``wide``, each in
a subprocess with a time limit, skipped once the whole run nears ``--budget`` seconds (default 450: under 8
minutes). ``--tiny`` runs the benchmarks at tiny shapes (the test suite's smoke run on CPU).

Usage: python benchmarks/accelerator_check.py [--tiny] [--budget 450] [--no-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TINY = ["--hidden", "64", "--intermediate", "96", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--vocab", "256"]
B, S = 2, 16


def model_configs():
    from tx.models.config import BlockSpec, ModelConfig, MoEConfig, RopeConfig

    common = dict(
        family="qwen3",
        model_type="qwen3",
        architecture="Qwen3ForCausalLM",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        max_positions=256,
        rope=RopeConfig(theta=1e6),
        qk_norm=True,
    )
    dense = ModelConfig(**common)
    moe = ModelConfig(
        **{**common, "family": "qwen3_moe", "model_type": "qwen3_moe", "architecture": "Qwen3MoeForCausalLM"},
        moe=MoEConfig(num_experts=4, top_k=2, expert_size=32, norm_topk_prob=True),
        layer_specs=(BlockSpec(mlp="moe"),) * 2,
    )
    return dense, moe


def make_model(cfg, dtype="float32"):
    """A random model with weights 4x the default init (std 0.02; a power of two, exact in bf16): logits of a few
    units, so that the comparisons are between numbers that differ."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tx.models.decoder import CausalLM

    model = CausalLM(cfg, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0))
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if var[...].ndim >= 2:
            var.set_value(var[...] * 4)
    jax.block_until_ready(nnx.state(model))
    return model


def batch(vocab):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, size=(B, S + 1)).astype(np.int32)
    mask = np.ones((B, S), np.int32)
    mask[1, S - 5 :] = 0  # a padded row
    return {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "loss_mask": mask.astype(np.float32),
        "segment_ids": mask,
        "positions": np.tile(np.arange(S, dtype=np.int32), (B, 1)),
    }, mask


def train_losses(cfg, dtype, b):
    import tx

    model = make_model(cfg, dtype)
    tx.attach(model, lora=tx.LoRAConfig(rank=4, alpha=8), connector=tx.ConnectorConfig(expansion_rate=2, kind="mhc"))
    trainer = tx.Trainer(model, tx.TrainConfig(steps=3, batch_size=B, seq_len=S, lr=1e-2, progress=False))
    return np.asarray([float(trainer.step(b)["loss"]) for _ in range(3)])


def compute() -> dict[str, np.ndarray]:
    """Every value the checks compare, computed on the default backend."""
    import jax

    from tx.generate import generate_ids

    dense, moe = model_configs()
    b, mask = batch(dense.vocab_size)
    out = {}
    model = make_model(dense)
    out["logits_default"] = np.asarray(model(b["input_ids"], attention_mask=mask))
    with jax.default_matmul_precision("highest"):
        out["logits_highest"] = np.asarray(model(b["input_ids"], attention_mask=mask))
        prompts = [list(map(int, b["input_ids"][0, :6])), list(map(int, b["input_ids"][1, :4]))]
        out["generation"] = np.asarray(generate_ids(model, prompts, max_new_tokens=8), np.int32)
    out["train_fp32"] = train_losses(dense, "float32", b)
    out["train_bf16"] = train_losses(dense, "bfloat16", b)
    mm = make_model(moe)
    saved = os.environ.get("TX_MOE")
    try:
        for kind in ("dense", "ragged"):
            os.environ["TX_MOE"] = kind
            with jax.default_matmul_precision("highest"):
                out[f"moe_{kind}"] = np.asarray(mm(b["input_ids"], attention_mask=mask))
    finally:
        if saved is None:
            os.environ.pop("TX_MOE", None)
        else:
            os.environ["TX_MOE"] = saved
    out["mask"] = mask
    return out


def local_checks() -> dict:
    """Checks within the backend: fused vs einsum attention, bf16 identity at init."""
    import jax
    import jax.numpy as jnp

    import tx
    from tx.models.layers import attend_einsum, attend_fused

    res = {}
    k = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(k[0], (B, S, 4, 16), jnp.float32)
    kk = jax.random.normal(k[1], (B, S, 2, 16), jnp.float32)
    v = jax.random.normal(k[2], (B, S, 2, 16), jnp.float32)
    mask = jnp.tril(jnp.ones((S, S), bool))[None].repeat(B, 0)
    for dtype, tol in (("float32", 1e-4), ("bfloat16", 3e-2)):
        dt = jnp.dtype(dtype)
        with jax.default_matmul_precision("highest"):
            ref = attend_einsum(q.astype(dt), kk.astype(dt), v.astype(dt), mask).astype(jnp.float32)
            got = attend_fused(q.astype(dt), kk.astype(dt), v.astype(dt), mask).astype(jnp.float32)
        diff = float(jnp.abs(got - ref).max())
        res[f"attention_{dtype}"] = {"max_abs_diff": diff, "tolerance": tol, "ok": diff <= tol}
    dense, _ = model_configs()
    model = make_model(dense, "bfloat16")
    tx.attach(model, lora=tx.LoRAConfig(rank=4, alpha=8), connector=tx.ConnectorConfig(expansion_rate=4, kind="mhc"))
    b, mask = batch(dense.vocab_size)
    rep = tx.verify_identity(model, b["input_ids"], mask)
    res["identity_bf16"] = {"relative_diff": rep.relative_diff, "tolerance": rep.tolerance, "ok": rep.passed}
    return res


def compare(acc: dict, ref: dict) -> dict:
    valid = acc["mask"].astype(bool)

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.ndim == 3:
            a, b = a[valid], b[valid]
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))

    res = {}
    for name, key, tol in (
        ("logits_fp32_highest", "logits_highest", 1e-4),
        ("logits_fp32_default_precision", "logits_default", 2e-2),  # TF32 where the backend uses it
        ("train_fp32", "train_fp32", 1e-4),
        ("moe_ragged_vs_cpu", "moe_ragged", 1e-4),
        ("moe_dense_vs_cpu", "moe_dense", 1e-4),
    ):
        d = rel(acc[key], ref[key])
        res[name] = {"relative_diff": d, "tolerance": tol, "ok": d <= tol}
    d = rel(acc["moe_ragged"], acc["moe_dense"])
    res["moe_ragged_vs_dense"] = {"relative_diff": d, "tolerance": 1e-4, "ok": d <= 1e-4}
    d = rel(acc["train_bf16"], ref["train_fp32"])
    res["train_bf16_vs_cpu_fp32"] = {"relative_diff": d, "tolerance": 3e-2, "ok": d <= 3e-2}
    same = bool(np.array_equal(acc["generation"], ref["generation"]))
    res["generation_greedy"] = {"equal": same, "ok": same}
    return res


def reference(path: str) -> None:
    np.savez(path, **compute())


def cpu_reference() -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ref.npz")
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        env.pop("TX_MOE", None)
        subprocess.run([sys.executable, __file__, "--reference", path], env=env, check=True, timeout=600)
        with np.load(path) as z:
            return {k: z[k] for k in z.files}


def bench(script: str, args: list[str], timeout: float) -> dict:
    t = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, str(HERE / script), *args], capture_output=True, text=True, timeout=max(timeout, 1)
        )
    except subprocess.TimeoutExpired:
        return {"skipped": f"over its time limit of {timeout:.0f} s"}
    if proc.returncode:
        return {"failed": proc.stderr[-1500:]}
    out = json.loads(proc.stdout)
    out["wall_seconds"] = round(time.perf_counter() - t, 1)
    return out


def summary_step(r: dict) -> dict:
    if "configs" not in r:
        return r
    keep = ("tokens_per_s", "min_seconds_per_step", "fraction_of_matmul_floor", "compile_seconds")
    return {
        "configs": {n: {k: c.get(k) for k in keep} for n, c in r["configs"].items()},
        "overhead_vs_lora": r.get("overhead_vs_lora"),
        "overhead_vs_lora_paired_median": r.get("overhead_vs_lora_paired_median"),
        "matmul_gflops_per_s": r.get("matmul_gflops_per_s"),
        "wall_seconds": r.get("wall_seconds"),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="benchmarks at tiny shapes (a quick run on CPU)")
    ap.add_argument("--no-bench", action="store_true", help="the checks only")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run")
    ap.add_argument("--reference", help=argparse.SUPPRESS)  # internal: write the CPU reference here
    a = ap.parse_args()
    if a.reference:
        reference(a.reference)
        return
    t0 = time.perf_counter()
    import jax

    from tx.host_memory import keep_freed_memory

    keep_freed_memory()
    backend = jax.default_backend()
    out = {"backend": backend, "device_kind": str(jax.devices()[0].device_kind), "device_count": jax.device_count()}
    from tx.models.moe import formulation

    out["moe_formulation_default"] = formulation()
    acc = compute()
    ref = acc if backend == "cpu" else cpu_reference()  # on CPU the accelerator *is* the reference
    out["checks"] = {**compare(acc, ref), **local_checks()}
    out["checks_seconds"] = round(time.perf_counter() - t0, 1)
    out["bench"] = {}
    if not a.no_bench:
        shapes = {"tiny": TINY} if a.tiny else {"stress": ["--preset", "stress"], "wide": ["--preset", "wide"]}
        step_extra = ["--steps", "1" if a.tiny else "3", "--configs", "lora,mhc4", "--peft", "off"]
        gen_extra = ["--rounds", "1", "--new", "4" if a.tiny else "32", "--prompt", "8" if a.tiny else "64"]
        if a.tiny:
            step_extra += ["--batch", "2", "--seq", "16", "--rank", "4"]
            gen_extra += ["--batch", "2"]
        for dtype in ("float32", "bfloat16"):
            for name, shape in shapes.items():
                left = a.budget - (time.perf_counter() - t0)
                key = f"step_{name}_{dtype}"
                out["bench"][key] = summary_step(bench("step.py", [*shape, *step_extra, "--dtype", dtype], left - 20))
        for name, shape in shapes.items():
            left = a.budget - (time.perf_counter() - t0)
            out["bench"][f"generate_{name}"] = bench("generate.py", [*shape, *gen_extra], left - 5)
    out["ok"] = all(c.get("ok", True) for c in out["checks"].values())
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
