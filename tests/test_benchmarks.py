"""The benchmarks run (tiny shapes, one round) and print the JSON their docstrings describe; step.py's FLOP count
is the FLOPs XLA counts in the matmuls it names."""

import json
import subprocess
import sys

import pytest
from fixtures_run import ROOT, tx_env

TINY = ["--hidden", 64, "--intermediate", 96, "--layers", 2, "--heads", 4, "--kv-heads", 2, "--vocab", 256]


def run(script, *args):
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=tx_env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_step_benchmark_json_and_flop_count():
    out = run("step.py", *TINY, "--batch", 2, "--seq", 16, "--rank", 4, "--steps", 1, "--configs", "lora,mhc2")
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


@pytest.mark.slow
def test_generate_benchmark_json():
    out = run("generate.py", *TINY, "--batch", 2, "--prompt", 8, "--new", 4, "--rounds", 1)
    assert set(out["dtypes"]) == {"float32", "bfloat16"}
