"""Run by tests/test_sharding.py in a subprocess with 8 fake CPU devices (XLA_FLAGS set before jax starts)."""

import json
import sys

import jax
import numpy as np

import tx
from tx.sharding import make_mesh


def main(folder):
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    b, s = 8, 16
    ids = rng.integers(3, 100, size=(b, s + 1)).astype(np.int32)
    batch = {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "loss_mask": np.ones((b, s), np.float32),
        "segment_ids": np.ones((b, s), np.int32),
        "positions": np.tile(np.arange(s, dtype=np.int32), (b, 1)),
    }
    results = {}
    for name, mesh in (("single", None), ("sharded", make_mesh("fsdp=4,tp=2"))):
        model = tx.load_model(folder, mesh=mesh)
        tx.attach(model, lora=tx.LoRAConfig(rank=4, alpha=8), connector=tx.ConnectorConfig(expansion_rate=2))
        trainer = tx.Trainer(
            model, tx.TrainConfig(steps=3, batch_size=b, seq_len=s, lr=1e-2, progress=False), mesh=mesh
        )
        losses = [float(trainer.step(batch)["loss"]) for _ in range(3)]
        lora_b = np.asarray(model.layers.mlp.up_proj.lora_b[...])
        w = model.layers.mlp.up_proj.base.weight[...]
        per_device = [sh.data.nbytes for sh in w.addressable_shards]
        results[name] = {
            "losses": losses,
            "lora_b": lora_b.tolist(),
            "spec": str(w.sharding.spec) if hasattr(w.sharding, "spec") else "single",
            "weight_bytes": int(w.nbytes),
            "per_device_bytes": per_device,
            "lora_b_spec": str(getattr(model.layers.mlp.up_proj.lora_b[...].sharding, "spec", "")),
            "embed_spec": str(getattr(model.embed.embedding[...].sharding, "spec", "")),
        }
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
