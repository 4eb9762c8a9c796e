"""The benchmarks run (tiny shapes, one round) and print the JSON their docstrings describe; step.py's FLOP count
is the FLOPs XLA counts in the matmuls it names; step.py times PEFT in the same run and any checkpoint folder;
accelerator_check.py runs its checks and benchmarks on CPU; profile_step.py sees every matmul the step runs."""

import json
import subprocess
import sys

import pytest
from fixtures_models import make_checkpoint
from fixtures_run import ROOT, tx_env

TINY = ["--hidden", 64, "--intermediate", 96, "--layers", 2, "--heads", 4, "--kv-heads", 2, "--vocab", 256]


def run(script, *args):
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=tx_env(), cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_step_benchmark_json_and_flop_count():
    out = run(
        "step.py", *TINY, "--batch", 2, "--seq", 16, "--rank", 4, "--steps", 1, "--configs", "lora,mhc2", "--peft", "on"
    )
    assert out["preset"] == "stress" and out["shape"]["head_dim"] == 16 and out["shape"]["batch"] == 2
    # the matmuls the floor times are exactly the FLOPs the fractions count (4 x params x tokens + attention)
    assert out["matmul_floor_flops"] == out["step_flops"]
    assert out["matmul_floor_seconds"] > 0 and out["matmul_gflops_per_s"] > 0
    for name in ("lora", "mhc2"):
        r = out["configs"][name]
        assert r["min_seconds_per_step"] <= r["seconds_per_step"]
        assert 0 < r["fraction_of_matmul_peak"] and 0 < r["fraction_of_matmul_floor"]
        # the fraction of the peak is the floor's own fraction times the step's fraction of the floor (up to the
        # JSON's rounding to 4 decimals: the fractions are ~0.005 at this size)
        want = out["matmul_floor_fraction_of_peak"] * r["fraction_of_matmul_floor"]
        assert r["fraction_of_matmul_peak"] == pytest.approx(want, rel=1e-2, abs=1e-4)
    assert set(out["overhead_vs_lora"]) == {"mhc2"}
    # PEFT on the same shape in the same rounds: LoRA (r=4) on all 7 projections of 2 layers, as tx's all-linear
    c, hd = 64, 16
    shapes = [(c, 4 * hd), (c, 2 * hd), (c, 2 * hd), (4 * hd, c), (c, 96), (c, 96), (96, c)]
    assert out["peft"]["trainable_parameters"] == 2 * sum(4 * (i + o) for i, o in shapes)
    ratio = out["peft"]["min_seconds_per_step"] / out["configs"]["lora"]["min_seconds_per_step"]
    assert out["lora_speedup_vs_peft"] == pytest.approx(ratio, rel=1e-2)


@pytest.mark.slow
def test_profile_sees_every_matmul_of_the_step():
    out = run("profile_step.py", *TINY, "--batch", 2, "--seq", 16, "--rank", 4, "--steps", 1, "--config", "lora")
    # the profiled matmuls, each run counted from its HLO shapes, are exactly step.py's count (frozen base and
    # attention) plus LoRA's own: per adapted linear 6 x tokens x r x (in + out) (forward 2, backward 4)
    t, r, c, hd = 32, 4, 64, 16
    shapes = [(c, 4 * hd), (c, 2 * hd), (c, 2 * hd), (4 * hd, c), (c, 96), (c, 96), (96, c)]
    lora = 2 * sum(6 * t * r * (i + o) for i, o in shapes)
    assert out["matmul_flops_per_step"] == out["counted_step_flops"] + lora
    kinds = out["by_kind"]
    assert sum(k["seconds"] for k in kinds.values()) == pytest.approx(out["thunk_seconds_per_step"], abs=1e-3)
    assert kinds["matmul"]["seconds"] > 0 and any(e["runs_per_step"] == 2 for e in out["top"])  # the layer scan


@pytest.mark.slow
def test_step_benchmark_on_a_moe_checkpoint(tmp_path):
    folder, _ = make_checkpoint("qwen2_moe", tmp_path / "moe")
    out = run("step.py", "--model", folder, "--batch", 2, "--seq", 16, "--rank", 4, "--steps", 1, "--configs", "lora")
    assert out["model"] == str(folder) and out["preset"] is None
    assert out["moe"] == {"experts": 4, "top_k": 2, "formulation": "dense"}
    assert out["shape"]["hidden"] == 40 and out["shape"]["layers"] == 3
    assert out["matmul_floor_seconds"] is None  # the floor counts dense MLPs only
    assert out["configs"]["lora"]["tokens_per_s"] > 0


@pytest.mark.slow
def test_accelerator_check_on_cpu():
    out = run("accelerator_check.py", "--tiny", "--budget", 1500)  # a loaded CI machine may take long
    assert out["backend"] == "cpu" and out["ok"], out["checks"]
    want = {"logits_fp32_highest", "train_fp32", "moe_ragged_vs_dense", "generation_greedy", "identity_bf16"}
    assert want <= set(out["checks"])
    # ragged and dense experts are different computations: their difference is real, and small
    assert 0 < out["checks"]["moe_ragged_vs_dense"]["relative_diff"] <= 1e-4
    assert {"step_tiny_float32", "step_tiny_bfloat16", "generate_tiny"} <= set(out["bench"])
    assert out["bench"]["step_tiny_float32"]["configs"]["lora"]["tokens_per_s"] > 0, out["bench"]


@pytest.mark.slow
def test_generate_benchmark_json():
    out = run("generate.py", *TINY, "--batch", 2, "--prompt", 8, "--new", 4, "--rounds", 1)
    assert set(out["dtypes"]) == {"float32", "bfloat16"}


def test_moe_benchmark_formulations_agree():
    """benchmarks/moe.py on a tiny layer: every formulation's outputs and input gradients match dense's (1e-5),
    with LoRA on the experts and more rows per expert than one block."""
    from tx.models import moe as M

    args = ("--tokens", 160, "--experts", 4, "--top-k", 2, "--hidden", 16, "--width", 8, "--lora-rank", 2)
    assert 160 * 2 // 4 > M.BLOCK
    out = run("moe.py", *args, "--repeats", 1)
    assert set(out["ms"]) == {"dense", "blocked", "ragged"} and out["block"] == M.BLOCK
    for kind, diff in out["max_diff_vs_dense"].items():
        assert diff["out"] <= 1e-5 and diff["grad_x"] <= 1e-5, (kind, diff)
    assert all(v > 0 for v in out["ms"].values())
