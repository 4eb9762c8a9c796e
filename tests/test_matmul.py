"""tx.models.matmul.einsum: bf16 matmuls accumulated in fp32 on every pass, and bf16 models against transformers."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from fixtures_grads import adapter_grads, move_adapters, packed_batch
from fixtures_models import FAMILY_NAMES

import tx
from tx.models.matmul import einsum

BF16_ULP = 2.0**-8  # bf16 keeps 8 significant bits: rounding moves a value by at most half of this, relatively


def _arrays(dtype=jnp.bfloat16):
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (48, 40)).astype(dtype)
    w = jax.random.normal(k[1], (24, 40)).astype(dtype)
    c = jax.random.normal(k[2], (48, 24)).astype(dtype)
    return x, w, c


def _exact(spec, a, b):
    """The einsum of the same (bf16) values in fp32 at full precision, then rounded to bf16 once."""
    f32 = jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return np.asarray(f32.astype(jnp.bfloat16), np.float32), np.asarray(f32)


def _within_one_rounding(got, exact_f32):
    # fp32 accumulation in another order, then one rounding to bf16: at most one bf16 step from the exact value
    err = np.abs(np.asarray(got, np.float32) - exact_f32)
    assert np.all(err <= BF16_ULP * np.abs(exact_f32) + 1e-6), err.max()


def test_bf16_forward_and_gradients_are_fp32_accumulations_rounded_once():
    x, w, c = _arrays()
    y = einsum("ti,oi->to", x, w)
    assert y.dtype == jnp.bfloat16
    _within_one_rounding(y, _exact("ti,oi->to", x, w)[1])

    gx, gw = jax.grad(lambda x, w: jnp.sum(einsum("ti,oi->to", x, w).astype(jnp.float32) * c), (0, 1))(x, w)
    assert gx.dtype == gw.dtype == jnp.bfloat16
    _within_one_rounding(gx, _exact("to,oi->ti", c, w)[1])
    _within_one_rounding(gw, _exact("to,ti->oi", c, x)[1])


def test_fp32_result_is_not_rounded_to_bf16():
    x, w, _ = _arrays()
    y = einsum("ti,oi->to", x, w, out_dtype=jnp.float32)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), _exact("ti,oi->to", x, w)[1], rtol=1e-5, atol=1e-5)


def test_fp32_operands_are_a_plain_einsum():
    x, w, _ = _arrays(jnp.float32)
    np.testing.assert_array_equal(np.asarray(einsum("ti,oi->to", x, w)), np.asarray(jnp.einsum("ti,oi->to", x, w)))


def _dots(f, *args):
    """(operand dtypes, result dtype) of every dot in the optimised HLO of jit(f)."""
    hlo = jax.jit(f).lower(*args).compile().as_text()
    names = dict(re.findall(r"%(\S+) = (\w+)\[", hlo))
    dots = re.findall(r"= (\w+)\[[^\]]*\]\S* dot\(%(\S+?), %(\S+?)\)", hlo)
    return [((names.get(a), names.get(b)), out) for out, a, b in dots]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the fp32-accumulating path is the CPU one")
def test_every_matmul_of_a_bf16_train_step_takes_bf16_operands():
    # The fast CPU kernels need bf16 operands. Autodiff would hand the gradient matmul an fp32 cotangent (the
    # dot's fp32 result type), making it fp32 x fp32 (about 5x slower on an AMX CPU). Frozen weight, as in tx:
    # only the forward and the input gradient run.
    x, w, c = _arrays()
    loss = lambda x, w: jnp.sum(einsum("ti,oi->to", x, w).astype(jnp.float32) * c)
    dots = _dots(jax.value_and_grad(loss), x, w)
    assert len(dots) == 2
    assert all(ops == ("bf16", "bf16") and out == "f32" for ops, out in dots), dots


@pytest.mark.parametrize("spec", ["ti,oi", "ti,oi,o->to", "...i,oi->...o", "tii,oi->to", "tiz,oi->to"])
def test_bad_spec_names_it(spec):
    x, w, _ = _arrays()
    with pytest.raises(ValueError, match=re.escape(repr(spec))):
        einsum(spec, x[..., None] if "z" in spec else x, w)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_bf16_model_is_as_close_to_fp32_as_transformers_in_bf16(checkpoints, family):
    # Reference: transformers loading the same checkpoint in bf16 (PyTorch accumulates bf16 matmuls in fp32).
    # tx in bf16 must not stray from the fp32 logits further than transformers in bf16 does. Measured ratios
    # (tx / transformers) over the five families: mean error 0.89-0.99, max error 0.81-1.23.
    folder, ref = checkpoints[family]
    ids = np.random.default_rng(0).integers(3, ref.config.vocab_size, size=(2, 12)).astype(np.int32)
    with torch.no_grad():
        fp32 = ref(torch.tensor(ids)).logits.float().numpy()
        hf16 = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.bfloat16, attn_implementation="eager"
        )
        hf = hf16(torch.tensor(ids)).logits.float().numpy()
    ours = np.asarray(tx.load_model(folder, dtype="bfloat16")(ids), np.float32)
    hf_err, our_err = np.abs(hf - fp32), np.abs(ours - fp32)
    assert hf_err.max() > 0  # the reference really ran in bf16
    assert our_err.mean() <= 1.1 * hf_err.mean(), (our_err.mean(), hf_err.mean())
    assert our_err.max() <= 1.5 * hf_err.max(), (our_err.max(), hf_err.max())


def test_bf16_adapter_gradients_agree_with_fp32(checkpoints):
    # The same adapted model (LoRA + mhc, adapters moved off their init) in fp32 and in bf16 on the same batch.
    # bf16 rounds every activation and cotangent to 8 significant bits (2^-8 relative), a few dozen roundings
    # deep: measured over 4 seeds, loss 2e-4..8e-4 relative, worst LoRA leaf 2.8-3.6% and all connector gradients
    # 2.4-3.5% (norm of the difference / norm of the fp32 gradient), the same as before bf16 matmuls accumulated
    # in fp32. A wrong cast or scale in a backward pass gives errors of order 1.
    folder, ref = checkpoints["qwen3"]
    b = packed_batch(ref.config.vocab_size)
    out = {}
    for dtype in ("float32", "bfloat16"):
        model = tx.load_model(folder, dtype=dtype)
        tx.attach(
            model,
            lora=tx.LoRAConfig(rank=4, alpha=8, seed=1),
            connector=tx.ConnectorConfig(expansion_rate=2, kind="mhc"),
        )
        move_adapters(model)
        out[dtype] = adapter_grads(model, b)
    (loss32, (lora32, conn32)), (loss16, (lora16, conn16)) = out["float32"], out["bfloat16"]
    assert abs(float(loss16) - float(loss32)) <= 3e-3 * abs(float(loss32))

    def rel(a, c):
        a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in a])
        c = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in c])
        return np.linalg.norm(c - a) / np.linalg.norm(a)

    leaves32, leaves16 = jax.tree.leaves(lora32), jax.tree.leaves(lora16)
    assert len(leaves32) == len(leaves16) == 14  # A and B of 7 projections
    assert all(x.dtype == jnp.float32 for x in leaves16)  # LoRA gradients are never rounded to bf16
    assert max(rel([a], [c]) for a, c in zip(leaves32, leaves16)) <= 0.08
    assert rel(jax.tree.leaves(conn32), jax.tree.leaves(conn16)) <= 0.08
