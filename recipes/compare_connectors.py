"""LoRA alone vs LoRA + each connector kind, on the same data, budget and seed.

Prints a table of eval losses (before, after, best) and train time per configuration, and writes a
PNG of the loss curves. Default: the embedded demo model on a synthetic chat task, a few minutes per run
on 2 CPU cores.

    python recipes/compare_connectors.py [--steps 150] [--expansion-rate 4] [--model DIR] [--out runs/compare]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import tx
from tx.demo import DEMO_MODEL
from tx.demo_tasks import make_task_split
from tx.train.data import Dataset
from tx.train.evaluate import eval_loss


def run(name, model_path, connector, tokenizer, train_records, eval_records, args):
    model = tx.load_model(model_path)
    tx.attach(model, lora=tx.LoRAConfig(rank=args.rank, alpha=2 * args.rank), connector=connector)
    cfg = model.config
    common = dict(seq_len=args.seq_len, max_positions=cfg.max_positions, vocab_size=cfg.vocab_size)
    train = Dataset(train_records, tokenizer, batch_size=args.batch_size, seed=args.seed, **common)
    evals = Dataset(eval_records, tokenizer, batch_size=args.batch_size, shuffle=False, **common)
    before = eval_loss(model, evals)
    config = tx.TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup_steps=args.steps // 10,
        eval_every=max(args.steps // 10, 1),
        seed=args.seed,
        out=str(Path(args.out) / name),
        overwrite=True,
        log_every=5,
        progress=False,
    )
    t = time.perf_counter()
    result = tx.Trainer(model, config).fit(train, evals)
    seconds = time.perf_counter() - t
    evals_hist = [(h["step"], h["eval_loss"]) for h in result["history"] if "eval_loss" in h]
    train_hist = [(h["step"], h["loss"]) for h in result["history"] if "loss" in h]
    return {
        "name": name,
        "before": before,
        "after": result["eval_loss"],
        "best": min(v for _, v in evals_hist),
        "seconds": seconds,
        "eval_curve": evals_hist,
        "train_curve": train_hist,
        "trainable": tx.trainable_parameters(model).trainable,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEMO_MODEL))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--expansion-rate", type=int, default=4)
    ap.add_argument("--kinds", default="static,dynamic,mhc")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--task", default="mix", help="demo task: reverse, sort or mix")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/compare")
    args = ap.parse_args()

    tokenizer = tx.load_tokenizer(args.model)
    train_records, eval_records = make_task_split(2000, 96, seed=args.seed, task=args.task)
    configs = [("lora", None)] + [
        (f"lora+{k}{args.expansion_rate}", tx.ConnectorConfig(expansion_rate=args.expansion_rate, kind=k))
        for k in args.kinds.split(",")
    ]
    rows = []
    for name, conn in configs:
        print(f"== {name}", flush=True)
        rows.append(run(name, args.model, conn, tokenizer, train_records, eval_records, args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"\n{'config':<16}{'trainable':>12}{'eval before':>13}{'eval after':>12}{'best':>9}{'time (s)':>10}")
    for r in rows:
        print(
            f"{r['name']:<16}{r['trainable']:>12,}{r['before']:>13.4f}{r['after']:>12.4f}{r['best']:>9.4f}"
            f"{r['seconds']:>10.1f}"
        )
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'tx-adapters[plot]')")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        axes[0].plot(*zip(*r["train_curve"]), label=r["name"], alpha=0.8)
        axes[1].plot(*zip(*r["eval_curve"]), "o-", label=r["name"])
    for ax, title in zip(axes, ("train loss", "eval loss")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=100)
    print(f"plot: {out / 'compare.png'}; table: {out / 'compare.json'}")


if __name__ == "__main__":
    main()
