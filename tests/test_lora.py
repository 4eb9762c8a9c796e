"""LoRA: identity at init, gradients only for adapter state, adapters_disabled, merge and export, bad input.

Tolerances (fp32): merge changes logits by <= 1e-5; an exported checkpoint run by transformers matches tx within 1e-4
(the same bound as the loader's parity tests); identity at init and adapters_disabled are exact (B = 0 / same ops).
"""

import copy
import json
import re
import shutil

import jax
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

import tx
from tx.adapters.attach import TRAINABLE, adapters_disabled, attach, has_lora, lora_modules
from tx.adapters.lora import LoRALinear, LoRAParam
from tx.errors import AdapterError, ConfigError

HF_TOL = 1e-4
MERGE_TOL = 1e-5


def token_batch(vocab, b=2, s=10, seed=0):
    return np.random.default_rng(seed).integers(3, vocab, size=(b, s)).astype(np.int32)


@nnx.jit
def _forward(model, ids):
    return model(ids)


def logits(model, ids):
    """Jitted forward (an eager call would compile the layer scan anew each time)."""
    return np.asarray(_forward(model, ids))


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


_ADAMW = {}


@nnx.jit
def _train_step(model, optimizer, ids):
    def loss_fn(model):
        out = model(ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(out, ids[:, 1:]).mean()

    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, TRAINABLE))(model)
    optimizer.update(model, grads)
    return loss, grads


def train(model, ids, steps=3, lr=1e-2):
    """A few optax adamw steps on a next-token loss; gradients only for TRAINABLE. Returns (losses, last grads)."""
    if lr not in _ADAMW:  # one optax object per lr: the optimizer is static in the jit cache key
        _ADAMW[lr] = optax.adamw(lr)
    optimizer = nnx.Optimizer(model, _ADAMW[lr], wrt=TRAINABLE)
    losses = []
    for _ in range(steps):
        loss, grads = _train_step(model, optimizer, ids)
        losses.append(float(loss))
    return losses, grads


def randomize_b(model, std=0.2, seed=1):
    """Give every LoRA B random values (as after training), so the delta is not zero."""
    key = jax.random.key(seed)
    for k, (_, module) in enumerate(lora_modules(model)):
        shape = module.lora_b.shape
        module.lora_b.set_value(std * jax.random.normal(jax.random.fold_in(key, k), shape))


def base_state(model):
    return {p: np.array(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# ------------------------------------------------------------------------------------------------ identity, grads


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_identity_at_init(checkpoints, init):
    folder, _ = checkpoints["llama"]
    model = tx.load_model(folder)
    ids = token_batch(model.config.vocab_size)
    base = logits(model, ids)
    rank = 4
    attach(model, lora=tx.LoRAConfig(rank=rank, alpha=8, init=init))
    modules = lora_modules(model)
    assert [s.name for s, _ in modules] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    np.testing.assert_array_equal(logits(model, ids), base)  # exact: B = 0
    for _, m in modules:
        a = np.asarray(m.lora_a[...])
        d_out, d_in = m.base.weight.shape[-2:]
        assert a.shape == (2, rank, d_in) and m.lora_b.shape == (2, d_out, rank)
        assert a.dtype == np.float32 and m.lora_b.dtype == np.float32
        assert not np.asarray(m.lora_b[...]).any()
        if init == "default":  # PEFT's kaiming_uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
            bound = 1 / np.sqrt(d_in)
            assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
        else:  # N(0, 1/r)
            assert abs(a.std() / (1 / rank) - 1) < 0.2
    # seeded: the same seed gives the same A, another seed another A
    again = attach(tx.load_model(folder), lora=tx.LoRAConfig(rank=rank, alpha=8, init=init))
    other = attach(tx.load_model(folder), lora=tx.LoRAConfig(rank=rank, alpha=8, init=init, seed=1))
    a0 = np.asarray(modules[0][1].lora_a[...])
    np.testing.assert_array_equal(a0, np.asarray(lora_modules(again)[0][1].lora_a[...]))
    assert not np.array_equal(a0, np.asarray(lora_modules(other)[0][1].lora_a[...]))


def test_gradient_step_touches_only_adapters(checkpoints):
    folder, _ = checkpoints["llama"]
    model = attach(tx.load_model(folder), lora=tx.LoRAConfig(rank=4, alpha=8))
    ids = token_batch(model.config.vocab_size)
    before = base_state(model)
    a_before = np.asarray(lora_modules(model)[0][1].lora_a[...])
    losses, grads = train(model, ids, steps=3)
    leaves = nnx.to_flat_state(grads)
    assert leaves and all(isinstance(v, LoRAParam) for _, v in leaves)  # no gradient of a base weight was built
    assert len(leaves) == 2 * len(lora_modules(model))
    after = base_state(model)
    assert before.keys() == after.keys() and len(before) > 10
    for path in before:
        np.testing.assert_array_equal(after[path], before[path], err_msg=str(path))  # bit-identical
    assert losses[-1] < losses[0]
    assert all(np.asarray(m.lora_b[...]).any() for _, m in lora_modules(model))
    assert not np.array_equal(a_before, np.asarray(lora_modules(model)[0][1].lora_a[...]))


def test_adapters_disabled_gives_base_after_training(checkpoints):
    folder, _ = checkpoints["llama"]
    base_model = tx.load_model(folder)
    ids = token_batch(base_model.config.vocab_size)
    base = logits(base_model, ids)
    model = attach(tx.load_model(folder), lora=tx.LoRAConfig(rank=4, alpha=8))
    train(model, ids, steps=3)
    trained = logits(model, ids)
    assert np.abs(trained - base).max() > 1e-2
    with adapters_disabled(model):
        np.testing.assert_array_equal(logits(model, ids), base)
    np.testing.assert_array_equal(logits(model, ids), trained)  # restored
    with pytest.raises(RuntimeError), adapters_disabled(model):
        raise RuntimeError("boom")
    assert all(m.enabled for _, m in lora_modules(model))


def test_regex_targets_exclude_and_layers(checkpoints):
    folder, _ = checkpoints["llama"]
    model = tx.load_model(folder)
    attach(model, lora=tx.LoRAConfig(rank=4, targets=r"model\.layers\.1\.self_attn\.(q|v)_proj"))
    got = {s.name: m.layer_mask.tolist() for s, m in lora_modules(model)}
    assert got == {"q_proj": [0.0, 1.0], "v_proj": [0.0, 1.0]}

    model = attach(tx.load_model(folder), lora=tx.LoRAConfig(rank=4, exclude=["o_proj", "mlp.up_proj"], layers=[0]))
    got = {s.name: m.layer_mask.tolist() for s, m in lora_modules(model)}
    assert got == {n: [1.0, 0.0] for n in ("q_proj", "k_proj", "v_proj", "gate_proj", "down_proj")}
    # with B != 0 everywhere, the switched-off layer 1 still adds nothing
    randomize_b(model)
    for _, m in lora_modules(model):
        delta = np.asarray(m.delta_weight())
        assert np.abs(delta[0]).max() > 1e-3 and not delta[1].any()


def test_trainable_parameters_match_peft(checkpoints):
    import peft

    folder, ref = checkpoints["qwen3"]
    targets = ["q_proj", "v_proj", "down_proj"]
    model = attach(tx.load_model(folder), lora=tx.LoRAConfig(rank=4, alpha=8, targets=targets, layers=[1]))
    count = tx.trainable_parameters(model)
    hf = peft.get_peft_model(copy.deepcopy(ref), peft.LoraConfig(r=4, target_modules=targets, layers_to_transform=[1]))
    assert tuple(count) == hf.get_nb_trainable_parameters()
    trainable, total = count
    assert (trainable, total) == (count.trainable, count.total) and 0 < trainable < total
    text = str(count)
    assert re.fullmatch(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}", text), text
    assert f"{total:,d}" in text and f"{100 * trainable / total:.4f}" in text
    # a connector's variables are trainable parameters too
    attach(model, connector=tx.ConnectorConfig(expansion_rate=2, kind="mhc"))
    with_conn = tx.trainable_parameters(model)
    n_conn = sum(v.size for _, v in nnx.to_flat_state(nnx.state(model, TRAINABLE)) if not isinstance(v, LoRAParam))
    assert n_conn > 0 and with_conn == (trainable + n_conn, total + n_conn)


# ----------------------------------------------------------------------------------------------- dropout


def test_dropout_train_and_eval(checkpoints):
    folder, _ = checkpoints["llama"]
    plain = attach(tx.load_model(folder), lora=tx.LoRAConfig(rank=4, alpha=8))
    dropped = attach(tx.load_model(folder), lora=tx.LoRAConfig(rank=4, alpha=8, dropout=0.5))
    randomize_b(plain)
    randomize_b(dropped)  # same seeds: same A and B in both
    ids = token_batch(plain.config.vocab_size)
    want = logits(plain, ids)
    first, second = logits(dropped, ids), logits(dropped, ids)
    # the dropout key advances from call to call (it is written back out of the layer scan)
    assert np.abs(first - want).max() > 1e-3 and np.abs(second - first).max() > 1e-3
    dropped.eval()
    np.testing.assert_allclose(logits(dropped, ids), want, atol=1e-6)
    dropped.train()
    assert np.abs(logits(dropped, ids) - want).max() > 1e-3


# --------------------------------------------------------------------------------------------- merge and export


@pytest.mark.parametrize("family", ["llama", "llama3_tied", "qwen2"])
def test_merge_and_export_loads_in_transformers(checkpoints, family, tmp_path):
    import transformers

    folder, _ = checkpoints[family]
    model = attach(tx.load_model(folder), lora=tx.LoRAConfig(rank=4, alpha=8, use_rslora=family == "qwen2"))
    randomize_b(model)
    ids = token_batch(model.config.vocab_size)
    adapted = logits(model, ids)

    # save_model folds LoRA on the fly and leaves the model as it is
    tx.save_model(model, tmp_path / "unmerged")
    assert has_lora(model)
    np.testing.assert_allclose(logits(tx.load_model(tmp_path / "unmerged"), ids), adapted, atol=MERGE_TOL)

    tx.merge_lora(model)
    assert not has_lora(model) and model.lora_config is None
    assert not any(isinstance(m, LoRALinear) for _, m in nnx.iter_modules(model))
    assert not nnx.to_flat_state(nnx.state(model, LoRAParam))
    merged = logits(model, ids)
    assert np.abs(merged - adapted).max() <= MERGE_TOL, np.abs(merged - adapted).max()

    out = tx.save_model(model, tmp_path / "merged")
    names = sorted(p.name for p in out.iterdir())
    assert "config.json" in names and "model.safetensors" in names and "model.safetensors.index.json" not in names
    assert not [n for n in names if ".tmp" in n]
    written = load_file(out / "model.safetensors")
    assert ("lm_head.weight" in written) is (family != "llama3_tied")  # a tied head is not written twice
    assert json.loads((out / "config.json").read_text()) == json.loads((folder / "config.json").read_text())
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    diff = np.abs(hf_logits(hf, ids) - merged).max()
    assert diff <= HF_TOL, diff

    sharded = tx.save_model(model, tmp_path / "sharded", max_shard_size="20KB")
    index = sharded / "model.safetensors.index.json"
    assert index.exists() and len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(sharded, attn_implementation="eager").eval()
    assert np.abs(hf_logits(hf, ids) - merged).max() <= HF_TOL
    np.testing.assert_array_equal(logits(tx.load_model(sharded), ids), merged)
    # a single-file save into the same folder removes the old shards and index
    tx.save_model(model, sharded)
    assert not index.exists() and not list(sharded.glob("model-*-of-*.safetensors"))


def test_save_model_copies_tokenizer_files(checkpoints, tmp_path):
    source = tmp_path / "with_tokenizer"
    shutil.copytree(checkpoints["llama"][0], source)
    (source / "tokenizer.json").write_text('{"version": "1.0"}')
    (source / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    out = tx.save_model(tx.load_model(source), tmp_path / "out")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name


def test_save_model_refuses_connector_and_source_folder(checkpoints, tmp_path):
    folder, _ = checkpoints["llama"]
    model = attach(tx.load_model(folder), connector=tx.ConnectorConfig(expansion_rate=2, kind="mhc"))
    with pytest.raises(AdapterError, match=r"connector \(expansion_rate 2\).*change the architecture"):
        tx.save_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    plain = tx.load_model(folder)
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        tx.save_model(plain, folder)
    with pytest.raises(ConfigError, match="max_shard_size"):
        tx.save_model(plain, tmp_path / "x", max_shard_size="5 parsecs")
    with pytest.raises(AdapterError, match="no LoRA to merge"):
        tx.merge_lora(plain)


# ------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(rank=0), "rank must be an integer >= 1, got 0"),
        (dict(rank=-3), "rank must be an integer >= 1, got -3"),
        (dict(rank=2.5), "rank must be an integer"),
        (dict(alpha=0), "alpha must be a number > 0, got 0"),
        (dict(alpha=-1.0), "alpha must be a number > 0, got -1.0"),
        (dict(init="xavier"), "unknown LoRA init 'xavier'; use one of 'default', 'gaussian'"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
        (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),
        (dict(targets=[]), "targets is empty"),
        (dict(targets="q_proj("), "not a valid regular expression"),
        (dict(layers=[-1]), "layer indices >= 0"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        tx.LoRAConfig(**kwargs)


NAMES = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(targets=["q_proj", "qkv_proj"]), f"LoRA targets 'qkv_proj' matches no module.*are: {NAMES}"),
        (dict(targets=["lm_head"]), "'lm_head' matches no module.*LM head and the embeddings are not LoRA targets"),
        (dict(targets=r".*\.attention\..*"), f"regex '.*\\\\.attention\\\\..*' matches no module.*are: {NAMES}"),
        (dict(exclude=["w_proj"]), "LoRA exclude 'w_proj' matches no module"),
        (dict(layers=[0, 7]), r"LoRA layers \[7\] do not exist: the model has 2 layers"),
        (dict(targets=["q_proj"], exclude=["q_proj"]), "leave no module to adapt"),
    ],
)
def test_bad_targets(checkpoints, kwargs, message):
    folder, _ = checkpoints["llama"]
    model = tx.load_model(folder)
    with pytest.raises(ConfigError, match=message):
        attach(model, lora=tx.LoRAConfig(**kwargs))
    assert not has_lora(model)  # nothing half-attached


def test_attach_twice_is_an_error(checkpoints):
    folder, _ = checkpoints["llama"]
    model = attach(tx.load_model(folder), lora=tx.LoRAConfig(rank=2))
    with pytest.raises(AdapterError, match="already has LoRA attached"):
        attach(model, lora=tx.LoRAConfig(rank=2))
    with pytest.raises(ConfigError, match="needs lora="):
        attach(model)
