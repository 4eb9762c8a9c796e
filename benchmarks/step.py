"""Train-step benchmark: LoRA alone vs LoRA + each connector kind at n = 2 and 4, on one standard shape.

Prints one JSON object: per configuration seconds per step (median and best), tokens/s, compile seconds,
step memory, the step's achieved FLOP/s as a fraction of this machine's measured matmul throughput (a large
jnp matmul timed in the same run), and the overhead of each connector over LoRA alone.
FLOPs counted (:func:`step_flops`): 4 x matmul params x tokens (frozen base: forward + activation gradients;
LoRA's own small matmuls excluded) plus attention (3 x 4 x B x S^2 x H x D per layer).

All configurations are compiled first, then timed in rounds: each round times the matmul and one step of every
configuration, in a rotating order. Machine load that comes and goes (a shared machine) then hits every
configuration alike, and the ratios below compare times taken in the same rounds:

- ``fraction_of_matmul_peak``: step FLOPs / best step time / best matmul FLOP/s (``..._median``: median step);
- ``matmul_floor_seconds``: the step's counted matmuls timed alone (:func:`matmul_floor_timer`), and
  ``matmul_floor_fraction_of_peak`` what those reach at the step's shapes; ``fraction_of_matmul_floor`` = that
  time / the step's best time. The fraction of the peak is their product: how fast the step's own matmuls can
  run on this machine, times how much of the step the rest leaves to them;
- ``overhead_vs_lora``: best step time / LoRA's best step time - 1 (``..._paired_median``: the median over
  rounds of the ratio of the two times in the same round, - 1).

By default the benchmark first calls :func:`tx.host_memory.keep_freed_memory`, as every ``tx`` command does:
XLA:CPU allocates each step's temporary buffer (hundreds of MB here) with malloc, which glibc maps and unmaps
every step, so every step page-faults all of it in again (~110k faults, ~0.19 s of kernel time per LoRA step on
the 2-core test machine; none to ~11k when kept). ``--plain-malloc`` leaves glibc as it is, to show that cost;
``page_faults_per_step`` reports it either way.

Shapes: ``--preset stress`` (the default: hidden 512, 8 layers, batch 4 x 128; a narrow model, where the
connector's n x C stream traffic weighs most against the C^2 matmuls) or ``--preset wide`` (hidden 2048,
intermediate 6144, 16 / 8 heads of 128, 4 layers, batch 2 x 256: a slice of the widths people fine-tune);
shape flags override the preset's values. ``--model PATH`` times any checkpoint folder instead (its own weights;
the matmul floor is left out for MoE models, whose routed FLOPs it does not count).

``--peft auto`` (the default) also times PyTorch + PEFT on the same shape and batch in the same rounds when torch,
transformers and peft are importable (``on``: required, ``off``: never): a transformers model of the same
architecture (the checkpoint itself with ``--model``), LoRA of the same rank on every linear (all-linear; for MoE
also the experts through ``target_parameters``), AdamW with the same clipping, the same cross-entropy over the
full fp32 logits. ``peft`` then holds its times, and ``lora_speedup_vs_peft`` LoRA's tokens/s over PEFT's (best
times; ``..._paired_median``: median over rounds of the two times' ratio).

Usage: python benchmarks/step.py [--preset stress|wide] [--model PATH] [--peft auto|on|off]
       [--steps 6] [--configs lora,mhc4,lora+unrolled,mhc4+unrolled] [--plain-malloc]
       [--dtype bfloat16]  (the matmul peak is then measured in bf16 with fp32 accumulation, like the step)
       [--no-scan-layers]
       [--hidden 512 --layers 8 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

CONFIGS = {
    "lora": None,
    "static2": ("static", 2),
    "static4": ("static", 4),
    "dynamic2": ("dynamic", 2),
    "dynamic4": ("dynamic", 4),
    "mhc2": ("mhc", 2),
    "mhc4": ("mhc", 4),
    "mhc_lite2": ("mhc_lite", 2),
    "mhc_lite4": ("mhc_lite", 4),
    "fracs1x4": ("dynamic", 1, {"fracs": 4}),  # frac-connections: n = 1 stream in m = 4 fractions
    "fracs2x2": ("dynamic", 2, {"fracs": 2}),
}


PRESETS = {
    "stress": dict(hidden=512, intermediate=1536, layers=8, heads=8, kv_heads=4, vocab=32000, batch=4, seq=128),
    "wide": dict(hidden=2048, intermediate=6144, layers=4, heads=16, kv_heads=8, vocab=32000, batch=2, seq=256),
}
SHAPE_KEYS = ("hidden", "intermediate", "layers", "heads", "kv_heads", "head_dim", "vocab")


def resolve_shape(a) -> None:
    """Fill the shape flags not given on the command line from ``a.preset`` (head_dim: hidden // heads)."""
    for k, v in PRESETS[a.preset].items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    if a.head_dim is None:
        a.head_dim = a.hidden // a.heads


def shape_from_checkpoint(a, cfg) -> None:
    """The shape flags from a checkpoint's ModelConfig (for the FLOP count and the matmul floor)."""
    a.hidden, a.intermediate, a.layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    a.heads, a.kv_heads, a.head_dim, a.vocab = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size


def model_config(a):
    from tx.models.config import ModelConfig, RopeConfig

    return ModelConfig(
        family="qwen3",
        model_type="qwen3",
        architecture="Qwen3ForCausalLM",
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_layers=a.layers,
        num_heads=a.heads,
        num_kv_heads=a.kv_heads,
        head_dim=a.head_dim or a.hidden // a.heads,
        rms_norm_eps=1e-6,
        max_positions=4096,
        rope=RopeConfig(theta=1e6),
        qk_norm=True,
    )


def matmul_timer(dtype, n: int = 2048):
    """(one timed run of an [n, n] @ [n, n] matmul in seconds, its FLOPs); warmed up.

    The operands have the step's dtype, and a bf16 / fp16 matmul accumulates in fp32 as the step's matmuls do
    (:func:`tx.models.matmul.einsum`): on a CPU with AMX that is ~5x the fp32 throughput."""
    from tx.models.matmul import einsum

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    return timer(jax.jit(lambda x, y: einsum("ij,jk->ik", x, y)), a, b), 2 * n**3


def timer(f, *args):
    """A function that runs ``f(*args)`` once and returns the seconds it took; ``f`` is warmed up (compiled) here."""
    jax.block_until_ready(f(*args))

    def run() -> float:
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        return time.perf_counter() - t

    return run


def step_flops(a) -> int:
    """The FLOPs counted for one step: 4 x matmul params x tokens (frozen base: forward + activation gradients;
    LoRA's own small matmuls excluded) plus attention (3 x 4 x B x S^2 x H x D per layer)."""
    c, i, L, hd = a.hidden, a.intermediate, a.layers, a.head_dim
    matmul_params = L * (c * a.heads * hd * 2 + c * a.kv_heads * hd * 2 + 3 * c * i) + c * a.vocab
    return 4 * matmul_params * a.batch * a.seq + 3 * 4 * a.batch * a.seq**2 * a.heads * hd * L


def matmul_floor_timer(a, dtype):
    """(one timed run of the step's counted matmuls alone, in seconds; the FLOPs XLA counts in them); warmed up.

    The frozen base's dots of one LoRA step at the step's shapes and layouts, each layer with its own weights:
    per layer the 7 projections forward (``x W^T``) and their activation gradients (``g W``), 6 batched dots of
    attention's shapes (2 forward: scores, values; 4 backward), and the LM head forward and backward.
    These are exactly the FLOPs the fractions count, with nothing else around them: the step's time over this one
    is what the rest of the step (norms, softmax, LoRA, the optimiser, copies) costs.
    """
    from tx.models.matmul import einsum

    t, c, i, hd = a.batch * a.seq, a.hidden, a.intermediate, a.head_dim
    g = a.heads // a.kv_heads
    count = iter(range(1 << 30))

    def rand(*shape):
        key = jax.random.fold_in(jax.random.key(2), next(count))
        return jax.random.normal(key, shape, jnp.float32).astype(dtype)

    outs = [a.heads * hd, a.kv_heads * hd, a.kv_heads * hd, c, i, i, c]
    ins = [c, c, c, a.heads * hd, c, c, i]
    weights = [[rand(o, n) for o, n in zip(outs, ins)] for _ in range(a.layers)]
    acts = {n: rand(t, n) for n in set(ins) | set(outs)}
    # attention operands: [B, K, S*G, D] queries, [B, K, S, D] keys / values, [B, K, S*G, S] probabilities; every
    # layer's forward and backward dots get operands of their own, so that XLA cannot merge identical dots
    att = [
        [
            (
                rand(a.batch, a.kv_heads, a.seq * g, hd),
                rand(a.batch, a.kv_heads, a.seq, hd),
                rand(a.batch, a.kv_heads, a.seq * g, a.seq),
            )
            for _ in range(2)
        ]
        for _ in range(a.layers)
    ]
    emb, dlogits = rand(a.vocab, c), rand(t, a.vocab)

    def floor(weights, acts, att, emb, dlogits):
        res = []
        for layer, layer_att in zip(weights, att):
            for w in layer:
                res.append(einsum("ti,oi->to", acts[w.shape[1]], w, out_dtype=jnp.float32))  # forward
                res.append(einsum("to,oi->ti", acts[w.shape[0]], w, out_dtype=jnp.float32))  # activation gradient
            for q, kv, p in layer_att:  # forward: scores, values; backward: d probs, d q (like values), d k and d v
                res.append(einsum("bkmd,bktd->bkmt", q, kv, out_dtype=jnp.float32))
                res.append(einsum("bkmt,bktd->bkmd", p, kv, out_dtype=jnp.float32))
                res.append(einsum("bkmt,bkmd->bktd", p, q, out_dtype=jnp.float32))
        res.append(einsum("tc,vc->tv", acts[c], emb, out_dtype=jnp.float32))
        res.append(einsum("tv,vc->tc", dlogits, emb, out_dtype=jnp.float32))
        return res

    args = (weights, acts, att, emb, dlogits)
    f = jax.jit(floor).lower(*args).compile()
    cost = f.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return timer(f, *args), int(cost["flops"]) if cost and "flops" in cost else None


def cpu_model() -> str | None:
    """The CPU's model name (lscpu's "Model name"), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _moe(cfg, tokens: int) -> str:
    """The expert formulation a step of ``tokens`` tokens runs."""
    from tx.models.moe import formulation

    return formulation(tokens, cfg.moe.num_experts, cfg.moe.top_k)


def peak_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def random_batch(a) -> dict:
    """A batch of ``a.batch`` x ``a.seq`` random tokens (seed 0), every position a target."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, a.vocab, size=(a.batch, a.seq + 1)).astype(np.int32)
    return {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "loss_mask": np.ones((a.batch, a.seq), np.float32),
        "segment_ids": np.ones((a.batch, a.seq), np.int32),
        "positions": np.broadcast_to(np.arange(a.seq, dtype=np.int32), (a.batch, a.seq)).copy(),
    }


def make_trainer(name, a, cfg, batch):
    """A Trainer for one configuration, compiled (its first step run); returns (trainer, compile seconds)."""
    import tx
    from tx.models.decoder import CausalLM

    if a.model:
        model = tx.load_model(a.model, dtype=a.dtype)
    else:
        model = CausalLM(cfg, dtype=jnp.dtype(a.dtype), rngs=nnx.Rngs(0))
    kind, _, loop = name.partition("+")
    spec = CONFIGS[kind]
    extra = spec[2] if spec and len(spec) > 2 else {}
    conn = tx.ConnectorConfig(expansion_rate=spec[1], kind=spec[0], **extra) if spec else None
    tx.attach(model, lora=tx.LoRAConfig(rank=a.rank, alpha=2 * a.rank), connector=conn)
    trainer = tx.Trainer(
        model,
        tx.TrainConfig(
            steps=a.steps + 2,
            batch_size=a.batch,
            seq_len=a.seq,
            lr=1e-4,
            remat=a.remat,
            scan_layers=a.scan_layers and loop != "unrolled",
            progress=False,
        ),
    )
    t = time.perf_counter()
    jax.block_until_ready(trainer.step(batch))
    return trainer, time.perf_counter() - t


def step_memory_mb(trainer, batch):
    try:
        lowered = trainer._train_step.lower(
            trainer.states, trainer.opt_state, trainer.rng, trainer.rest, trainer._prepare(batch), jnp.asarray(0)
        )
        m = lowered.compile().memory_analysis()
        return round((m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes) / 2**20, 1)
    except Exception:  # not every backend reports it
        return None


def hf_config(a):
    """The transformers config of :func:`model_config`'s shape (Qwen3: q/k norms, untied LM head)."""
    import transformers as T

    return T.Qwen3Config(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        head_dim=a.head_dim,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        rope_theta=1e6,
        tie_word_embeddings=False,
        architectures=["Qwen3ForCausalLM"],
    )


def peft_importable() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "peft"))


def peft_timer(a, batch, moe: bool):
    """A function timing one PyTorch + PEFT LoRA train step on ``batch`` (see the module docstring); warmed up."""
    import peft
    import torch
    import torch.nn.functional as F
    import transformers as T

    torch.manual_seed(0)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[a.dtype]
    if a.model:
        model = T.AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype)
    else:
        model = T.AutoModelForCausalLM.from_config(hf_config(a), dtype=dtype)
    extra = {"target_parameters": ["experts.gate_up_proj", "experts.down_proj"]} if moe else {}
    lora = peft.LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, target_modules="all-linear", **extra)
    model = peft.get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    targets = torch.tensor(batch["targets"], dtype=torch.long)

    def step():
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().item()

    step()  # warm up

    def run() -> float:
        t = time.perf_counter()
        step()
        return time.perf_counter() - t

    return run, sum(p.numel() for p in params)


def add_shape_args(ap: argparse.ArgumentParser) -> None:
    """The model-shape flags of :func:`model_config`: ``--preset`` and overrides (call :func:`resolve_shape`)."""
    ap.add_argument("--preset", choices=sorted(PRESETS), default="stress", help="shape (see the module docstring)")
    for k in ("hidden", "intermediate", "layers", "heads", "kv-heads", "head-dim", "vocab"):
        ap.add_argument(f"--{k}", type=int, default=None, help="overrides the preset")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(ap)
    ap.add_argument("--batch", type=int, default=None, help="overrides the preset")
    ap.add_argument("--seq", type=int, default=None, help="overrides the preset")
    ap.add_argument("--model", default=None, help="a checkpoint folder to time instead of the preset's shape")
    ap.add_argument("--peft", choices=("auto", "on", "off"), default="auto", help="also time PyTorch + PEFT")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--no-scan-layers", dest="scan_layers", action="store_false", help="unroll the layers")
    ap.add_argument("--steps", type=int, default=6, help="timed rounds (one step of every configuration each)")
    ap.add_argument(
        "--configs",
        default="lora,static2,static4,dynamic2,dynamic4,mhc2,mhc4",
        help="comma-separated; a name + '+unrolled' (e.g. lora+unrolled) runs that one with scan_layers=False",
    )
    ap.add_argument("--plain-malloc", action="store_true", help="leave glibc's malloc as it is (see above)")
    a = ap.parse_args()
    from tx.host_memory import keep_freed_memory

    kept = False if a.plain_malloc else keep_freed_memory()  # before JAX starts its threads
    resolve_shape(a)
    if a.model:
        from tx.models.config import load_config

        cfg = load_config(a.model)
        shape_from_checkpoint(a, cfg)
    else:
        cfg = model_config(a)
    moe = cfg.moe is not None
    with_peft = a.peft == "on" or (a.peft == "auto" and peft_importable())
    batch = random_batch(a)
    tokens = a.batch * a.seq
    flops = None if moe else step_flops(a)  # the count and the floor are for dense MLPs
    matmul, matmul_flops = matmul_timer(jnp.dtype(a.dtype))
    floor, floor_flops = (None, None) if moe else matmul_floor_timer(a, jnp.dtype(a.dtype))
    names = [n for n in a.configs.split(",") if n]
    for n in names:
        kind, plus, loop = n.partition("+")
        if kind not in CONFIGS or (plus and loop != "unrolled"):
            ap.error(f"unknown configuration {n!r}: pick from {', '.join(CONFIGS)}, each optionally + '+unrolled'")
    trainers, compile_s = {}, {}
    for name in names:
        trainers[name], compile_s[name] = make_trainer(name, a, cfg, batch)
    runners = {name: (lambda t=trainers[name]: jax.block_until_ready(t.step(batch))) for name in names}
    rotation = list(names)
    if with_peft:
        t = time.perf_counter()
        peft_run, peft_params = peft_timer(a, batch, moe)
        peft_compile = time.perf_counter() - t
        rotation.append("peft")
    times = {name: [] for name in rotation}
    faults = {name: [] for name in names}
    matmul_times, floor_times = [], []
    for r in range(a.steps):
        matmul_times += [matmul(), matmul()]
        if floor is not None:
            floor_times.append(floor())
        for name in rotation[r % len(rotation) :] + rotation[: r % len(rotation)]:
            if name == "peft":
                times[name].append(peft_run())
                continue
            f, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - t)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
    peak = matmul_flops / min(matmul_times)
    floor_best = min(floor_times) if floor_times else None
    out = {
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "preset": None if a.model else a.preset,
        "model": a.model,
        "moe": None
        if not moe
        else {"experts": cfg.moe.num_experts, "top_k": cfg.moe.top_k, "formulation": _moe(cfg, a.batch * a.seq)},
        "cpu": cpu_model(),
        "shape": {k: getattr(a, k) for k in (*SHAPE_KEYS, "batch", "seq", "rank", "dtype", "remat", "scan_layers")},
        "keep_freed_memory": kept,
        "step_flops": flops,
        "rounds": a.steps,
        "matmul_gflops_per_s": round(peak / 1e9, 1),
        "matmul_floor_seconds": None if floor_best is None else round(floor_best, 4),
        "matmul_floor_flops": floor_flops,  # as XLA counts them; equals step_flops
        "matmul_floor_fraction_of_peak": None if floor_best is None else round(flops / floor_best / peak, 4),
        "configs": {},
    }
    for name in names:
        best, median = min(times[name]), statistics.median(times[name])
        r = {
            "seconds_per_step": median,
            "min_seconds_per_step": best,
            "tokens_per_s": tokens / best,
            "compile_seconds": compile_s[name],
            "step_memory_mb": step_memory_mb(trainers[name], batch),
            "page_faults_per_step": int(statistics.median(faults[name])),
        }
        if floor_best is not None:
            r["fraction_of_matmul_peak"] = flops / best / peak
            r["fraction_of_matmul_peak_median"] = flops / median / peak
            r["fraction_of_matmul_floor"] = floor_best / best
        out["configs"][name] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
    if with_peft:
        best = min(times["peft"])
        out["peft"] = {
            "seconds_per_step": round(statistics.median(times["peft"]), 4),
            "min_seconds_per_step": round(best, 4),
            "tokens_per_s": round(tokens / best, 4),
            "setup_seconds": round(peft_compile, 4),
            "trainable_parameters": peft_params,
        }
        if "lora" in times:
            out["lora_speedup_vs_peft"] = round(best / min(times["lora"]), 4)
            out["lora_speedup_vs_peft_paired_median"] = round(
                statistics.median(p / t for p, t in zip(times["peft"], times["lora"])), 4
            )
    if "lora" in times:
        base = times["lora"]
        others = [n for n in names if n != "lora"]
        if "lora+unrolled" in times:  # unrolled connectors against unrolled LoRA
            base_u = times["lora+unrolled"]
            others_u = [n for n in others if n.endswith("+unrolled") and n != "lora+unrolled"]
            out["overhead_vs_lora_unrolled"] = {n: round(min(times[n]) / min(base_u) - 1, 4) for n in others_u}
            out["overhead_vs_lora_unrolled_paired_median"] = {
                n: round(statistics.median(t / b for t, b in zip(times[n], base_u)) - 1, 4) for n in others_u
            }
        out["overhead_vs_lora"] = {n: round(min(times[n]) / min(base) - 1, 4) for n in others}
        out["overhead_vs_lora_paired_median"] = {
            n: round(statistics.median(t / b for t, b in zip(times[n], base)) - 1, 4) for n in others
        }
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
