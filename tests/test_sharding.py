"""A train step sharded over fsdp=4 x tp=2 (8 fake CPU devices) equals the single-device step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


@pytest.mark.slow
def test_sharded_step_matches_single_device(checkpoints):
    folder, _ = checkpoints["qwen2"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    script = Path(__file__).parent / "sharded_step_check.py"
    out = subprocess.run(
        [sys.executable, str(script), str(folder)], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    single, sharded = r["single"], r["sharded"]
    np.testing.assert_allclose(sharded["losses"], single["losses"], atol=1e-5)
    np.testing.assert_allclose(np.array(sharded["lora_b"]), np.array(single["lora_b"]), atol=1e-5)
    assert np.abs(np.array(single["lora_b"])).max() > 0  # the adapters did move
    # up_proj weight [L, out=72, in=40]: out over tp (72 % 2 == 0), in over fsdp (40 % 4 == 0)
    assert sharded["spec"] == "P(None, 'tp', 'fsdp')", sharded["spec"]
    assert sharded["lora_b_spec"] == "P(None, 'tp')", sharded["lora_b_spec"]
    assert max(sharded["per_device_bytes"]) == sharded["weight_bytes"] // 8
    assert "fsdp" in sharded["embed_spec"] or "tp" in sharded["embed_spec"]
