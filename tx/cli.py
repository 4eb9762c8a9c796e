"""The ``tx`` command: a thin layer over the Python API (demo, verify, finetune, generate, eval, merge)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

DESCRIPTION = """Fine-tune pretrained Hugging Face checkpoints with LoRA and (manifold-constrained) hyper-connections.

MODEL is a local checkpoint folder (config.json + *.safetensors) or a hub id such as Qwen/Qwen3-0.6B.
Run 'tx COMMAND --help' for the options of each command.

On Linux (glibc) tx keeps freed memory in the process, which saves XLA:CPU re-faulting its step buffer
in every step; TX_KEEP_FREED_MEMORY=0 turns that off (see tx/host_memory.py)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def final_train_loss(history: list[dict]) -> float | None:
    """The loss of the last step that had loss tokens (a batch can hold only prompts: its loss is 0 by
    definition and says nothing about training)."""
    losses = [h["loss"] for h in history if "loss" in h and h.get("loss_tokens", 1) > 0]
    return losses[-1] if losses else None


def _model_args(p, adapter=True):
    p.add_argument("--model", required=True, metavar="MODEL", help="checkpoint folder or hub id")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the base weights and activations (default: float32); adapters stay float32. bfloat16 is "
        "the fast path on GPU/TPU and on CPUs with AMX / AVX512-BF16",
    )
    if adapter:
        p.add_argument("--adapter", metavar="DIR", help="adapter folder written by tx or PEFT")


CONNECTOR_KINDS = ["mhc", "mhc_lite", "dynamic", "static"]


def _layer_ids(text: str) -> list[int]:
    """``"0,2,4-7"`` -> ``[0, 2, 4, 5, 6, 7]``; a clear error for anything else."""
    import tx

    ids = []
    for part in text.split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()) or (dash and int(hi) < int(lo)):
            raise tx.errors.ConfigError(
                f"--connector-layers must be layer ids and ranges like 0,2,4-7, got {text!r} (bad part {part!r})"
            )
        ids += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
    return ids


def _adapter_args(p):
    g = p.add_argument_group("adapters")
    g.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r; 0 disables LoRA (default: 8)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")
    g.add_argument(
        "--targets",
        default="all-linear",
        help="'all-linear', comma-separated module names (q_proj,v_proj) or a regex on the module path",
    )
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input, in [0, 1) (default: 0)")
    g.add_argument("--use-rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    g.add_argument(
        "--expansion-rate",
        type=int,
        default=None,
        help="connector streams n; 1 with --fracs 1 = no connector (default: 4, or the checkpoint's hc_mult where "
        "its blocks carry their own hyper-connections, as DeepSeek-V4's: they then train, or stay frozen with "
        "--no-train-connector or --expansion-rate 1)",
    )
    g.add_argument(
        "--kind",
        default="mhc",
        choices=CONNECTOR_KINDS,
        help="connector kind (default: mhc); mhc_lite mixes the n! permutation matrices (n <= 5)",
    )
    g.add_argument(
        "--fracs",
        type=int,
        default=1,
        help="frac-connections: split each stream's hidden size into m fractions (kinds static, dynamic; default: 1)",
    )
    g.add_argument(
        "--connector-layers",
        default=None,
        metavar="IDS",
        help="layers that get the connector, e.g. 0,2,4-7 (default: all); the others carry the streams unchanged",
    )
    g.add_argument("--no-train-connector", action="store_true", help="freeze the connector (trainable=False)")


def _data_args(p, eval_data: bool):
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="data file, folder, save_to_disk folder or hub dataset id")
    g.add_argument("--split", default="train", help="split of --data to use (default: train)")
    if eval_data:
        g.add_argument("--eval-data", help="evaluation data (same kinds as --data)")
        g.add_argument("--eval-split", help="split for eval: of --eval-data if given, else of --data (e.g. test)")
        g.add_argument("--eval-fraction", type=float, default=0.0, help="carve this fraction out of --data for eval")
    g.add_argument(
        "--columns",
        metavar="NAME=COLUMN,...",
        help="map other column names onto tx's, e.g. prompt=question,completion=answer",
    )
    g.add_argument(
        "--data-cache", metavar="DIR", help="token cache folder (default: $TX_DATA_CACHE or ~/.cache/tx/tokens)"
    )


def _sources(args, check_paths: bool = True):
    """The train and eval :class:`tx.train.data.Source` of the data flags (eval None when not asked for);
    ``check_paths``: a missing local path is an error now, before the model loads."""
    import tx
    from tx.train.data import Source
    from tx.train.readers import looks_like_hub_id
    from tx.train.schemas import parse_columns

    columns = parse_columns(args.columns)
    eval_data, eval_split = getattr(args, "eval_data", None), getattr(args, "eval_split", None)
    if getattr(args, "eval_fraction", 0) and (eval_data or eval_split):
        flag = "--eval-data" if eval_data else "--eval-split"
        raise tx.errors.ConfigError(f"{flag} and --eval-fraction conflict: give one of them")
    for path in filter(None, (args.data, eval_data)) if check_paths else ():
        if not Path(path).exists() and not looks_like_hub_id(str(path)):
            raise tx.errors.ConfigError(f"data file {path} does not exist")
    train = Source(args.data, args.split, columns, args.data_cache)
    evaluation = None
    if eval_data or eval_split:
        evaluation = Source(eval_data or args.data, eval_split or "train", columns, args.data_cache)
    return train, evaluation


def build_parser() -> argparse.ArgumentParser:
    from tx import __version__

    ap = _Parser(prog="tx", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"tx {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser(
        "demo",
        help="offline end-to-end run on the embedded default model",
        description="Load the embedded tiny model (or --model), attach mHC + LoRA, verify identity, "
        "fine-tune on a synthetic chat task, show eval loss and samples before/after, save the adapter, "
        "reload it and check the logits, and plot the loss curve.",
    )
    p.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the embedded demo model)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 600)")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument(
        "--expansion-rate",
        type=int,
        default=None,
        help="connector streams n; 1 = LoRA only (default: 4, or the checkpoint's own hc_mult)",
    )
    p.add_argument("--kind", default="mhc", choices=CONNECTOR_KINDS)

    p = sub.add_parser(
        "verify",
        help="check that adapters are a no-op at init",
        description="Attach adapters and compare logits with adapters disabled vs enabled. "
        "Exits 1 when the difference exceeds the tolerance.",
    )
    _model_args(p, adapter=False)
    _adapter_args(p)
    p.add_argument("--text", default="The quick brown fox jumps over the lazy dog.", help="text to run")
    p.add_argument("--tolerance", type=float, default=None, help="relative tolerance (default: 1e-6 fp32, 5e-2 bf16)")

    p = sub.add_parser(
        "finetune",
        help="train adapters on your data",
        description="Train LoRA and/or connector adapters. Data: JSONL, JSON, CSV, parquet or Arrow files, a "
        "datasets save_to_disk folder, a folder of such files, or a hub dataset id; rows in the text, messages, "
        "ShareGPT (conversations), Alpaca (instruction/input/output) or prompt/completion schema (loss on the "
        "replies / completions only). Tokens are cached on disk ($TX_DATA_CACHE, default ~/.cache/tx/tokens).",
    )
    _model_args(p, adapter=False)
    _data_args(p, eval_data=True)
    _adapter_args(p)
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--seq-len", type=int, default=512)
    t.add_argument("--lr", type=float, default=2e-4, help="peak learning rate of LoRA (default: 2e-4)")
    t.add_argument(
        "--connector-lr", type=float, default=None, help="peak learning rate of the connector (default: --lr)"
    )
    t.add_argument("--schedule", default="cosine", choices=["cosine", "constant"])
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (batch-size must divide)")
    t.add_argument("--remat", action="store_true", help="gradient checkpointing of each layer")
    t.add_argument(
        "--no-scan-layers",
        dest="scan_layers",
        action="store_false",
        help="unroll the layers instead of jax.lax.scan: slower to compile, faster steps on CPU",
    )
    t.add_argument("--pad", action="store_true", help="one document per row, padded (default: packed)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--eval-every", type=int, default=0)
    t.add_argument("--save-every", type=int, default=0)
    t.add_argument(
        "--mesh",
        default=None,
        help="device mesh, e.g. fsdp=4,tp=2 or fsdp=2,expert=4 (axes fsdp, tp, expert; also named data, model, ep; "
        "default: one device)",
    )
    d = p.add_argument_group("several hosts (run the same command on every host; see README)")
    d.add_argument("--distributed", action="store_true", help="join the other processes (jax.distributed.initialize)")
    d.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0 (implies --distributed)")
    d.add_argument("--num-processes", type=int, help="number of processes (with --coordinator)")
    d.add_argument("--process-id", type=int, help="this process, 0 .. num-processes - 1 (with --coordinator)")
    t.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, adapter/")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace what --out holds")

    p = sub.add_parser("generate", help="generate text", description="Generate a continuation of --prompt.")
    _model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message of the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("eval", help="mean token loss on data", description="Mean token loss on --data.")
    _model_args(p)
    _data_args(p, eval_data=False)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)

    p = sub.add_parser(
        "merge",
        help="fold LoRA into the base and save a HF checkpoint",
        description="Fold a LoRA adapter into the base weights and save a Hugging Face checkpoint "
        "that transformers loads. Adapters with a connector cannot be merged (it changes the "
        "architecture).",
    )
    _model_args(p)
    p.add_argument("--out", required=True)
    return ap


def _configs(args):
    import tx

    if args.lora_rank < 0:
        raise tx.errors.ConfigError(f"--lora-rank must be >= 0, got {args.lora_rank}")
    rate = 4 if args.expansion_rate is None else args.expansion_rate
    if rate < 1:
        raise tx.errors.ConfigError(f"--expansion-rate must be >= 1, got {rate}")
    lora = None
    if args.lora_rank > 0:
        targets = args.targets
        if targets != "all-linear" and "," in targets or targets.isidentifier():
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank
        lora = tx.LoRAConfig(
            rank=args.lora_rank, alpha=alpha, targets=targets, dropout=args.lora_dropout, use_rslora=args.use_rslora
        )
    if args.fracs < 1:
        raise tx.errors.ConfigError(f"--fracs must be >= 1, got {args.fracs}")
    conn = None
    if rate > 1 or args.fracs > 1:
        conn = tx.ConnectorConfig(
            expansion_rate=rate,
            kind=args.kind,
            trainable=not args.no_train_connector,
            fracs=args.fracs,
            layers=None if args.connector_layers is None else _layer_ids(args.connector_layers),
        )
    elif args.connector_layers is not None:
        raise tx.errors.ConfigError("--connector-layers needs a connector: set --expansion-rate > 1 or --fracs > 1")
    return lora, conn


def _native_rate(conn, args, model):
    """``conn`` with the checkpoint's own stream count where its blocks carry hyper-connections (DeepSeek-V4's
    hc_mult) and --expansion-rate was not given."""
    hyper = model.config.hyper
    if conn is None or args.expansion_rate is not None or hyper is None:
        return conn
    return dataclasses.replace(conn, expansion_rate=hyper.n)


def _load(args):
    import tx

    model = tx.load_model(args.model, dtype=args.dtype)
    if getattr(args, "adapter", None):
        tx.load_adapter(model, args.adapter)
    return model


def cmd_verify(args) -> int:
    import tx

    lora, conn = _configs(args)
    if args.tolerance is not None and args.tolerance <= 0:
        raise tx.errors.ConfigError(f"--tolerance must be > 0, got {args.tolerance}")
    model = tx.load_model(args.model, dtype=args.dtype)
    conn = _native_rate(conn, args, model)
    if lora or conn:
        tx.attach(model, lora=lora, connector=conn)
    tok = tx.load_tokenizer(args.model)
    ids = tok.encode(args.text).ids
    report = tx.verify_identity(model, [ids], tolerance=args.tolerance)
    print(f"model: {args.model} ({model.config.architecture}, {model.config.num_layers} layers)")
    print(
        f"adapters: lora={'rank ' + str(lora.rank) if lora else 'none'}, "
        f"connector={conn.describe() if conn else 'none'}"
    )
    print(tx.trainable_parameters(model))
    print(report)
    return 0 if report.passed else 1


def cmd_finetune(args) -> int:
    import tx
    from tx.sharding import make_mesh

    lora, conn = _configs(args)
    if lora is None and (conn is None or not conn.trainable):
        raise tx.errors.ConfigError(
            "nothing to train: set --lora-rank > 0 or a trainable connector (--expansion-rate > 1 or --fracs > 1)"
        )
    train_data, eval_data = _sources(args)
    if args.distributed or args.coordinator or args.num_processes is not None or args.process_id is not None:
        from tx.multihost import initialize

        initialize(args.coordinator, args.num_processes, args.process_id)  # before anything uses a device
    mesh = make_mesh(args.mesh) if args.mesh else None
    cfg = tx.TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        connector_lr=args.connector_lr,
        schedule=args.schedule,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        grad_accum=args.grad_accum,
        remat=args.remat,
        scan_layers=args.scan_layers,
        seed=args.seed,
        pack="pad" if args.pad else "pack",
        eval_fraction=args.eval_fraction,
        eval_every=args.eval_every,
        save_every=args.save_every,
        out=args.out,
        resume=args.resume,
        overwrite=args.overwrite,
    )
    model = tx.load_model(args.model, dtype=args.dtype, mesh=mesh)  # first: a folder without config.json says so
    tok = tx.load_tokenizer(args.model)
    conn = _native_rate(conn, args, model)
    tx.attach(model, lora=lora, connector=conn)
    print(tx.trainable_parameters(model))
    result = tx.Trainer(model, cfg, mesh=mesh).fit(train_data, eval_data, tokenizer=tok)
    final = final_train_loss(result["history"])
    if final is not None:
        print(f"final train loss {final:.4f}")
    if "eval_loss" in result:
        print(f"eval loss {result['eval_loss']:.4f}")
    print(f"adapter saved to {Path(args.out) / 'adapter'}; metrics in {Path(args.out) / 'metrics.jsonl'}")
    return 0


def cmd_generate(args) -> int:
    import tx

    model = _load(args)
    tok = tx.load_tokenizer(args.model)
    print(
        tx.generate(
            model, tok, args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed, chat=args.chat
        )
    )
    return 0


def cmd_eval(args) -> int:
    import tx
    from tx.train.data import Dataset

    source, _ = _sources(args, check_paths=False)
    model = _load(args)
    tok = tx.load_tokenizer(args.model)
    data = Dataset(
        source,
        tok,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        shuffle=False,
        max_positions=model.config.max_positions,
        vocab_size=model.config.vocab_size,
    )
    from tx.train.evaluate import eval_loss

    loss = eval_loss(model, data)
    print(json.dumps({"eval_loss": loss, "tokens": data.num_loss_tokens}))
    return 0


def cmd_merge(args) -> int:
    import tx

    model = _load(args)
    if not args.adapter:
        raise tx.errors.ConfigError("merge needs --adapter DIR (the LoRA adapter to fold in)")
    tx.merge_lora(model)
    tx.save_model(model, args.out)
    print(f"merged checkpoint written to {args.out}")
    return 0


def cmd_demo(args) -> int:
    from tx.demo import run_demo

    return run_demo(
        model=args.model, steps=args.steps, out=args.out, expansion_rate=args.expansion_rate, kind=args.kind
    )


COMMANDS = {
    "demo": cmd_demo,
    "verify": cmd_verify,
    "finetune": cmd_finetune,
    "generate": cmd_generate,
    "eval": cmd_eval,
    "merge": cmd_merge,
}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    from tx.errors import TxError
    from tx.host_memory import keep_freed_memory

    keep_freed_memory()  # before JAX starts its threads
    try:
        return COMMANDS[args.command](args)
    except TxError as exc:
        print(f"tx {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tx {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
