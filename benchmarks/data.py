"""Data benchmark: records/s tokenised and peak host memory for synthetic chat records (200k, about 100 MB of
JSONL by default), tx's first run (tokenise into the on-disk cache) and cached run, against the in-memory path
tx had before the cache (b4597dc's tx/train/data.py, read from git) and against ``datasets`` (load_dataset +
``map(apply_chat_template)`` with a transformers tokenizer; its own Arrow cache makes its second run a cache hit).

Each case runs in a fresh subprocess so that peak memory (VmHWM) is its own. Prints one JSON object.
Usage: python benchmarks/data.py [--records 200000] [--tokenizer tx/assets/demo-base] [--skip-old --skip-datasets]

``seconds_tokenise`` is reading + tokenising (for the old path, which has no separate step, the whole
Dataset); ``seconds_total`` adds laying out packed rows and the first batch. tx builds the Dataset the trainer
trains on (read, validate, render each chat with the template, find the reply spans, tokenise with
``encode_batch``, lay out packed rows of ``--seq-len``); ``datasets`` renders and tokenises only (no loss mask,
no packing), so it does less work per record.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there one all we their can has more when will would if no out so what up about into than "
    "them some could time these two may first then do any like now over such our even most made after also did "
    "many before must through years where much your way well down should because each just those people how too"
).split()

CHILD = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")

def hwm_mb():  # peak resident set of this process
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

kind, data, tok_dir, cache, seq_len, old_module = sys.argv[1:7]
seq_len = int(seq_len)
rss0 = hwm_mb()
if kind in ("tx_first", "tx_cached"):
    import os
    os.environ["TX_DATA_CACHE"] = cache
    from tx.tokenizer import load_tokenizer
    from tx.train.data import Dataset, tokens
    tok = load_tokenizer(tok_dir)
    rss0 = hwm_mb()
    t = time.perf_counter()
    store = tokens(data, tok)
    t_tok = time.perf_counter() - t
    ds = Dataset(store, tok, seq_len=seq_len, batch_size=8)
    batch = ds.batch(0)
    total = time.perf_counter() - t
    out = {"records": store.num_documents, "tokens": int(store.offsets[-1]), "rows": ds.num_rows}
elif kind == "tx_old_in_memory":
    import importlib.util
    from tx.tokenizer import load_tokenizer
    spec = importlib.util.spec_from_file_location("old_data", old_module)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    tok = load_tokenizer(tok_dir)
    rss0 = hwm_mb()
    t = time.perf_counter()
    ds = old.Dataset(data, tok, seq_len=seq_len, batch_size=8)  # read, tokenise in memory, lay out: one step
    batch = ds.batch(0)
    t_tok = total = time.perf_counter() - t
    out = {"records": ds.num_documents, "tokens": None, "rows": ds.num_rows}
else:  # datasets_first / datasets_cached
    import os
    os.environ["HF_DATASETS_CACHE"] = cache
    import datasets
    from transformers import AutoTokenizer
    datasets.disable_progress_bars()
    hf = AutoTokenizer.from_pretrained(tok_dir)
    rss0 = hwm_mb()
    t = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=data, split="train", cache_dir=cache)
    def fn(batch):
        return {"input_ids": hf.apply_chat_template(batch["messages"], tokenize=True, return_dict=False)}
    ds = ds.map(fn, batched=True, remove_columns=ds.column_names)
    t_tok = time.perf_counter() - t
    total = t_tok
    out = {"records": len(ds), "tokens": None, "rows": None}
out.update(seconds_tokenise=t_tok, seconds_total=total, records_per_s=out["records"] / t_tok,
           peak_rss_mb=hwm_mb(), rss_before_mb=rss0)
print(json.dumps(out))
"""


def make_records(path: Path, n: int, seed: int = 0) -> None:
    """``n`` chats (system, user, assistant, user, assistant) of random words, ~500 bytes each."""
    rng = random.Random(seed)

    def words(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    with path.open("w") as f:
        for i in range(n):
            messages = [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"Question {i}: {words(rng.randint(8, 24))}?"},
                {"role": "assistant", "content": words(rng.randint(15, 40)) + "."},
                {"role": "user", "content": words(rng.randint(4, 12)) + "?"},
                {"role": "assistant", "content": words(rng.randint(10, 30)) + "."},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")


def run(kind, data, tok, cache, seq_len, old_module):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(data), str(tok), str(cache), str(seq_len), str(old_module)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--tokenizer", default=str(ROOT / "tx" / "assets" / "demo-base"))
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--skip-old", action="store_true")
    ap.add_argument("--skip-datasets", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "chats.jsonl"
        t = time.perf_counter()
        make_records(data, args.records)
        result = {
            "records": args.records,
            "data_mb": data.stat().st_size / 1e6,
            "seconds_to_write_data": time.perf_counter() - t,
            "tokenizer": args.tokenizer,
            "seq_len": args.seq_len,
            "cpu": _cpu(),
            "cores": os.cpu_count(),
            "load_average_at_start": os.getloadavg()[0],
        }
        old_module = tmp / "old_data.py"
        if not args.skip_old:
            show = subprocess.run(
                ["git", "-C", str(ROOT), "show", "b4597dc:tx/train/data.py"], capture_output=True, text=True
            )
            if show.returncode == 0:
                old_module.write_text(show.stdout)
        cases = ["tx_first", "tx_cached"]
        if not args.skip_old and old_module.exists():
            cases.append("tx_old_in_memory")
        if not args.skip_datasets:
            cases += ["datasets_first", "datasets_cached"]
        for kind in cases:
            cache = tmp / ("tx-cache" if kind.startswith("tx") else "hf-cache")
            result[kind] = run(kind, data, args.tokenizer, cache, args.seq_len, old_module)
            print(kind, json.dumps(result[kind]), file=sys.stderr, flush=True)
    print(json.dumps(result, indent=1))


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
