"""Text generation with a KV cache: greedy, temperature and top-p sampling; adapters (connectors too) included."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tx.errors import ConfigError
from tx.models.decoder import KVCache


@partial(jax.jit, static_argnums=(0,))
def _prefill(graphdef, state, ids, mask, cache):
    model = nnx.merge(graphdef, state)
    hidden, cache = model.hidden_states(ids, attention_mask=mask, cache=cache)
    return model.project(hidden[:, -1]).astype(jnp.float32), cache


@partial(jax.jit, static_argnums=(0,))
def _decode(graphdef, state, token, cache):
    model = nnx.merge(graphdef, state)
    hidden, cache = model.hidden_states(token[:, None], attention_mask=jnp.ones_like(token[:, None]), cache=cache)
    return model.project(hidden[:, -1]).astype(jnp.float32), cache


def sample(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Next token ids [B] from logits [B, V]: argmax when temperature == 0, else nucleus sampling."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        drop = jnp.cumsum(probs, axis=-1) - probs > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = jnp.where(drop, -jnp.inf, sorted_logits)
        logits = jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate_ids(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_ids=(),
    pad_id: int = 0,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to ``max_new_tokens`` tokens; stops at an eos id."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ConfigError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature={temperature}, top_p={top_p}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    vocab = model.config.vocab_size
    bad = [t for p in prompts for t in p if not 0 <= int(t) < vocab]
    if bad:
        raise ConfigError(
            f"token id {bad[0]} is outside the model's vocabulary (vocab_size {vocab}); is the tokenizer the model's?"
        )
    if model.config.compressed is not None and len({len(p) for p in prompts}) > 1:
        # DeepSeek-V4 pools cache slots into compressed entries, so a prompt must start at slot 0: prompts of
        # different lengths (left-padded together) run one length at a time
        out = [None] * len(prompts)
        for length in sorted({len(p) for p in prompts}):
            group = [i for i, p in enumerate(prompts) if len(p) == length]
            done = generate_ids(
                model,
                [prompts[i] for i in group],
                max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                eos_ids=eos_ids,
                pad_id=pad_id,
            )
            for i, o in zip(group, done):
                out[i] = o
        return out
    b, n = len(prompts), max(len(p) for p in prompts)
    total = n + max_new_tokens
    if total > model.config.max_positions:
        raise ConfigError(
            f"prompt ({n} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
            f"({model.config.max_positions}); shorten one of them"
        )
    ids = np.full((b, n), pad_id, np.int32)
    mask = np.zeros((b, n), np.int32)
    for i, p in enumerate(prompts):  # left padding: every prompt ends at the same slot
        ids[i, n - len(p) :] = p
        mask[i, n - len(p) :] = 1
    inference = nnx.merge(*nnx.split(model))  # the same arrays in separate modules: the caller's mode is kept
    inference.eval()  # no LoRA dropout while generating
    graphdef, state = nnx.split(inference)
    cache = KVCache.create(model.config, b, total, model.dtype)
    logits, cache = _prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), cache)
    key = jax.random.key(seed)
    eos = set(int(e) for e in eos_ids)
    out: list[list[int]] = [[] for _ in range(b)]
    done = np.zeros(b, bool)
    switch = longrope_switch(model.config)
    tokens = []
    for _ in range(max_new_tokens):
        key, sub = jax.random.split(key)
        token = sample(logits, sub, temperature, top_p)
        host = np.asarray(token)
        tokens.append(host)
        for i in range(b):
            if not done[i]:
                out[i].append(int(host[i]))
                done[i] = int(host[i]) in eos
        if done.all():
            break
        if switch is not None and n < switch + 1 and n + len(tokens) == switch + 1:
            # longrope: the sequence now reaches past the original length, so its rope switches to the long
            # factors; the cached keys were rotated with the short ones, so the whole sequence runs again (as
            # transformers' Phi-3 does, dropping its cache at this point)
            all_ids = np.concatenate([ids, np.stack(tokens, axis=1)], axis=1)
            all_mask = np.concatenate([mask, np.ones((b, len(tokens)), np.int32)], axis=1)
            cache = KVCache.create(model.config, b, total, model.dtype)
            logits, cache = _prefill(graphdef, state, jnp.asarray(all_ids), jnp.asarray(all_mask), cache)
            continue
        logits, cache = _decode(graphdef, state, token, cache)
    return out


def longrope_switch(cfg) -> int | None:
    """The original length past which a longrope model's rope switches to its long factors (None: no longrope)."""
    lengths = [rope.original_max_positions for _, rope in cfg.ropes if rope.kind == "longrope"]
    return min(lengths) if lengths else None


def generate(
    model,
    tokenizer,
    prompt,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    *,
    chat: bool | None = None,
):
    """Generate text. ``prompt``: a string, a list of chat messages, or a list of those (batched).

    Chat messages (``[{"role": "user", "content": ...}]``) are rendered with the tokenizer's chat
    template and a generation prompt; ``chat=True`` wraps a plain string as one user message.
    Returns the generated text (or a list of texts for a batch), without the prompt.
    """
    batched = isinstance(prompt, list) and prompt and not isinstance(prompt[0], dict)
    items = prompt if batched else [prompt]
    encoded = []
    for item in items:
        if chat and isinstance(item, str):
            item = [{"role": "user", "content": item}]
        if isinstance(item, list):
            text = tokenizer.apply_chat_template(item, add_generation_prompt=True)
            encoded.append(tokenizer.encode(text, add_special_tokens=False).ids)
        else:
            encoded.append(tokenizer.encode(item).ids)
    eos = list(getattr(tokenizer, "eos_ids", None) or ([tokenizer.eos_id] if tokenizer.eos_id is not None else []))
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    outs = generate_ids(
        model, encoded, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, eos_ids=eos, pad_id=pad
    )
    texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
    return texts if batched else texts[0]
