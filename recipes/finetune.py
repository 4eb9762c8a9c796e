"""Fine-tune a checkpoint with LoRA + mHC on your JSONL data. Copy this file and edit the settings below.

    python recipes/finetune.py                      # runs on the embedded demo model and a synthetic task
    python recipes/finetune.py --model Qwen/Qwen3-0.6B --data train.jsonl --eval-data eval.jsonl --out runs/mine

Data lines are {"text": ...} or {"messages": [{"role": ..., "content": ...}, ...]} (loss on assistant tokens).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import tx
from tx.demo import DEMO_MODEL
from tx.demo_tasks import make_task_split, write_jsonl

# ---- settings worth editing ------------------------------------------------------------------------------------
LORA = tx.LoRAConfig(rank=16, alpha=32, targets="all-linear")  # or targets=["q_proj", "v_proj"], or a regex
CONNECTOR = tx.ConnectorConfig(expansion_rate=4, kind="mhc", trainable=True)  # expansion_rate=1: LoRA only
TRAIN = dict(
    steps=200,
    batch_size=16,
    seq_len=64,
    lr=2e-3,
    connector_lr=2e-3,
    warmup_steps=20,
    schedule="cosine",
    eval_every=50,
    save_every=50,
    grad_clip=1.0,
)
# -----------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEMO_MODEL))
    ap.add_argument("--data", default=None, help="train JSONL (default: a synthetic 'reverse the words' task)")
    ap.add_argument("--eval-data", default=None)
    ap.add_argument("--out", default="runs/recipe-finetune")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()

    if args.data is None:
        train, evals = make_task_split(2000, 64, task="reverse")
        args.data = str(write_jsonl(train, Path(args.out) / "data" / "train.jsonl"))
        args.eval_data = str(write_jsonl(evals, Path(args.out) / "data" / "eval.jsonl"))

    tokenizer = tx.load_tokenizer(args.model)
    model = tx.load_model(args.model, dtype=args.dtype)
    tx.attach(model, lora=LORA, connector=CONNECTOR if CONNECTOR.expansion_rate > 1 else None)
    print(tx.trainable_parameters(model))
    probe = tokenizer.encode("def main():").ids
    print(tx.verify_identity(model, [probe]))

    config = tx.TrainConfig(**TRAIN, out=args.out, resume=args.resume, overwrite=not args.resume)
    result = tx.Trainer(model, config).fit(args.data, args.eval_data, tokenizer=tokenizer)
    print(f"eval loss: {result.get('eval_loss')}")
    print(f"adapter: {Path(args.out) / 'adapter'} (loads with tx.load_adapter or peft.PeftModel.from_pretrained)")


if __name__ == "__main__":
    main()
