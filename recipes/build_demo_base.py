"""Build the demo's base model: a tiny Qwen3 pretrained on the Python standard library, saved as an HF folder.

    .venv/bin/python recipes/build_demo_base.py --out tx/assets/demo-base --steps 1200 --minutes 15 --check-task sort

What it does, offline and on CPU:

1. Collects text every machine has: ``.py`` files of the running Python's standard library (a fixed share of
   the files, chosen by a hash of their path, is held out for evaluation), plus a few thousand short generic
   chats rendered with the ChatML template: questions about the same files' docstrings and signatures
   ("What does json.dumps do?") and "Repeat: <words>" requests. The base thus knows ``<|im_start|>`` /
   ``<|im_end|>`` and short list-shaped answers, but never sees the demo tasks of :mod:`tx.demo_tasks`
   (sorting, reversing). Minutes of CPU are far too few for in-context copying (induction heads) to
   emerge, even with the echoes; the recipe measures it (``copy_losses``) and says so.
2. Trains a byte-level BPE tokenizer (``tokenizers``) with the special tokens ``<|endoftext|>``,
   ``<|im_start|>`` and ``<|im_end|>``.
3. Pretrains a tiny Qwen3-architecture :class:`tx.models.decoder.CausalLM` (full parameters, AdamW, cosine
   schedule) on packed next-token prediction with a plain jitted jax / optax loop.
4. Writes a Hugging Face checkpoint folder (config.json, model.safetensors with HF key names, tokenizer.json,
   tokenizer_config.json with a ChatML ``chat_template``, generation_config.json), reloads it with
   :func:`tx.load_model` and checks the logits match.
5. Optionally (``--check-task sort``) fine-tunes a LoRA-like low-rank update on a demo task for a few
   hundred steps and prints eval loss and greedy answers before and after: the task must be learnable.

``--steps`` sets the length of the learning-rate schedule; ``--minutes`` stops training early if the machine
is slower than expected (the schedule is then cut short, so prefer lowering ``--steps``).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import random
import re
import sysconfig
import time
import zlib
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from tx.models.config import parse_config
from tx.models.decoder import CausalLM
from tx.models.loader import load_model, weight_plan
from tx.safetensors_io import save_tensors

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)
# Qwen2 / Qwen3's pre-tokenizer split: words with one leading non-letter, single digits, punctuation runs, spaces.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SKIPPED_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "encodings", "site-packages", "dist-packages"}
HELDOUT_PERCENT = 10


# -- 1. text ------------------------------------------------------------------------------------------------


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Python twin of :data:`CHAT_TEMPLATE` (the tests check they agree)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relative_path: str) -> bool:
    """A fixed ~10% of stdlib files (by a hash of their relative path) is never trained on."""
    return zlib.crc32(relative_path.encode()) % 100 < HELDOUT_PERCENT


def stdlib_files(*, heldout: bool = False, root: Path | None = None) -> list[Path]:
    """Sorted ``.py`` files of the standard library, without tests, data tables and third-party packages."""
    root = root or stdlib_root()
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if SKIPPED_DIRS.intersection(path.relative_to(root).parts[:-1]) or not 1_000 <= path.stat().st_size:
            continue
        if is_heldout(rel) == heldout:
            out.append(path)
    return out


def read_source(path: Path, max_chars: int) -> str:
    text = path.read_text(encoding="utf-8", errors="replace")
    return text[:max_chars]


def training_texts(max_bytes: int, seed: int, max_file_chars: int = 24_000) -> list[tuple[str, str]]:
    """(relative name, text) of training stdlib files, shuffled with ``seed``, up to ``max_bytes`` in total."""
    files = stdlib_files()
    random.Random(seed).shuffle(files)
    out, total = [], 0
    for path in files:
        text = read_source(path, max_file_chars)
        out.append((path.relative_to(stdlib_root()).as_posix(), text))
        total += len(text)
        if total >= max_bytes:
            break
    return out


def _summary(doc: str) -> str | None:
    first = doc.strip().split("\n\n")[0]
    first = " ".join(first.split())
    if not 12 <= len(first) <= 160 or any(c in first for c in "<>{}`"):
        return None
    return first


def docstring_chats(texts: list[tuple[str, str]], n: int, seed: int) -> list[list[dict]]:
    """Generic question/answer chats about the given stdlib sources: what a function does, its signature,
    which module defines it. None of them resembles a demo task."""
    facts = []
    for rel, text in texts:
        module = rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue  # truncated files may end mid-statement
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                summary = _summary(doc) if doc else None
                if isinstance(node, ast.FunctionDef):
                    signature = f"def {node.name}({ast.unparse(node.args)}):"
                else:
                    signature = f"class {node.name}:"
                facts.append((module, node.name, signature, summary))
    rng = random.Random(seed)
    systems = ["You are a helpful assistant.", "You answer questions about the Python standard library."]
    chats = []
    while facts and len(chats) < n:
        turns = []
        if rng.random() < 0.3:
            turns.append({"role": "system", "content": rng.choice(systems)})
        for _ in range(1 if rng.random() < 0.8 else 2):
            module, name, signature, summary = rng.choice(facts)
            kind = rng.randrange(3)
            if kind == 0 and summary:
                q, a = rng.choice([f"What does {module}.{name} do?", f"Explain {name} from {module}."]), summary
            elif kind == 1 and len(signature) <= 120:
                q, a = f"Show the signature of {module}.{name}.", signature
            else:
                q, a = f"Which module defines {name}?", f"{name} is defined in the {module} module."
            turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        chats.append(turns)
    return chats


def echo_chats(texts: list[tuple[str, str]], n: int, seed: int) -> list[list[dict]]:
    """ "Repeat these words" chats over common stdlib words: they teach in-context copying, which a base this
    small would not learn from a few minutes of source code alone (and which the demo tasks build on)."""
    counts = Counter(w for _, text in texts for w in re.findall(r"\b[a-z]{3,10}\b", text))
    vocab = sorted(w for w, _ in counts.most_common(1500))
    rng = random.Random(seed)
    asks = ["Repeat: {}", "Say this back: {}", "Echo these words: {}", "Copy this list: {}"]
    chats = []
    for _ in range(n):
        words = " ".join(rng.sample(vocab, rng.randint(2, 10)))
        chats.append(
            [{"role": "user", "content": rng.choice(asks).format(words)}, {"role": "assistant", "content": words}]
        )
    return chats


# -- 2. tokenizer -------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with Qwen2's pre-tokenizer (digits split one by one) and the special tokens at ids 0, 1, 2."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # the special tokens are added whole; keep their spellings out of the merges
    plain = (t.replace(IM_START, "\n").replace(IM_END, "\n") for t in texts)
    tok.train_from_iterator(plain, trainer=trainer, length=len(texts))
    return tok


def tokenizer_config(max_length: int) -> dict:
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": max_length,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


# -- 3. model -----------------------------------------------------------------------------------------------


def hf_config(args, vocab_size: int) -> dict:
    """config.json of a Qwen3ForCausalLM, as transformers writes it."""
    layers = args.layers
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": SPECIAL_TOKENS.index(ENDOFTEXT),
        "eos_token_id": SPECIAL_TOKENS.index(IM_END),
        "pad_token_id": SPECIAL_TOKENS.index(ENDOFTEXT),
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "hidden_size": args.hidden,
        "initializer_range": 0.02,
        "intermediate_size": args.intermediate,
        "layer_types": ["full_attention"] * layers,
        "max_position_embeddings": args.max_positions,
        "max_window_layers": layers,
        "num_attention_heads": args.heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": args.kv_heads,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": args.rope_theta,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "dtype": "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }


def token_stream(tok: Tokenizer, texts: list[str]) -> np.ndarray:
    """Concatenate the documents' ids, each followed by ``<|endoftext|>``."""
    eot = tok.token_to_id(ENDOFTEXT)
    ids = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, np.int32)


def lm_loss(graphdef, params, tokens):
    """Mean next-token cross-entropy of ``tokens`` [B, S + 1]."""
    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:]).mean()


def decay_mask(params):
    """Weight decay on linear weights and the embedding, not on norm scales."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(getattr(k, "key", None) in ("weight", "embedding") for k in path), params
    )


def pretrain(model: CausalLM, stream: np.ndarray, valid: np.ndarray, args) -> float:
    """Full-parameter AdamW on random windows of ``stream``; returns the final held-out loss."""
    graphdef, params = nnx.split(model)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, min(100, args.steps // 10), max(args.steps, 2), end_value=args.lr * 0.05
    )
    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1, mask=decay_mask),
    )
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: lm_loss(graphdef, p, batch))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    eval_loss = jax.jit(lambda p, b: lm_loss(graphdef, p, b))
    rng = np.random.default_rng(args.seed)
    win = args.seq + 1
    n_valid = min(len(valid) // win, 32)
    valid_batch = jnp.asarray(valid[: n_valid * win].reshape(n_valid, win))
    start, losses, recent = time.time(), [], 0.0
    print(f"pretraining on {len(stream):,} tokens, {args.steps} steps of {args.batch} x {args.seq}", flush=True)
    for i in range(1, args.steps + 1):
        offsets = rng.integers(0, len(stream) - win, args.batch)
        batch = jnp.asarray(np.stack([stream[o : o + win] for o in offsets]))
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(loss)
        if i % 50 == 0 or i == args.steps:
            recent = float(jnp.mean(jnp.stack(losses)))  # mean over the last 50 steps
            losses = []
            elapsed = time.time() - start
            print(f"step {i:5d}  train loss {recent:.3f}  {elapsed / 60:.1f} min", flush=True)
            if elapsed > args.minutes * 60:
                print(f"stopping at step {i}: --minutes {args.minutes} reached", flush=True)
                break
    nnx.update(model, params)
    val = float(eval_loss(params, valid_batch))
    uniform = math.log(model.config.vocab_size)
    print(f"final train loss {recent:.3f}, held-out stdlib loss {val:.3f} (uniform {uniform:.3f})")
    first, second = copy_losses(model)
    print(f"in-context copying: loss on random tokens {first:.2f}, on their repetition {second:.2f}")
    return val


def copy_losses(model: CausalLM, length: int = 40, seed: int = 0) -> tuple[float, float]:
    """Loss on a random token sequence and on its exact repetition: low second value = the model copies."""
    seq = np.random.default_rng(seed).integers(len(SPECIAL_TOKENS), model.config.vocab_size, (8, length))
    ids = jnp.asarray(np.concatenate([seq, seq], axis=1))
    ce = optax.softmax_cross_entropy_with_integer_labels(model(ids)[:, :-1], ids[:, 1:])
    return float(ce[:, : length - 1].mean()), float(ce[:, length:].mean())


@jax.jit(static_argnums=0)
def _logits_at(graphdef, params, ids, t):
    return nnx.merge(graphdef, params)(ids)[0, t - 1]


def generate(
    model: CausalLM, prompt_ids: list[int], max_new: int, *, stop: int | None, temperature: float = 0.0, seed: int = 0
) -> list[int]:
    """Plain decoding without a cache (the model is tiny): greedy, or sampling at ``temperature``."""
    length = len(prompt_ids) + max_new
    graphdef, params = nnx.split(model)
    buf = np.zeros((1, length), np.int32)
    buf[0, : len(prompt_ids)] = prompt_ids
    rng = np.random.default_rng(seed)
    out = []
    for t in range(len(prompt_ids), length):
        logits = np.asarray(_logits_at(graphdef, params, jnp.asarray(buf), t), np.float64)
        if temperature > 0:
            p = np.exp((logits - logits.max()) / temperature)
            nxt = int(rng.choice(len(p), p=p / p.sum()))
        else:
            nxt = int(logits.argmax())
        if nxt == stop:
            break
        out.append(nxt)
        buf[0, t] = nxt
    return out


# -- 4. export ----------------------------------------------------------------------------------------------


def hf_tensors(model: CausalLM) -> dict[str, np.ndarray]:
    """HF key -> fp32 array; stacked per-layer tensors are split back into one tensor per layer."""
    _, state = nnx.split(model)
    plan = weight_plan(model.config, state)
    values = {
        ".".join(str(p) for p in path): np.asarray(var[...], np.float32) for path, var in nnx.to_flat_state(state)
    }
    unused = set(values) - set(plan)
    if unused:
        raise RuntimeError(f"parameters without an HF name: {sorted(unused)}")
    tensors = {}
    for tx_path, hf in plan.items():
        if isinstance(hf, str):
            tensors[hf] = values[tx_path]
        else:
            for i, key in enumerate(hf):
                tensors[key] = values[tx_path][i]
    return tensors


def write_folder(folder: Path, model: CausalLM, config: dict, tok: Tokenizer, max_length: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(hf_tensors(model), folder / "model.safetensors", metadata={"format": "pt"})

    def dump(name, obj):
        (folder / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    dump("config.json", config)
    dump("tokenizer_config.json", tokenizer_config(max_length))
    eot, im_end = tok.token_to_id(ENDOFTEXT), tok.token_to_id(IM_END)
    dump("generation_config.json", {"bos_token_id": eot, "eos_token_id": [im_end, eot], "pad_token_id": eot})
    tok.save(str(folder / "tokenizer.json"))


# -- 5. is the demo task learnable? -------------------------------------------------------------------------

LORA_TARGETS = (
    ("attn", "q_proj"),
    ("attn", "k_proj"),
    ("attn", "v_proj"),
    ("attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
)


def encode_records(tok: Tokenizer, records: list[dict], seq: int) -> tuple[np.ndarray, np.ndarray]:
    """ids [N, seq] (right-padded) and a loss mask [N, seq] that is 1 on assistant tokens (next-token targets)."""
    ids = np.zeros((len(records), seq), np.int32)
    mask = np.zeros((len(records), seq), np.float32)
    for r, rec in enumerate(records):
        prompt = tok.encode(render_chat(rec["messages"][:-1], add_generation_prompt=True)).ids
        full = tok.encode(render_chat(rec["messages"])).ids[:seq]
        ids[r, : len(full)] = full
        mask[r, len(prompt) - 1 : len(full) - 2] = 1.0  # predicts the answer and <|im_end|>
    return ids, mask


def lora_init(model: CausalLM, rank: int, seed: int) -> dict:
    """A [L, r, in] random, B [L, out, r] zeros for each target linear of every layer: the update starts at 0."""
    key = jax.random.key(seed)
    lora = {}
    for group, name in LORA_TARGETS:
        w = getattr(getattr(model.layers, group), name).weight
        layers, d_out, d_in = w.shape
        key, sub = jax.random.split(key)
        lora[f"{group}.{name}"] = (
            jax.random.normal(sub, (layers, rank, d_in)) / math.sqrt(d_in),
            jnp.zeros((layers, d_out, rank)),
        )
    return lora


def apply_lora(model: CausalLM, lora: dict, scale: float) -> CausalLM:
    """Add scale * B @ A to each target weight, in place (on a merged copy of the base)."""
    for target, (a, b) in lora.items():
        group, name = target.split(".")
        w = getattr(getattr(model.layers, group), name).weight
        w.set_value(w[...] + scale * jnp.einsum("lor,lri->loi", b, a))
    return model


def masked_loss(logits, ids, mask):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), ids[:, 1:])
    return (ce * mask[:, :-1]).sum() / mask[:, :-1].sum()


def check_task(
    model: CausalLM,
    tok: Tokenizer,
    *,
    task: str = "sort",
    steps: int = 300,
    batch: int = 8,
    seq: int = 64,
    rank: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    n_eval: int = 64,
    show: int = 4,
    log_every: int = 50,
) -> dict:
    """Fine-tune a LoRA-like update (frozen base) on ``task``; return eval loss and exact-match before/after."""
    from tx.demo_tasks import make_task_split

    train, evals = make_task_split(2000, n_eval, seed=seed, task=task)
    train_ids, train_mask = encode_records(tok, train, seq)
    eval_ids, eval_mask = (jnp.asarray(x) for x in encode_records(tok, evals, seq))
    graphdef, base = nnx.split(model)
    lora = lora_init(model, rank, seed)
    scale = 2.0  # alpha / r with alpha = 2 r
    opt = optax.adam(
        optax.warmup_cosine_decay_schedule(0.0, lr, min(20, steps // 5), max(steps, 2), end_value=lr * 0.1)
    )
    opt_state = opt.init(lora)

    def loss_fn(lora, base, ids, mask):
        return masked_loss(apply_lora(nnx.merge(graphdef, base, copy=True), lora, scale)(ids), ids, mask)

    @jax.jit
    def step(lora, opt_state, base, ids, mask):
        loss, grads = jax.value_and_grad(loss_fn)(lora, base, ids, mask)
        updates, opt_state = opt.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    eval_fn = jax.jit(loss_fn)

    def answers(lora):
        merged = apply_lora(nnx.merge(graphdef, base), lora, scale)
        out = []
        for rec in evals[:show]:
            prompt = tok.encode(render_chat(rec["messages"][:-1], add_generation_prompt=True)).ids
            got = tok.decode(generate(merged, prompt, 16, stop=tok.token_to_id(IM_END)))
            out.append((rec["messages"][0]["content"], rec["messages"][1]["content"], got))
        return out

    result = {"eval_loss_before": float(eval_fn(lora, base, eval_ids, eval_mask)), "samples_before": answers(lora)}
    rng = np.random.default_rng(seed)
    start = time.time()
    history = []
    for i in range(1, steps + 1):
        rows = rng.integers(0, len(train), batch)
        lora, opt_state, loss = step(lora, opt_state, base, jnp.asarray(train_ids[rows]), jnp.asarray(train_mask[rows]))
        if i % log_every == 0 or i == steps:
            ev = float(eval_fn(lora, base, eval_ids, eval_mask))
            history.append((i, float(loss), ev))
            print(
                f"  [{task}] step {i:4d}  train {float(loss):.3f}  eval {ev:.3f}  {time.time() - start:.0f}s",
                flush=True,
            )
    result.update(
        eval_loss_after=history[-1][2], history=history, seconds=time.time() - start, samples_after=answers(lora)
    )
    return result


# -- main ---------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tx/assets/demo-base")
    p.add_argument("--steps", type=int, default=1200, help="pretraining steps (length of the LR schedule)")
    p.add_argument("--minutes", type=float, default=15.0, help="stop pretraining after this many minutes")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--text-mb", type=float, default=3.0, help="megabytes of stdlib source to train on")
    p.add_argument("--chats", type=int, default=4000, help="generic question/answer chats mixed into the text")
    p.add_argument("--echo-chats", type=int, default=15000, help='generic "repeat these words" chats')
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--max-positions", type=int, default=512)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument(
        "--check-task",
        choices=("none", "reverse", "sort", "mix"),
        default="none",
        help="after building, check the demo task is learnable with a LoRA-like fine-tune",
    )
    p.add_argument("--check-steps", type=int, default=300)
    p.add_argument("--check-only", action="store_true", help="skip building; check the existing --out folder")
    args = p.parse_args(argv)

    if args.check_only:
        model, tok = load_model(args.out), Tokenizer.from_file(str(args.out / "tokenizer.json"))
    else:
        t0 = time.time()
        files = training_texts(int(args.text_mb * 1e6), args.seed)
        questions = [render_chat(c) for c in docstring_chats(files, args.chats, args.seed)]
        echoes = [render_chat(c) for c in echo_chats(files, args.echo_chats, args.seed)]
        texts = [t for _, t in files] + questions + echoes
        print(
            f"{len(files)} stdlib files ({sum(len(t) for _, t in files) / 1e6:.1f} MB), {len(questions)} questions, "
            f"{len(echoes)} echo chats"
        )
        # the echoes only repeat stdlib words; leaving them out keeps the merges those of the source text
        tok = train_tokenizer(texts[: len(files) + len(questions)], args.vocab)
        print(f"tokenizer: {tok.get_vocab_size()} tokens ({time.time() - t0:.0f}s)")
        stream = token_stream(tok, texts)
        valid = token_stream(tok, [read_source(f, 24_000) for f in stdlib_files(heldout=True)[:8]])
        config = hf_config(args, tok.get_vocab_size())
        model = CausalLM(parse_config(config), rngs=nnx.Rngs(args.seed))
        n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
        print(f"model: {n_params / 1e6:.2f}M parameters")
        pretrain(model, stream, valid, args)

        write_folder(args.out, model, config, tok, args.max_positions)
        reloaded = load_model(args.out)
        probe = jnp.asarray(stream[None, :64])
        diff = float(jnp.abs(reloaded(probe) - model(probe)).max())
        assert diff < 1e-5, f"reloaded logits differ by {diff}"
        size = sum(f.stat().st_size for f in args.out.iterdir())
        print(f"wrote {args.out} ({size / 1e6:.1f} MB); reload max |logit diff| {diff:.1e}")

        for prompt, temp in (("import os\n", 0.7), ("def read_file(path):\n", 0.7), ("class Stack:\n", 0.0)):
            ids = tok.encode(prompt).ids
            text = tok.decode(generate(model, ids, 60, stop=tok.token_to_id(ENDOFTEXT), temperature=temp))
            print(f"--- sample (temperature {temp}) ---\n{prompt}{text}")
        chat = render_chat([{"role": "user", "content": "What does json.dumps do?"}], add_generation_prompt=True)
        reply = tok.decode(generate(model, tok.encode(chat).ids, 40, stop=tok.token_to_id(IM_END)))
        print(f"--- chat sample ---\n{chat}{reply}")

    if args.check_task != "none":
        res = check_task(model, tok, task=args.check_task, steps=args.check_steps, seed=args.seed)
        print(
            f"task {args.check_task}: eval loss {res['eval_loss_before']:.3f} -> {res['eval_loss_after']:.3f} "
            f"in {args.check_steps} steps ({res['seconds']:.0f}s)"
        )
        for when in ("before", "after"):
            for prompt, want, got in res[f"samples_{when}"]:
                print(f"  {when:6s} {prompt!r:45s} want {want!r:35s} got {got!r}")


if __name__ == "__main__":
    main()
