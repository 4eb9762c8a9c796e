"""Run by tests/test_multihost.py. ``multi PID PORT ...``: one of two processes (4 fake CPU devices each, gloo
collectives) training on one fsdp=4,tp=2 mesh that spans both, as ``jax.distributed.initialize`` sets it up on
real hosts. ``single - - ...``: the same run in one process with 8 devices. Both train 4 steps (checkpoints at 2
and 4), then resume the run to step 6 with a new Trainer, write the LoRA-merged weights with tx.save_model (the
connector taken out first: transformers has no place for it), and print one JSON line.

argv: mode, process id, port, checkpoint folder, run folder (shared by both processes), data JSONL, tokenizer.
"""

import json
import sys

import jax


def main(mode, pid, port, folder, out, data, tok_folder):
    # the resumed run's Trainer compiles the same step again: let the second compilation come from a cache
    jax.config.update("jax_compilation_cache_dir", str(out) + f".jax-cache-{pid}")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    if mode == "multi":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=int(pid))
        assert jax.process_count() == 2 and jax.local_device_count() == 4
    assert jax.device_count() == 8

    import tx
    from tx.multihost import host_array
    from tx.sharding import make_mesh

    mesh = make_mesh("fsdp=4,tp=2")
    tok = tx.load_tokenizer(tok_folder)
    losses, model = [], None
    for steps, resume in ((4, False), (6, True)):
        model = tx.load_model(folder, mesh=mesh)
        tx.attach(model, lora=tx.LoRAConfig(rank=4, alpha=8), connector=tx.ConnectorConfig(expansion_rate=2))
        cfg = tx.TrainConfig(steps=steps, batch_size=8, seq_len=32, lr=1e-2, save_every=2, out=out, resume=resume)
        result = tx.Trainer(model, cfg, mesh=mesh).fit(data, tokenizer=tok)
        losses += [h["loss"] for h in result["history"] if "loss" in h]
    w = model.layers.mlp.up_proj.base.weight[...]
    lora_b = host_array(model.layers.mlp.up_proj.lora_b[...]).tolist()
    from tx.adapters.attach import connector_sites
    from tx.models.decoder import Residual, Streams

    for name, block, _, _ in connector_sites(model):  # plain residuals again; LoRA stays, folded in by save_model
        setattr(block, name, Residual())
    model.streams, model.connector_config = Streams(), None
    tx.save_model(model, str(out) + "-merged", max_shard_size="200KB")  # several shards and an index
    report = {
        "losses": losses,
        "fully_addressable": bool(w.is_fully_addressable),
        "local_bytes": int(sum(s.data.nbytes for s in w.addressable_shards)),
        "weight_bytes": int(w.nbytes),
        "lora_b": lora_b,
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
