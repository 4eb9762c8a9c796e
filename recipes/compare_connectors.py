"""LoRA alone vs LoRA + connectors (mhc, mhc_lite, frac-connections, ...), several seeds, same data and budget.

For every configuration and seed: the same training batches (a pure function of the seed and the step), the
same number of steps, eval loss at fixed steps. Reported per configuration, as mean and spread (min..max and
standard deviation) over the seeds:

- eval loss after the same number of steps;
- eval loss after the same wall-clock training time: the budget is the fastest configuration's mean training
  time, and each run's eval curve is interpolated linearly in time at it. Training time is the sum of the
  step times (host-synchronised, eval excluded); step 0 compiles, so it is counted as the run's median step.

Writes ``compare.json`` (every run, every point) and ``compare.png`` (eval loss against step and against time:
seed mean, min..max band). Default: the embedded demo model on its synthetic chat task. ``--small`` is a quick
CPU run (about ten minutes on 2 cores for the four default configurations x 3 seeds).

    python recipes/compare_connectors.py [--small] [--configs lora,mhc,mhc_lite,fracs] [--seeds 0,1,2]
        [--steps 150] [--expansion-rate 4] [--fracs 4] [--model DIR] [--out runs/compare]

On a DeepSeek-V4 checkpoint (``recipes/tiny_deepseek_v4.py`` writes a tiny one), ``--configs lora,native``
compares LoRA alone (the checkpoint's hyper-connections frozen) with LoRA + those hyper-connections trained.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

import tx
from tx import hub
from tx.demo import DEMO_MODEL
from tx.demo_tasks import make_task_split
from tx.models.config import load_config
from tx.train.data import Dataset
from tx.train.evaluate import eval_loss


def connector_for(name: str, args) -> tx.ConnectorConfig | None:
    """``lora`` (none), a kind name (``mhc``, ``mhc_lite``, ``dynamic``, ``static``: n = --expansion-rate),
    ``fracs`` (frac-connections: dynamic, n = --fracs-streams, m = --fracs) or ``native`` (a checkpoint's own
    hyper-connections trained, DeepSeek-V4's; with ``lora`` they stay frozen)."""
    if name == "lora":
        return None
    if name == "native":
        hyper = load_config(hub.resolve(args.model)).hyper
        if hyper is None:
            raise SystemExit(f"--configs native: {args.model} has no hyper-connections of its own (DeepSeek-V4 has)")
        return tx.ConnectorConfig(expansion_rate=hyper.n, trainable=True)
    if name == "fracs":
        return tx.ConnectorConfig(expansion_rate=args.fracs_streams, kind="dynamic", fracs=args.fracs)
    return tx.ConnectorConfig(expansion_rate=args.expansion_rate, kind=name)


def run(name, connector, seed, tokenizer, train_records, eval_records, args) -> dict:
    model = tx.load_model(args.model)
    lora = tx.LoRAConfig(rank=args.rank, alpha=2 * args.rank, seed=seed)
    tx.attach(model, lora=lora, connector=connector, seed=seed)
    cfg = model.config
    common = dict(seq_len=args.seq_len, max_positions=cfg.max_positions, vocab_size=cfg.vocab_size)
    train = Dataset(train_records, tokenizer, batch_size=args.batch_size, seed=seed, **common)
    evals = Dataset(eval_records, tokenizer, batch_size=args.batch_size, shuffle=False, **common)
    config = tx.TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        connector_lr=args.connector_lr,
        warmup_steps=args.steps // 10,
        seed=seed,
        progress=False,
    )
    trainer = tx.Trainer(model, config)
    every = max(args.steps // args.evals, 1)
    evals_at = [(0, eval_loss(model, evals, args.eval_batches))]
    step_seconds, losses = [], []
    for step in range(args.steps):
        t = time.perf_counter()
        losses.append(float(trainer.step(train.batch(step))["loss"]))  # float(): waits for the step
        step_seconds.append(time.perf_counter() - t)
        if (step + 1) % every == 0 or step + 1 == args.steps:
            evals_at.append((step + 1, eval_loss(model, evals, args.eval_batches)))
    compile_seconds = step_seconds[0]
    if len(step_seconds) > 1:
        step_seconds[0] = statistics.median(step_seconds[1:])
    elapsed = np.concatenate([[0.0], np.cumsum(step_seconds)])
    return {
        "name": name,
        "seed": seed,
        "connector": connector.describe() if connector else "none",
        "trainable": tx.trainable_parameters(model).trainable,
        "eval": [{"step": s, "seconds": float(elapsed[s]), "loss": v} for s, v in evals_at],
        "train_loss": losses,
        "train_seconds": float(elapsed[-1]),
        "step_seconds": statistics.median(step_seconds),
        "compile_seconds": compile_seconds,
    }


def loss_at_time(run: dict, seconds: float) -> float:
    """The run's eval loss at ``seconds`` of training, interpolated linearly between its eval points."""
    times = [p["seconds"] for p in run["eval"]]
    values = [p["loss"] for p in run["eval"]]
    return float(np.interp(seconds, times, values))


def summarise(runs: list[dict]) -> tuple[list[dict], float]:
    """One row per configuration: mean / std / min / max over seeds, after the same steps and the same time."""
    names = list(dict.fromkeys(r["name"] for r in runs))
    by = {n: [r for r in runs if r["name"] == n] for n in names}
    budget = min(statistics.mean(r["train_seconds"] for r in group) for group in by.values())
    rows = []
    for name, group in by.items():
        final = [r["eval"][-1]["loss"] for r in group]
        timed = [loss_at_time(r, budget) for r in group]
        rows.append(
            {
                "name": name,
                "connector": group[0]["connector"],
                "seeds": [r["seed"] for r in group],
                "trainable": group[0]["trainable"],
                "steps_mean": statistics.mean(final),
                "steps_std": statistics.pstdev(final),
                "steps_min": min(final),
                "steps_max": max(final),
                "time_mean": statistics.mean(timed),
                "time_std": statistics.pstdev(timed),
                "time_min": min(timed),
                "time_max": max(timed),
                "step_ms": 1e3 * statistics.mean(r["step_seconds"] for r in group),
                "before": statistics.mean(r["eval"][0]["loss"] for r in group),
            }
        )
    return rows, budget


def table(rows: list[dict], budget: float, steps: int) -> str:
    head = (
        f"{'config':<10}{'connector':<24}{'trainable':>10}{'step ms':>9}{'eval @0':>9}"
        f"{f'eval @{steps} steps (mean ± std, min..max)':>44}{f'eval @{budget:.1f} s (mean ± std, min..max)':>44}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['name']:<10}{r['connector']:<24}{r['trainable']:>10,}{r['step_ms']:>9.1f}{r['before']:>9.4f}"
            f"{r['steps_mean']:>17.4f} ± {r['steps_std']:.4f} ({r['steps_min']:.4f}..{r['steps_max']:.4f})"
            f"{r['time_mean']:>17.4f} ± {r['time_std']:.4f} ({r['time_min']:.4f}..{r['time_max']:.4f})"
        )
    return "\n".join(lines)


def plot(runs: list[dict], budget: float, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'tx-adapters[plot]')")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r["name"] for r in runs):
        group = [r for r in runs if r["name"] == name]
        steps = [p["step"] for p in group[0]["eval"]]
        by_step = np.array([[p["loss"] for p in r["eval"]] for r in group])
        (line,) = axes[0].plot(steps, by_step.mean(0), "o-", label=f"{name} ({len(group)} seeds)")
        axes[0].fill_between(steps, by_step.min(0), by_step.max(0), color=line.get_color(), alpha=0.2)
        grid = np.linspace(0.0, max(r["train_seconds"] for r in group), 50)
        by_time = np.array([[loss_at_time(r, t) for t in grid] for r in group])
        axes[1].plot(grid, by_time.mean(0), color=line.get_color(), label=name)
        axes[1].fill_between(grid, by_time.min(0), by_time.max(0), color=line.get_color(), alpha=0.2)
    axes[1].axvline(budget, color="gray", ls="--", lw=1, label=f"same time: {budget:.1f} s")
    for ax, xlabel in zip(axes, ("step", "training time (s, compile excluded)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("eval loss")
        ax.legend()
    axes[0].set_title("eval loss after the same steps (mean, min..max over seeds)")
    axes[1].set_title("eval loss after the same wall-clock time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEMO_MODEL))
    ap.add_argument(
        "--configs", default="lora,mhc,mhc_lite,fracs", help="lora, a connector kind, fracs, or native (DeepSeek-V4)"
    )
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--evals", type=int, default=10, help="eval points after step 0")
    ap.add_argument("--eval-batches", type=int, default=None, help="limit each eval to this many batches")
    ap.add_argument("--expansion-rate", type=int, default=4, help="n of the connector kinds")
    ap.add_argument("--fracs", type=int, default=4, help="m of the fracs configuration")
    ap.add_argument("--fracs-streams", type=int, default=1, help="n of the fracs configuration")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--connector-lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--task", default="mix", help="demo task: reverse, sort or mix")
    ap.add_argument("--small", action="store_true", help="quick CPU run: defaults of 40 steps, batch 8, 4 evals")
    ap.add_argument("--out", default="runs/compare")
    if ap.parse_known_args(argv)[0].small:  # new defaults; flags given explicitly still win
        ap.set_defaults(steps=40, batch_size=8, evals=4, records=400, eval_batches=4)
    args = ap.parse_args(argv)

    tokenizer = tx.load_tokenizer(args.model)
    train_records, eval_records = make_task_split(args.records, 96, seed=0, task=args.task)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    connectors = {name: connector_for(name, args) for name in names}  # bad names fail before any training
    runs = []
    for name in names:
        for seed in seeds:
            print(f"== {name} seed {seed}", flush=True)
            runs.append(run(name, connectors[name], seed, tokenizer, train_records, eval_records, args))
    rows, budget = summarise(runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = table(rows, budget, args.steps)
    print("\n" + text)
    (out / "compare.json").write_text(json.dumps({"summary": rows, "budget_seconds": budget, "runs": runs}, indent=2))
    (out / "compare.txt").write_text(text + "\n")
    if plot(runs, budget, out / "compare.png"):
        print(f"plot: {out / 'compare.png'}")
    print(f"table: {out / 'compare.txt'}; every run: {out / 'compare.json'}")


if __name__ == "__main__":
    main()
