"""Where a train step's time goes: one configuration of benchmarks/step.py profiled, its time split by kind of work.

Runs the step under ``jax.profiler`` (the perfetto trace XLA writes: one event per executed thunk, i.e. per HLO
instruction of the compiled step, inside the layer scan's loop too), reads the compiled HLO to say what each
instruction is, and prints one JSON object:

- ``seconds_per_step``: wall time per step while profiled (the profiler adds a little);
- ``by_kind``: seconds per step spent in each kind of instruction, summed over the threads that ran them, and its
  fraction of the wall time: ``matmul`` (fusions with a dot, YNNPACK / oneDNN matmul calls), ``copy`` (copies and
  transposes: layout changes XLA inserted), ``slice`` (dynamic-slice / dynamic-update-slice: the layer scan reading
  a layer's weights and writing its outputs and gradients), ``reduce`` (fusions with a reduction: norms, softmax,
  the loss, bias and LoRA gradients), ``fill`` (broadcasts alone: the zero-filled stacks the layer scan writes its
  saved values into), ``gather_scatter``, ``sort``, ``elementwise`` (the remaining loop fusions) and
  ``other``;
- ``matmul_flops_per_step``: the FLOPs of the matmul instructions run (from their shapes, every run counted);
  ``counted_step_flops``: step.py's count (frozen base and attention, LoRA's own small matmuls left out);
- ``matmul_gflops_per_s``: those FLOPs over the matmul instructions' time;
- ``top``: the instructions that took most time, with their kind, output shape and seconds per step.

Usage: python benchmarks/profile_step.py [--config lora|mhc4|...] [--preset stress|wide] [--model PATH]
       [--steps 4] [--dtype float32] [--top 25] [--hlo FILE] [shape flags as in step.py]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step as step_bench  # noqa: E402

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+?)\s+([\w\-]+)\((.*)$")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CONTAINERS = {"while", "conditional", "call"}


def parse_hlo(text: str) -> tuple[dict, dict]:
    """(instruction name -> (opcode, shape, rest of line), computation name -> its instruction names)."""
    instrs, comps, current = {}, collections.defaultdict(list), None
    for line in text.splitlines():
        m = _INSTR.match(line)
        if m:
            name, shape, opcode, rest = m.groups()
            instrs[name] = (opcode, shape, rest)
            if current is not None:
                comps[current].append(name)
            continue
        m = _COMP.match(line)
        if m:
            current = m.group(1)
    return instrs, comps


def _called(rest: str) -> list[str]:
    return re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", rest)


def _dims(shape: str) -> list[int]:
    m = re.search(r"\[([\d,]*)\]", shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def dot_flops(name: str, instrs: dict) -> int:
    """2 x output elements x contracted size of a dot, from its operand shapes."""
    _, shape, rest = instrs[name]
    operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
    if not operands or not m or operands[0] not in instrs:
        return 0
    dims = _dims(instrs[operands[0]][1])
    k = int(np.prod([dims[int(i)] for i in m.group(1).split(",") if i]))
    return 2 * int(np.prod(_dims(shape))) * k


def _inner(name: str, instrs: dict, comps: dict) -> list[str]:
    """The instruction and everything in the computations it calls (fusions, nested matmul regions)."""
    out, todo = [name], _called(instrs[name][2])
    while todo:
        comp = todo.pop()
        for n in comps.get(comp, []):
            out.append(n)
            todo += _called(instrs[n][2])
    return out


def classify(name: str, instrs: dict, comps: dict) -> tuple[str, int]:
    """The kind of an executed instruction and its matmul FLOPs per run (0 unless it is a matmul)."""
    opcode, _, rest = instrs[name]
    inner = _inner(name, instrs, comps)
    ops = {instrs[n][0] for n in inner}
    if ops & {"dot", "convolution"} or "__onednn" in rest:
        return "matmul", sum(dot_flops(n, instrs) for n in inner if instrs[n][0] == "dot")
    if ops & {"gather", "scatter"}:
        return "gather_scatter", 0
    if "sort" in ops:
        return "sort", 0
    if ops & {"dynamic-slice", "dynamic-update-slice"}:
        return "slice", 0
    if ops & {"reduce", "reduce-window"}:
        return "reduce", 0
    if ops - {"fusion"} <= {"copy", "transpose", "parameter", "bitcast", "reshape"}:
        return "copy", 0
    if ops - {"fusion"} <= {"broadcast", "constant", "parameter", "bitcast"}:
        return "fill", 0
    if opcode == "fusion" or opcode in ("add", "multiply", "select", "convert", "exponential", "broadcast"):
        return "elementwise", 0
    return "other", 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    step_bench.add_shape_args(ap)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--model", default=None, help="a checkpoint folder instead of the preset's shape")
    ap.add_argument("--config", default="lora", help=f"one of {', '.join(step_bench.CONFIGS)}")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=4, help="profiled steps")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--hlo", default=None, help="also write the compiled step's HLO text to this file")
    a = ap.parse_args()
    a.remat, a.scan_layers = False, True
    if a.config.partition("+")[0] not in step_bench.CONFIGS:
        ap.error(f"unknown configuration {a.config!r}: pick from {', '.join(step_bench.CONFIGS)}")
    from tx.host_memory import keep_freed_memory

    keep_freed_memory()
    step_bench.resolve_shape(a)
    if a.model:
        from tx.models.config import load_config

        cfg = load_config(a.model)
        step_bench.shape_from_checkpoint(a, cfg)
    else:
        cfg = step_bench.model_config(a)
    batch = step_bench.random_batch(a)
    trainer, _ = step_bench.make_trainer(a.config, a, cfg, batch)
    args = (trainer.states, trainer.opt_state, trainer.rng, trainer.rest, trainer._prepare(batch), jnp.asarray(0))
    hlo = trainer._train_step.lower(*args).compile().as_text()
    if a.hlo:
        with open(a.hlo, "w") as f:
            f.write(hlo)
    instrs, comps = parse_hlo(hlo)
    for _ in range(2):
        jax.block_until_ready(trainer.step(batch))
    folder = tempfile.mkdtemp(prefix="tx-profile-")
    jax.profiler.start_trace(folder, create_perfetto_trace=True)
    t = time.perf_counter()
    for _ in range(a.steps):
        jax.block_until_ready(trainer.step(batch))
    wall = (time.perf_counter() - t) / a.steps
    jax.profiler.stop_trace()
    trace = json.load(gzip.open(glob.glob(f"{folder}/**/*.trace.json.gz", recursive=True)[0]))
    seconds, runs, flops, kinds = collections.Counter(), collections.Counter(), {}, {}
    for e in trace["traceEvents"]:
        name = e.get("name")
        if e.get("ph") != "X" or name not in instrs or instrs[name][0] in _CONTAINERS:
            continue
        if name not in kinds:
            kinds[name], flops[name] = classify(name, instrs, comps)
        seconds[name] += e.get("dur", 0) / 1e6 / a.steps
        runs[name] += 1
    by_kind = collections.Counter()
    for name, s in seconds.items():
        by_kind[kinds[name]] += s
    mm_s = by_kind.get("matmul", 0.0)
    mm_flops = sum(flops[n] * runs[n] for n in seconds if kinds[n] == "matmul") / a.steps
    out = {
        "config": a.config,
        "preset": None if a.model else a.preset,
        "model": a.model,
        "cpu": step_bench.cpu_model(),
        "shape": {k: getattr(a, k) for k in (*step_bench.SHAPE_KEYS, "batch", "seq", "rank", "dtype")},
        "seconds_per_step": round(wall, 4),
        "thunk_seconds_per_step": round(sum(seconds.values()), 4),
        "by_kind": {
            k: {"seconds": round(v, 4), "fraction_of_wall": round(v / wall, 3)} for k, v in by_kind.most_common()
        },
        "matmul_flops_per_step": int(mm_flops),
        "counted_step_flops": None if a.model else step_bench.step_flops(a),
        "matmul_gflops_per_s": round(mm_flops / mm_s / 1e9, 1) if mm_s else None,
        "top": [
            {
                "name": n,
                "kind": kinds[n],
                "opcode": instrs[n][0],
                "shape": instrs[n][1],
                "seconds": round(s, 5),
                "runs_per_step": runs[n] // a.steps,
                "gflop_per_run": round(flops[n] / 1e9, 3),
            }
            for n, s in seconds.most_common(a.top)
        ],
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
