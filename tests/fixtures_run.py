"""A tiny model folder a whole run can use (checkpoint + tokenizer, same vocabulary), chat data, and subprocess helpers.

Import from a test module as ``from fixtures_run import model_folder``. The folder is built once per test session
(transformers and the BPE trainer are slow to start) and must be treated as read-only: copy it to change it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_BUILT: dict[str, Path] = {}
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]


def model_folder(tmp_path_factory, **overrides) -> Path:
    """A Qwen3 checkpoint (2 layers, hidden 40) and a ChatML tokenizer (vocab 400) in one folder, built once."""
    key = json.dumps(overrides, sort_keys=True)
    if key not in _BUILT:
        from fixtures_models import make_checkpoint
        from fixtures_tokenizer import make_chatml_tokenizer

        folder = tmp_path_factory.mktemp("model")
        make_chatml_tokenizer(folder)
        make_checkpoint("qwen3", folder, **{"vocab_size": 400, **overrides})
        _BUILT[key] = folder
    return _BUILT[key]


def chat_records(n: int = 32, seed: int = 0) -> list[dict]:
    """'reverse: a b c' -> 'c b a' chats."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = [rng.choice(WORDS) for _ in range(3)]
        user, reply = "reverse: " + " ".join(w), " ".join(w[::-1])
        out.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]})
    return out


def write_jsonl(path: Path, records) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tx_env(cache: Path | None = None) -> dict[str, str]:
    """Environment for a ``python -m tx`` subprocess: offline, tx importable, an optional persistent XLA cache.

    The cache lets every subprocess after the first skip the ~10 s compile of the train step on CPU; a cached
    executable computes exactly what a fresh compile does.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    if cache is not None:
        env.update(
            JAX_COMPILATION_CACHE_DIR=str(cache),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        )
    return env


def run_tx(*args, cache: Path | None = None, timeout: float = 300, cwd=None) -> subprocess.CompletedProcess:
    """``python -m tx ARGS`` in a subprocess; returns the completed process (text stdout/stderr)."""
    return subprocess.run(
        [sys.executable, "-m", "tx", *map(str, args)],
        capture_output=True,
        text=True,
        env=tx_env(cache),
        timeout=timeout,
        cwd=cwd or ROOT,
    )


def run_tx_batch(cases: dict, tmp: Path, timeout: float = 600) -> dict[str, subprocess.CompletedProcess]:
    """Run each ``name -> argv`` of ``cases`` as ``tx ARGV`` in ONE subprocess (tests/cli_batch.py): name -> result.

    Every command sees what ``python -m tx ARGV`` sees; the process pays JAX's import once instead of per command.
    """
    names = list(cases)
    results = Path(tmp) / "cli_batch_results.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "cli_batch.py"), str(results)],
        input=json.dumps([[str(a) for a in cases[n]] for n in names]),
        capture_output=True,
        text=True,
        env=tx_env(),
        timeout=timeout,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(results.read_text())
    return {
        n: subprocess.CompletedProcess(cases[n], r["returncode"], r["stdout"], r["stderr"]) for n, r in zip(names, out)
    }


def stub_steps(trainer):
    """Replace the compiled step by a stub that only counts: fit then writes real checkpoints of the initial state."""

    def step(batch):
        trainer.step_count += 1
        return {"loss": 1.0, "grad_norm": 0.0, "tokens": 1.0, "lr": 0.0}

    trainer.step = step
    return trainer
