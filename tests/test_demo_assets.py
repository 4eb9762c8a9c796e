"""The embedded demo base model (tx/assets/demo-base) and the demo's synthetic tasks (tx.demo_tasks)."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

import tx
from tx import demo_tasks
from tx.models.config import load_config

ROOT = Path(__file__).resolve().parents[1]
ASSET = Path(tx.__file__).parent / "assets" / "demo-base"
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "reverse: queue token result"},
    {"role": "assistant", "content": "result token queue"},
]


@functools.cache
def load_recipe():
    spec = importlib.util.spec_from_file_location("build_demo_base", ROOT / "recipes" / "build_demo_base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model():
    return tx.load_model(ASSET)


@pytest.fixture(scope="module")
def tok():
    return tokenizers.Tokenizer.from_file(str(ASSET / "tokenizer.json"))


def render(template: str, messages, add_generation_prompt=False) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


def next_token_loss(model, ids: list[int], seq: int = 128) -> float:
    n = len(ids) // (seq + 1)
    assert n >= 1, "not enough text"
    windows = jnp.asarray(np.asarray(ids[: n * (seq + 1)], np.int32).reshape(n, seq + 1))
    logits = model(windows[:, :-1])
    return float(optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean())


# -- the shipped folder ------------------------------------------------------------------------------------


def test_folder_is_small_and_complete():
    names = {p.name for p in ASSET.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    size = sum(p.stat().st_size for p in ASSET.iterdir())
    assert size < 8e6, f"demo base is {size / 1e6:.1f} MB; keep the shipped artifact small"


def test_config_is_a_qwen3_checkpoint(tok):
    raw = json.loads((ASSET / "config.json").read_text())
    assert raw["architectures"] == ["Qwen3ForCausalLM"] and raw["model_type"] == "qwen3"
    cfg = load_config(ASSET)
    assert cfg.family == "qwen3" and cfg.qk_norm and cfg.tie_word_embeddings
    assert cfg.vocab_size == tok.get_vocab_size()
    assert cfg.eos_token_id == tok.token_to_id("<|im_end|>")
    assert cfg.pad_token_id == tok.token_to_id("<|endoftext|>")


def test_special_tokens(tok):
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert [tok.token_to_id(t) for t in specials] == [0, 1, 2]
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>\n").ids
    assert ids[0] == 1 and 2 in ids
    assert tok.decode(tok.encode("def f(x):\n    return x + 1\n").ids) == "def f(x):\n    return x + 1\n"


def test_chat_template_renders():
    config = json.loads((ASSET / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"
    template = config["chat_template"]
    assert render(template, MESSAGES) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nreverse: queue token result<|im_end|>\n"
        "<|im_start|>assistant\nresult token queue<|im_end|>\n"
    )
    prompt = render(template, MESSAGES[:2], add_generation_prompt=True)
    assert prompt.endswith("reverse: queue token result<|im_end|>\n<|im_start|>assistant\n")
    recipe = load_recipe()
    for messages, gen in ((MESSAGES, False), (MESSAGES[1:2], True)):
        assert recipe.render_chat(messages, gen) == render(template, messages, gen)


def test_logits_are_finite(model, tok):
    ids = jnp.asarray([tok.encode("import os\n\ndef main():\n    print(os.getcwd())\n").ids])
    logits = model(ids)
    assert logits.shape == (1, ids.shape[1], tok.get_vocab_size())
    assert bool(jnp.isfinite(logits).all())


def test_heldout_loss_is_well_below_uniform(model, tok):
    """The base really learned Python: loss on text it never saw is far below log(vocab)."""
    uniform = math.log(tok.get_vocab_size())
    own_source = tok.encode(Path(__file__).read_text()).ids  # written after the model was trained
    loss = next_token_loss(model, own_source[:1032])
    assert loss < 0.7 * uniform, (loss, uniform)  # test code is further from the stdlib than held-out modules
    recipe = load_recipe()
    heldout = recipe.stdlib_files(heldout=True)[8:14]  # the recipe reports loss on the first 8
    if heldout:
        ids = tok.encode("\n".join(p.read_text(errors="replace")[:6000] for p in heldout)).ids
        loss = next_token_loss(model, ids[:1032])
        assert loss < 0.6 * uniform, (loss, uniform)


def test_task_words_tokenize_whole(tok):
    for word in demo_tasks.WORDS:
        assert len(tok.encode(" " + word).ids) == 1, word
        assert len(tok.encode(word).ids) <= 2, word
    for digit in range(demo_tasks.MAX_NUMBER + 1):
        assert tok.encode(f" {digit}").tokens == ["Ġ", str(digit)]


def test_transformers_matches(model, tok):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(ASSET, dtype=torch.float32, attn_implementation="eager")
    hf.eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(ASSET)
    text = "class Stack:\n    def push(self, item):\n        self.items.append(item)\n"
    chat = hf_tok.apply_chat_template(MESSAGES[1:2], tokenize=False, add_generation_prompt=True)
    assert chat == render(
        json.loads((ASSET / "tokenizer_config.json").read_text())["chat_template"], MESSAGES[1:2], True
    )
    for sample in (text, chat):
        ids = tok.encode(sample).ids
        assert hf_tok(sample, add_special_tokens=True)["input_ids"] == ids
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits.numpy()
        got = np.asarray(model(jnp.asarray([ids])))
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


# -- the demo tasks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", demo_tasks.TASKS)
def test_task_records_are_deterministic_and_correct(task):
    a = demo_tasks.make_task_records(50, seed=7, task=task)
    assert a == demo_tasks.make_task_records(50, seed=7, task=task)
    assert a != demo_tasks.make_task_records(50, seed=8, task=task)
    for rec in a:
        user, assistant = rec["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        kind, items = user["content"].split(": ")
        items = items.split()
        assert 3 <= len(items) <= 6 and len(set(items)) == len(items)
        if kind == "reverse":
            assert assistant["content"].split() == items[::-1]
            assert set(items) <= set(demo_tasks.WORDS)
        else:
            assert kind == "sort" and assistant["content"].split() == sorted(items, key=int)


def test_task_split_is_disjoint_and_jsonl_round_trips(tmp_path):
    train, evals = demo_tasks.make_task_split(500, 100, seed=0, task="reverse")
    assert len(train) == 500 and len(evals) == 100
    assert not {r["messages"][0]["content"] for r in train} & {r["messages"][0]["content"] for r in evals}
    path = demo_tasks.write_jsonl(evals, tmp_path / "sub" / "eval.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == evals
    with pytest.raises(ValueError, match="unknown task"):
        demo_tasks.make_task_records(1, task="translate")


@pytest.mark.slow
def test_demo_task_is_learnable_quickly(model, tok):
    """A short LoRA-like fine-tune (frozen base) already cuts the held-out answer loss sharply."""
    recipe = load_recipe()
    res = recipe.check_task(model, tok, task=demo_tasks.DEMO_TASK, steps=80, n_eval=32, show=0, log_every=80)
    assert res["eval_loss_after"] < 0.5 * res["eval_loss_before"], res["history"]
