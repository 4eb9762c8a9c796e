"""tx.tokenizer against transformers' fast tokenizer on tiny real tokenizer folders (no network)."""

import json
import shutil

import pytest
from fixtures_tokenizer import QWEN3_TEMPLATE, corpus, make_chatml_tokenizer, make_llama_tokenizer

from tx.errors import CheckpointError, DataError
from tx.tokenizer import Tokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")

CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Germany? Ça va — très bien ✓"},
    {"role": "assistant", "content": "Berlin."},
]
TEXTS = [*corpus(20, seed=3), "", " leading space", "tabs\tand\nnewlines\n\n", "Ünïcödé ✓ 漢字", "<|im_end|> in text"]


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    return make_chatml_tokenizer(tmp_path_factory.mktemp("chatml"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_llama_tokenizer(tmp_path_factory.mktemp("llama"))


def copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "tok")


def hf(folder):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def edit_config(folder, **changes):
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("which", ["chatml", "llama"])
def test_encode_ids_match_transformers(which, request):
    folder = request.getfixturevalue(which)
    ours, ref = load_tokenizer(folder), hf(folder)
    assert isinstance(ours, Tokenizer)
    for text in TEXTS:
        for special in (True, False):
            assert (
                ours.encode(text, add_special_tokens=special).ids == ref(text, add_special_tokens=special)["input_ids"]
            ), (text, special)
    ids = ours.encode(TEXTS[0]).ids
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids)


def test_special_ids(chatml, llama):
    q, ref_q = load_tokenizer(chatml), hf(chatml)
    assert q.bos_id is None and ref_q.bos_token_id is None
    assert q.eos_id == ref_q.eos_token_id == q.token_to_id("<|im_end|>")
    assert q.pad_id == ref_q.pad_token_id == q.token_to_id("<|endoftext|>")
    assert q.eos_ids == (q.eos_id,)
    assert not q.add_bos
    assert q.vocab_size == len(ref_q)

    ll, ref_l = load_tokenizer(llama), hf(llama)
    assert ll.bos_id == ref_l.bos_token_id == ll.token_to_id("<s>")
    assert ll.eos_id == ref_l.eos_token_id == ll.token_to_id("</s>")
    assert ll.pad_id == ll.eos_id  # no pad token: falls back to eos
    assert ll.add_bos and ll.encode("hello").ids[0] == ll.bos_id


def test_ids_from_config_and_generation_config(chatml, tmp_path):
    folder = copy(chatml, tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["eos_token"], config["pad_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = load_tokenizer(folder)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 2, 1)  # generation_config wins over config.json
    assert tok.eos_ids == (2, 0)


def test_special_tokens_map_json(chatml, tmp_path):
    folder = copy(chatml, tmp_path)
    edit_config(folder, eos_token=None)
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|endoftext|>"}}))
    assert load_tokenizer(folder).eos_id == load_tokenizer(folder).token_to_id("<|endoftext|>")


@pytest.mark.parametrize("add_bos,add_eos", [(True, False), (True, True), (False, True)])
def test_tokenizer_json_post_processor_decides_bos_eos_like_transformers(chatml, tmp_path, add_bos, add_eos):
    # transformers 5 ignores add_bos_token / add_eos_token when tokenizer.json exists; so does tx
    folder = copy(chatml, tmp_path)
    edit_config(folder, bos_token="<|endoftext|>", add_bos_token=add_bos, add_eos_token=add_eos)
    ours, ref = load_tokenizer(folder), hf(folder)
    for text in TEXTS[:5]:
        assert ours.encode(text).ids == ref(text)["input_ids"]
    assert ours.bos_id == ref.bos_token_id == ours.token_to_id("<|endoftext|>")
    assert ours.add_bos is False


@pytest.mark.parametrize("which", ["chatml", "llama"])
def test_chat_template_renders_like_transformers(which, request):
    folder = request.getfixturevalue(which)
    ours, ref = load_tokenizer(folder), hf(folder)
    chats = [CHAT[1:3], CHAT[1:]] if which == "llama" else [CHAT, CHAT[1:], CHAT[:2], CHAT[1:4]]
    for chat in chats:
        for gen in (False, True):
            expected = ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(chat, add_generation_prompt=gen) == expected
    # and the ids of the rendered chat agree (transformers encodes rendered chats without special tokens)
    text = ours.apply_chat_template(chats[-1])
    assert ours.encode(text, add_special_tokens=False).ids == ref.apply_chat_template(chats[-1])["input_ids"]


def test_chat_template_kwargs_and_qwen3(chatml, tmp_path):
    folder = copy(chatml, tmp_path)
    (folder / "chat_template.jinja").write_text(
        QWEN3_TEMPLATE + "{%- if extra is defined %}{{ extra }}{%- endif %}{{ strftime_now('%Y') | length }}"
    )
    ours, ref = load_tokenizer(folder), hf(folder)
    for gen in (False, True):
        expected = ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=gen, extra="<x>")
        assert ours.apply_chat_template(CHAT, add_generation_prompt=gen, extra="<x>") == expected
    assert "<think>" in expected and expected.endswith("<x>4")


def test_chat_template_from_tokenizer_config_string_and_list(chatml, tmp_path):
    folder = copy(chatml, tmp_path)
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    edit_config(folder, chat_template=template)
    ours, ref = load_tokenizer(folder), hf(folder)
    assert ours.chat_template == template
    assert ours.apply_chat_template(CHAT) == ref.apply_chat_template(CHAT, tokenize=False)

    other = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    edit_config(folder, chat_template=[{"name": "default", "template": template}, {"name": "plain", "template": other}])
    ours, ref = load_tokenizer(folder), hf(folder)
    assert set(ours.chat_template) == {"default", "plain"}
    assert ours.apply_chat_template(CHAT) == ref.apply_chat_template(CHAT, tokenize=False)
    assert ours.apply_chat_template(CHAT, template="plain") == ref.apply_chat_template(
        CHAT, tokenize=False, chat_template="plain"
    )
    assert ours.apply_chat_template(CHAT[1:2], template="plain") == "user: What is the capital of France?\n"

    edit_config(folder, chat_template=[{"name": "plain", "template": other}])
    with pytest.raises(CheckpointError, match=r"no chat template named 'default'.*\['plain'\]"):
        load_tokenizer(folder).apply_chat_template(CHAT)


def test_jinja_file_wins_over_config(chatml, tmp_path):
    folder = copy(chatml, tmp_path)
    edit_config(folder, chat_template="IGNORED")
    ours, ref = load_tokenizer(folder), hf(folder)
    assert ours.apply_chat_template(CHAT) == ref.apply_chat_template(CHAT, tokenize=False)
    assert "IGNORED" not in ours.apply_chat_template(CHAT)


def test_template_exception_is_data_error(llama):
    tok = load_tokenizer(llama)
    with pytest.raises(DataError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "assistant", "content": "hi"}])


def test_no_chat_template(tmp_path):
    tok = load_tokenizer(make_chatml_tokenizer(tmp_path / "base", template=None))
    assert tok.chat_template is None
    with pytest.raises(CheckpointError, match="no chat template"):
        tok.apply_chat_template(CHAT)


def test_missing_tokenizer_json(chatml, tmp_path):
    folder = copy(chatml, tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json not found"):
        load_tokenizer(folder)


def test_malformed_files_are_named(chatml, tmp_path):
    folder = copy(chatml, tmp_path)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is not a valid tokenizer\.json"):
        load_tokenizer(folder)
    shutil.copy(chatml / "tokenizer.json", folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json is not valid JSON"):
        load_tokenizer(folder)


def test_getattr_delegates_to_backend(chatml):
    tok = load_tokenizer(chatml)
    assert tok.token_to_id("<|im_end|>") == tok.eos_id
    assert [e.ids for e in tok.encode_batch(["a b", "c"])] == [tok.encode("a b").ids, tok.encode("c").ids]
    with pytest.raises(AttributeError):
        tok.no_such_method  # noqa: B018
