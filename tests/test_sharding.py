"""Sharded models on 8 fake CPU devices equal the single-device model: logits and three train steps.

Meshes as users make them: tx's own (Auto axes), ``jax.make_mesh``'s (Explicit axes, also under the user's
``jax.set_mesh``), other axis names through ``mesh_axes``; a mesh tx cannot use is refused naming the axis.
Experts of a MoE model split over an expert axis (fsdp=2 x expert=4).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures_models import make_checkpoint

from tx.errors import ConfigError
from tx.sharding import ALIASES, RULES, parse_mesh_spec, partition_spec, tx_mesh

TOL = 1e-5  # fp32: a sharded step sums in another order


def check(kind, folder):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    script = Path(__file__).parent / "sharded_step_check.py"
    out = subprocess.run(
        [sys.executable, str(script), kind, str(folder)], capture_output=True, text=True, env=env, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def same_as_single(single, sharded):
    np.testing.assert_allclose(np.array(sharded["logits"]), np.array(single["logits"]), atol=1e-4)
    np.testing.assert_allclose(sharded["losses"], single["losses"], atol=TOL)
    np.testing.assert_allclose(np.array(sharded["lora_b"]), np.array(single["lora_b"]), atol=TOL)


@pytest.mark.slow
def test_every_kind_of_mesh_matches_single_device(checkpoints):
    folder, _ = checkpoints["qwen2"]
    r = check("dense", folder)
    single = r["single"]
    assert np.abs(np.array(single["lora_b"])).max() > 0  # the adapters did move
    assert np.abs(np.array(single["logits"])).max() > 0.5
    for name in ("auto", "explicit", "renamed"):
        sharded = r[name]
        same_as_single(single, sharded)
        # up_proj weight [L, out=72, in=40]: out over tp (72 % 2 == 0), in over fsdp (40 % 4 == 0)
        assert sharded["spec"] == "P(None, 'tp', 'fsdp')", (name, sharded["spec"])
        assert sharded["lora_b_spec"] == "P(None, 'tp')", (name, sharded["lora_b_spec"])
        assert max(sharded["per_device_bytes"]) == sharded["weight_bytes"] // 8
        assert "fsdp" in sharded["embed_spec"] or "tp" in sharded["embed_spec"]
        assert sharded["mesh_axes"] == ["fsdp", "tp"]
    errors = r["errors"]
    assert "mesh axis 'cols' (size 2) has no role in tx" in errors["unmapped"], errors
    assert "mesh_axes={'fsdp': 'cols'}" in errors["unmapped"]
    assert "mesh_axes key 'data' is not a tx mesh role" in errors["bad_role"], errors
    assert "names axis 'row', but the mesh's axes are 'cols', 'rows'" in errors["bad_name"], errors
    assert "batch of 6 rows" in errors["batch"] and "multiple of 4" in errors["batch"], errors


@pytest.mark.slow
def test_experts_split_over_expert_axis(tmp_path):
    folder, _ = make_checkpoint("mixtral", tmp_path / "mixtral")  # 4 experts, top-2, 3 layers
    r = check("moe", folder)
    single = r["single"]
    assert np.abs(np.array(single["lora_b"])).max() > 0
    for name in ("expert", "ragged"):  # the dense formulation (CPU's) and ragged_dot (GPU / TPU's)
        sharded = r[name]
        same_as_single(single, sharded)
        # gate_up [L, E=4, 2I=56 (tp: none here), C=40]: E over expert (4), C over fsdp (2): an eighth each
        assert sharded["expert_spec"] == "P(None, 'expert', None, 'fsdp')", sharded["expert_spec"]
        assert sharded["expert_lora_b_spec"] == "P(None, 'expert')", sharded["expert_lora_b_spec"]
        assert len(sharded["expert_bytes_per_device"]) == 8
        assert max(sharded["expert_bytes_per_device"]) <= sharded["expert_bytes"] // 4


class FakeMesh:
    def __init__(self, **sizes):
        self.shape = sizes


def test_partition_rules():
    mesh = FakeMesh(fsdp=2, tp=2, expert=4)
    assert tuple(partition_spec(mesh, ("layers", "expert", "tp", "fsdp"), (3, 8, 6, 4))) == (
        None,
        "expert",
        "tp",
        "fsdp",
    )
    # no expert axis: the experts take fsdp, and the dimension that asked for fsdp stays whole
    assert tuple(partition_spec(FakeMesh(fsdp=2, tp=1), ("layers", "expert", "tp", "fsdp"), (3, 8, 6, 4))) == (
        None,
        "fsdp",
        None,
        None,
    )
    # an axis that does not divide the dimension, or of size 1, is not used
    assert tuple(partition_spec(FakeMesh(fsdp=4, tp=1, expert=1), ("expert", "fsdp"), (6, 8))) == (None, "fsdp")
    assert set(RULES) >= {"fsdp", "tp", "vocab", "expert", "layers", "lora", None}


def test_one_device_meshes_become_tx_meshes():
    import jax

    auto = jax.sharding.AxisType.Auto
    m = tx_mesh(jax.make_mesh((1, 1), ("data", "model")))  # Explicit axes, aliased names
    assert m.axis_names == ("fsdp", "tp") and m.axis_types == (auto, auto)
    assert tx_mesh(m) == m
    m = tx_mesh(jax.make_mesh((1, 1, 1), ("stage", "x", "y")), {"tp": "y", "expert": "x"})
    assert m.axis_names == ("tp", "expert")  # 'stage' has size 1 and no role: left out
    with pytest.raises(ConfigError, match="taken by both"):
        tx_mesh(jax.make_mesh((1,), ("x",)), {"tp": "x", "fsdp": "x"})
    with pytest.raises(ConfigError, match="must be a jax.sharding.Mesh"):
        tx_mesh("fsdp=1")


def test_mesh_spec_parsing():
    assert parse_mesh_spec("fsdp=4,tp=2") == {"fsdp": 4, "tp": 2}
    assert parse_mesh_spec("data=2, ep=4") == {"fsdp": 2, "expert": 4}
    assert "data" in ALIASES["fsdp"] and "model" in ALIASES["tp"]
    for bad in ("fsdp=0", "pipe=2", "dp=8", "fsdp=2,data=2", "fsdp"):
        with pytest.raises(ConfigError, match="bad mesh"):
            parse_mesh_spec(bad)
