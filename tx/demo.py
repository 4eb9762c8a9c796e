"""The README's first command: an offline end-to-end run on the embedded default model.

Load the embedded tiny Qwen3-architecture model (pretrained by ``recipes/build_demo_base.py`` on Python
standard-library source), attach mHC + LoRA, verify that the adapted model is a no-op at init, fine-tune
it on a synthetic chat task it cannot do before ("reverse: a b c" -> "c b a"), show eval loss and samples
before and after, save the adapter, load it into a fresh model and check the logits, and plot the loss.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from tx.safetensors_io import atomic_write_bytes

DEMO_MODEL = Path(__file__).parent / "assets" / "demo-base"


def _plot(history, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (pip install 'tx-adapters[plot]'): no plot written"
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss", alpha=0.7)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("tx demo: LoRA + mHC fine-tuning")
    ax.legend()
    fig.tight_layout()
    atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return f"loss plot written to {path}"


def run_demo(model=None, steps=None, out="runs/demo", expansion_rate=None, kind="mhc", task="reverse") -> int:
    """The demo on ``model`` (default: the embedded one). ``expansion_rate`` None: 4, or the checkpoint's own
    hc_mult where its blocks carry hyper-connections (DeepSeek-V4: they train); 1: LoRA alone."""
    import tx
    from tx.demo_tasks import make_task_split, write_jsonl
    from tx.train.data import Dataset
    from tx.train.evaluate import eval_loss

    t_start = time.perf_counter()
    source = model or DEMO_MODEL
    steps = 600 if steps is None else steps
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"== tx demo: {source if model else 'embedded default model ' + str(DEMO_MODEL.name)}")
    tok = tx.load_tokenizer(source)
    net = tx.load_model(source)
    cfg = net.config
    print(f"   {cfg.architecture}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}")

    train_records, eval_records = make_task_split(2000, 64, seed=0, task=task)
    write_jsonl(train_records, out / "data" / "train.jsonl")
    write_jsonl(eval_records, out / "data" / "eval.jsonl")
    print(f"   task {task!r}: {len(train_records)} train / {len(eval_records)} eval chats, e.g.")
    print(
        f"     user: {eval_records[0]['messages'][0]['content']!r} -> assistant: "
        f"{eval_records[0]['messages'][1]['content']!r}"
    )

    if expansion_rate is None:
        expansion_rate = cfg.hyper.n if cfg.hyper is not None else 4
    lora = tx.LoRAConfig(rank=8, alpha=16)
    conn = tx.ConnectorConfig(expansion_rate=expansion_rate, kind=kind) if expansion_rate > 1 else None
    tx.attach(net, lora=lora, connector=conn)
    print(f"\n== attach LoRA r=8 + connector {kind} n={expansion_rate}")
    print(f"   {tx.trainable_parameters(net)}")

    probe = tok.encode(tok.apply_chat_template(eval_records[0]["messages"])).ids
    report = tx.verify_identity(net, [probe])
    print(f"\n== verify identity at init\n   {report}")
    if not report.passed:
        return 1

    seq_len, batch = 64, 16
    common = dict(seq_len=seq_len, max_positions=cfg.max_positions, vocab_size=cfg.vocab_size)
    train_ds = Dataset(out / "data" / "train.jsonl", tok, batch_size=batch, seed=0, **common)
    eval_ds = Dataset(out / "data" / "eval.jsonl", tok, batch_size=batch, shuffle=False, **common)
    prompts = [r["messages"][:1] for r in eval_records[:3]]
    answers = [r["messages"][1]["content"] for r in eval_records[:3]]

    before = eval_loss(net, eval_ds)
    samples_before = tx.generate(net, tok, prompts, max_new_tokens=16)
    print(f"\n== before fine-tuning: eval loss {before:.3f}")
    for p, s in zip(prompts, samples_before):
        print(f"   {p[0]['content']!r} -> {s!r}")

    print(f"\n== fine-tune {steps} steps (batch {batch} x {seq_len} tokens, AdamW, cosine)")
    config = tx.TrainConfig(
        steps=steps,
        batch_size=batch,
        seq_len=seq_len,
        lr=3e-3,
        connector_lr=3e-3,
        warmup_steps=min(20, steps // 10),
        eval_every=max(steps // 5, 1),
        save_every=0,
        out=str(out / "run"),
        overwrite=True,
        log_every=5,
    )
    t0 = time.perf_counter()
    result = tx.Trainer(net, config).fit(train_ds, eval_ds)
    train_s = time.perf_counter() - t0
    after = result["eval_loss"]
    samples_after = tx.generate(net, tok, prompts, max_new_tokens=16)
    correct = sum(s.strip() == a for s, a in zip(samples_after, answers))
    print(f"\n== after fine-tuning ({train_s:.0f} s): eval loss {before:.3f} -> {after:.3f}")
    for p, s, a in zip(prompts, samples_after, answers):
        print(f"   {p[0]['content']!r} -> {s!r}  {'(correct)' if s.strip() == a else '(expected ' + repr(a) + ')'}")

    adapter = out / "run" / "adapter"
    fresh = tx.load_model(source)
    tx.load_adapter(fresh, adapter)
    ids = np.asarray([probe], np.int32)
    diff = float(np.abs(np.asarray(fresh(ids)) - np.asarray(net(ids))).max())
    print(f"\n== adapter saved to {adapter} ({', '.join(sorted(p.name for p in adapter.iterdir()))})")
    print(
        f"   reloaded into a fresh model: max |logits difference| = {diff:.2e} ({'PASS' if diff <= 1e-5 else 'FAIL'})"
    )
    print(f"   {_plot(result['history'], out / 'loss.png')}")
    summary = {
        "eval_loss_before": before,
        "eval_loss_after": after,
        "samples_correct": f"{correct}/{len(prompts)}",
        "identity_max_abs_diff": report.max_abs_diff,
        "reload_max_abs_diff": diff,
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    atomic_write_bytes(out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    print(f"\n== summary ({out / 'summary.json'})\n{json.dumps(summary, indent=2)}")
    return 0 if diff <= 1e-5 and after < before else 1
