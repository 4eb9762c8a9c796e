"""Run by tests/test_sharding.py in a subprocess with 8 fake CPU devices (XLA_FLAGS set before jax starts).

``python sharded_step_check.py dense FOLDER``: the model on one device, then on three kinds of 8-device mesh
(tx's own Auto mesh, ``jax.make_mesh``'s Explicit one, an Explicit mesh with other axis names and ``mesh_axes``);
``python sharded_step_check.py moe FOLDER``: one device, then an Explicit fsdp=2 x expert=4 mesh. Each prints one
JSON line: per mesh the logits, three train steps' losses, a LoRA B after them, and where the weights live.
"""

import json
import os
import sys

import jax
import numpy as np

import tx
from tx.errors import ConfigError
from tx.models.decoder import blocks
from tx.sharding import batch_sharding, make_mesh, tx_mesh

B, S = 8, 16


def batch(vocab):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, size=(B, S + 1)).astype(np.int32)
    return {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "loss_mask": np.ones((B, S), np.float32),
        "segment_ids": np.ones((B, S), np.int32),
        "positions": np.tile(np.arange(S, dtype=np.int32), (B, 1)),
    }


def spec(x):
    return str(x.sharding.spec) if hasattr(x.sharding, "spec") else "single"


def run(folder, mesh, mesh_axes=None, *, experts=False, context=None):
    """Logits, 3 train steps, a LoRA B and placements for one mesh. ``context``: a mesh set around the steps."""
    model = tx.load_model(folder, mesh=mesh, mesh_axes=mesh_axes)
    b = batch(model.config.vocab_size)
    logits = np.asarray(model(b["input_ids"]))
    tx.attach(model, lora=tx.LoRAConfig(rank=4, alpha=8), connector=tx.ConnectorConfig(expansion_rate=2))
    cfg = tx.TrainConfig(steps=3, batch_size=B, seq_len=S, lr=1e-2, progress=False)
    trainer = tx.Trainer(model, cfg, mesh=mesh, mesh_axes=mesh_axes)
    if context is not None:
        with jax.set_mesh(context):
            losses = [float(trainer.step(b)["loss"]) for _ in range(3)]
    else:
        losses = [float(trainer.step(b)["loss"]) for _ in range(3)]
    r = {"logits": logits.tolist(), "losses": losses}
    if experts:
        block = next(blk for _, blk, _ in blocks(model) if getattr(blk.mlp, "experts", None) is not None)
        ex = block.mlp.experts
        lora_b = ex.gate_up_proj.lora_b[...]
        weights = [ex.gate_up_proj.base.weight[...], ex.down_proj.base.weight[...]]
        r["expert_bytes"] = int(sum(w.nbytes for w in weights))
        per_device = {}
        for w in weights:
            for sh in w.addressable_shards:
                per_device[str(sh.device)] = per_device.get(str(sh.device), 0) + sh.data.nbytes
        r["expert_bytes_per_device"] = sorted(per_device.values())
        r["expert_spec"] = spec(weights[0])
        r["expert_lora_b_spec"] = spec(lora_b)
    else:
        up = model.layers.mlp.up_proj
        lora_b = up.lora_b[...]
        w = up.base.weight[...]
        r.update(
            spec=spec(w),
            weight_bytes=int(w.nbytes),
            per_device_bytes=[sh.data.nbytes for sh in w.addressable_shards],
            lora_b_spec=spec(lora_b),
            embed_spec=spec(model.embed.embedding[...]),
            mesh_axes=list(w.sharding.mesh.axis_names) if hasattr(w.sharding, "mesh") else None,
        )
    r["lora_b"] = np.asarray(lora_b).tolist()
    return r


def error_of(fn):
    try:
        fn()
    except ConfigError as exc:
        return str(exc)
    return None


def main(kind, folder):
    assert jax.device_count() == 8, jax.devices()
    results = {"single": run(folder, None, experts=kind == "moe")}
    if kind == "dense":
        explicit = jax.make_mesh((4, 2), ("fsdp", "tp"))  # JAX's default axis type: Explicit
        assert all(t == jax.sharding.AxisType.Explicit for t in explicit.axis_types), explicit.axis_types
        results["auto"] = run(folder, make_mesh("fsdp=4,tp=2"))
        results["explicit"] = run(folder, explicit, context=explicit)  # even under the user's jax.set_mesh
        # other names, in the other order: tp first in the mesh, fsdp second
        renamed = jax.make_mesh((2, 4), ("cols", "rows"))
        results["renamed"] = run(folder, renamed, {"fsdp": "rows", "tp": "cols"})
        results["errors"] = {
            "unmapped": error_of(lambda: tx.load_model(folder, mesh=renamed)),
            "bad_role": error_of(lambda: tx.load_model(folder, mesh=renamed, mesh_axes={"data": "rows"})),
            "bad_name": error_of(lambda: tx.load_model(folder, mesh=renamed, mesh_axes={"fsdp": "row"})),
            "batch": error_of(lambda: batch_sharding(tx_mesh(explicit), 3, 6)),
        }
    else:
        mesh = jax.make_mesh((2, 4), ("fsdp", "expert"))
        results["expert"] = run(folder, mesh, experts=True)
        os.environ["TX_MOE"] = "ragged"  # the sorted ragged_dot formulation (GPU / TPU's), sharded the same way
        results["ragged"] = run(folder, mesh, experts=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
