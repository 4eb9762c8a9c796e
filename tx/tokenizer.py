"""Tokenizer folder -> :class:`Tokenizer`: a ``tokenizers.Tokenizer`` plus special-token ids and the chat template.

Only ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``, ``config.json``,
``generation_config.json`` and ``*.jinja`` files are read; nothing is executed but the chat template, which
runs in jinja2's immutable sandbox exactly as transformers renders it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import tokenizers

from tx.errors import CheckpointError, DataError
from tx.hub import resolve
from tx.jsonfile import read_json_object

# The named special tokens transformers exposes to chat templates (``special_tokens_map``), in its order.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with the facts a trainer needs from the rest of the tokenizer folder.

    ``tokenizers.Tokenizer`` cannot be subclassed, so this wraps it: :attr:`backend` is the Rust tokenizer and
    any attribute not defined here (``encode_batch``, ``token_to_id``, ``get_vocab`` ...) is looked up on it.

    Attributes:
        backend: the ``tokenizers.Tokenizer`` built from ``tokenizer.json``.
        special_tokens: named special tokens as strings (``{"eos_token": "<|im_end|>", ...}``); chat templates
            see them as variables.
        bos_id, eos_id, pad_id: ids of those tokens, or None when the folder names none. ``pad_id`` falls back
            to ``eos_id``.
        eos_ids: every id that ends a generation: ``eos_id`` first, then ``generation_config.json``'s list.
        chat_template: the jinja source, a dict ``{name: source}`` when the folder has several, or None.
        path: the folder it was loaded from, if any.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str] | None = None,
        chat_template: str | Mapping[str, str] | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        eos_ids: Sequence[int] = (),
        path: Path | None = None,
    ):
        self.backend = backend
        self.special_tokens = dict(special_tokens or {})
        self.chat_template = dict(chat_template) if isinstance(chat_template, Mapping) else chat_template
        self.path = path
        tok = self.special_tokens
        self.bos_id = _token_id(backend, tok.get("bos_token"), bos_id)
        self.eos_id = _token_id(backend, tok.get("eos_token"), eos_id)
        pad = _token_id(backend, tok.get("pad_token"), pad_id)
        self.pad_id = pad if pad is not None else self.eos_id
        ids = [self.eos_id, *eos_ids] if self.eos_id is not None else list(eos_ids)
        self.eos_ids = tuple(dict.fromkeys(int(i) for i in ids))

    # -- encoding ---------------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> tokenizers.Encoding:
        """Encode one string; ``.ids`` are the token ids, ``.offsets`` their character spans in ``text``."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Token ids -> text (numpy arrays welcome)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (base vocabulary plus added tokens)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def add_bos(self) -> bool:
        """Whether ``encode(text)`` (with special tokens) starts with the bos token."""
        if self.bos_id is None:
            return False
        ids = self.backend.encode("a", add_special_tokens=True).ids
        return bool(ids) and ids[0] == self.bos_id

    # -- chat -------------------------------------------------------------------------------------------------

    def get_chat_template(self, template: str | None = None) -> str:
        """The jinja source to render chats with; ``template`` picks a named one (``"tool_use"``, ...)."""
        where = f" in {self.path}" if self.path else ""
        if self.chat_template is None:
            raise CheckpointError(
                f"the tokenizer{where} has no chat template (tokenizer_config.json 'chat_template' or "
                "chat_template.jinja); use a chat/instruct checkpoint's tokenizer or plain {'text': ...} data"
            )
        if isinstance(self.chat_template, str):
            if template is not None:
                raise CheckpointError(f"the tokenizer{where} has a single chat template, not one named {template!r}")
            return self.chat_template
        name = template or "default"
        if name not in self.chat_template:
            raise CheckpointError(
                f"the tokenizer{where} has no chat template named {name!r}; it has {sorted(self.chat_template)}"
            )
        return self.chat_template[name]

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        *,
        template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a conversation to text the way ``transformers`` ``apply_chat_template(tokenize=False)`` does.

        Args:
            messages: ``[{"role": "user", "content": "..."}, ...]``; keys whose value is None are dropped.
            add_generation_prompt: append the header that opens an assistant turn.
            template: name of one of several templates (default ``"default"``).
            **kwargs: extra template variables (e.g. ``enable_thinking=False``); they override special tokens.

        Encode the result with ``add_special_tokens=False``: the template writes bos itself where it wants one.
        """
        source = self.get_chat_template(template)
        chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        variables = {**self.special_tokens, **kwargs}
        try:
            return _compile(source).render(
                messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **variables
            )
        except _jinja().exceptions.TemplateError as exc:
            raise DataError(f"the chat template rejected the conversation: {exc}") from None

    def __getattr__(self, name: str) -> Any:
        if name == "backend":  # not yet set (e.g. during unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.backend, name)

    def __repr__(self) -> str:
        where = f"{self.path}, " if self.path else ""
        chat = "yes" if self.chat_template is not None else "no"
        return (
            f"Tokenizer({where}vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
            f"pad_id={self.pad_id}, chat_template={chat})"
        )


def load_tokenizer(name_or_path: str | os.PathLike) -> Tokenizer:
    """Load the tokenizer of a checkpoint folder or hub id (see :func:`tx.hub.resolve`).

    Reads ``tokenizer.json`` (required; its post-processor alone decides whether ``encode`` adds bos/eos, as in
    transformers 5, which ignores the config's ``add_bos_token``), ``tokenizer_config.json`` (special tokens,
    ``chat_template``), ``special_tokens_map.json``, ``chat_template.jinja`` and
    ``additional_chat_templates/*.jinja`` (which win over the config's template, as in transformers), and the
    ``*_token_id`` entries of ``generation_config.json`` / ``config.json`` when the tokenizer files name no token.

    Raises:
        CheckpointError: ``tokenizer.json`` is missing or malformed, or a JSON file cannot be parsed.
    """
    folder = resolve(name_or_path)
    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        raise CheckpointError(
            f"{tok_file} not found: tx reads only the fast-tokenizer file tokenizer.json. For a checkpoint that "
            "ships only a sentencepiece/vocab file, convert it once with transformers "
            "(AutoTokenizer.from_pretrained(...).save_pretrained(folder))."
        )
    try:
        backend = tokenizers.Tokenizer.from_file(str(tok_file))
    except Exception as exc:  # tokenizers raises a bare Exception for any parse error
        raise CheckpointError(f"{tok_file} is not a valid tokenizer.json: {exc}") from None

    config = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")
    gen_config = _read_json(folder / "generation_config.json")
    model_config = _read_json(folder / "config.json")

    special: dict[str, str] = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = _token_str(config.get(name))
        if value is None:
            value = _token_str(special_map.get(name))
        if value is not None:
            special[name] = value

    def config_id(key: str) -> int | list[int] | None:
        for source in (gen_config, model_config, model_config.get("text_config") or {}):
            if source.get(key) is not None:
                return source[key]
        return None

    eos_cfg = config_id("eos_token_id")
    eos_list = eos_cfg if isinstance(eos_cfg, list) else [eos_cfg] if eos_cfg is not None else []
    bos_cfg = config_id("bos_token_id")
    pad_cfg = config_id("pad_token_id")
    tokenizer = Tokenizer(
        backend,
        special_tokens=special,
        chat_template=_read_chat_template(folder, config),
        bos_id=bos_cfg if isinstance(bos_cfg, int) else None,
        eos_id=eos_list[0] if eos_list else None,
        pad_id=pad_cfg if isinstance(pad_cfg, int) else None,
        eos_ids=[int(i) for i in eos_list],
        path=folder,
    )
    return tokenizer


# -- helpers ----------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or ``{}`` where the file is missing (every such file is optional)."""
    return read_json_object(path, CheckpointError) if path.is_file() else {}


def _token_str(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict ``{"content": ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _token_id(backend: tokenizers.Tokenizer, token: str | None, fallback: int | None) -> int | None:
    if token is not None:
        tid = backend.token_to_id(token)
        if tid is not None:
            return int(tid)
    return int(fallback) if fallback is not None else None


def _read_chat_template(folder: Path, config: Mapping[str, Any]) -> str | dict[str, str] | None:
    templates: dict[str, str] = {}
    raw = config.get("chat_template")
    if isinstance(raw, str):
        templates["default"] = raw
    elif isinstance(raw, list):
        for entry in raw:
            if not (isinstance(entry, Mapping) and isinstance(entry.get("name"), str)):
                raise CheckpointError(
                    f"{folder / 'tokenizer_config.json'}: 'chat_template' list entries should be "
                    '{"name": ..., "template": ...}'
                )
            templates[entry["name"]] = entry["template"]
    elif raw is not None:
        raise CheckpointError(f"{folder / 'tokenizer_config.json'}: 'chat_template' should be a string or a list")
    files = {}
    if (folder / "chat_template.jinja").is_file():
        files["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        for file in sorted(extra.glob("*.jinja")):
            files[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    if files:  # transformers: template files replace the config's templates
        templates = files
    if not templates:
        return None
    if list(templates) == ["default"]:
        return templates["default"]
    return templates


def _jinja():
    import jinja2

    return jinja2


@lru_cache(maxsize=16)
def _compile(source: str):
    """Compile a chat template with the environment transformers uses (sandboxed, same globals and filters)."""
    jinja2 = _jinja()
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which chat templates do not want
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class _Generation(jinja2.ext.Extension):
        # transformers' {% generation %} ... {% endgeneration %} block; it only marks text, so render the body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class _NoFiles(jinja2.BaseLoader):
        # a template comes from a downloaded file: it may not name other files to include, import or extend
        def get_source(self, environment, template):
            raise jinja2.exceptions.TemplateNotFound(
                f"{template!r} (a chat template cannot include, import or extend other files)"
            )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols], loader=_NoFiles()
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)
