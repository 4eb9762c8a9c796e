"""Tiny real tokenizer folders for tests, built offline in well under a second.

Each ``make_*`` function trains a byte-level BPE tokenizer on a few hundred generated lines, wraps it with
transformers' ``PreTrainedTokenizerFast`` and ``save_pretrained``s it, so the folder is exactly what a hub
checkpoint ships (``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``) and can be loaded both
by :func:`tx.tokenizer.load_tokenizer` and by ``transformers.AutoTokenizer`` as a reference.

Import from a test module as ``from fixtures_tokenizer import make_chatml_tokenizer`` (pytest puts ``tests/``
on ``sys.path``). transformers is a test dependency only; it is imported inside the functions.
"""

from __future__ import annotations

import random
from pathlib import Path

# Qwen2.5 / ChatML: <|im_start|>role\ncontent<|im_end|>\n, with a default system prompt and a role check.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{- raise_exception('unknown role ' + message['role']) }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Qwen3-like: the final assistant turn gets an (empty) think block that earlier turns do not, so rendering a
# prefix of the conversation is not a prefix of the full rendering at assistant turn ends.
QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if loop.last %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Llama-2 / Mistral style: bos from the template, assistant replies end with eos, strict alternation.
LLAMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

_WORDS = (
    "the a an of to and in is it that for on with as was by at from this be are or not have which one all "
    "their there were will can more when so if out up about into than them some could time these two may "
    "first then do any like my now over such our man me even most made after also did many before must "
    "paris berlin france germany capital city river sort reverse numbers words list answer question hello "
    "assistant user system please thanks good yes no"
).split()


def corpus(lines: int = 400, seed: int = 0) -> list[str]:
    """Deterministic sentences with words, numbers and punctuation, enough to train a small BPE."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 999)))
        sentence = " ".join(words)
        out.append(sentence[0].upper() + sentence[1:] + rng.choice([".", "?", "!", ",", ":"]))
    return out


def _train_bpe(special_tokens: list[str], vocab_size: int, bos_eos_template: tuple[str, str] | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    if bos_eos_template is None:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        bos, _ = bos_eos_template
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok


def make_chatml_tokenizer(path: str | Path, *, template: str | None = CHATML_TEMPLATE, vocab_size: int = 400) -> Path:
    """A Qwen-style tokenizer folder: no bos, eos ``<|im_end|>``, pad ``<|endoftext|>``, ChatML template.

    ``template=None`` saves no chat template (a base model's tokenizer); pass :data:`QWEN3_TEMPLATE` for the
    think-block variant.
    """
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    tok = _train_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], vocab_size)
    kwargs = {"chat_template": template} if template is not None else {}
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", **kwargs)
    hf.save_pretrained(path)
    return path


def make_llama_tokenizer(path: str | Path, *, vocab_size: int = 400) -> Path:
    """A Llama-2-style tokenizer folder: bos ``<s>`` added by the post-processor, eos ``</s>``, no pad token,
    and :data:`LLAMA_TEMPLATE` (which writes ``bos_token`` and ``eos_token`` itself)."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    tok = _train_bpe(["<unk>", "<s>", "</s>"], vocab_size, bos_eos_template=("<s>", "</s>"))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=LLAMA_TEMPLATE
    )
    hf.save_pretrained(path)
    return path
